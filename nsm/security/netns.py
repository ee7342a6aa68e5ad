"""Proof that a network namespace is a workload's own, given by the namespace itself.

A forwarder asked to put an interface into a namespace on behalf of identity X must know that
the namespace is X's pod, not the node's, not another tenant's. Upstream a client hands its
namespace over as a file descriptor (``SCM_RIGHTS``); grpcio does not expose its sockets, so
here the namespace proves itself:

- **Abstract unix sockets belong to a network namespace**: a name bound in one is invisible in
  every other, and only a process inside the namespace (or one that can ``setns`` into it, i.e.
  privileged on it) can bind one there. A workload that names a namespace keeps a listening
  socket *inside* it at :func:`proof_address` (``\\0nsm-netns/<sha256(its SPIFFE ID)[:32]>``):
  :meth:`NetnsProof.listen` (created from a thread that entered the namespace, or directly when
  the process is inside; the socket stays in the namespace for its life).
- **The verifier connects from inside the namespace it checked** (:meth:`NetnsProof.prove`: a
  socket created after ``setns`` into the file descriptor it opened and checked, so a path that
  changes meanwhile cannot redirect it), to X's address, sends a random nonce with its context
  (the namespace's identity, its own SPIFFE ID and the identity it expects), and the listener
  answers with its X.509-SVID chain and an ES256 signature (its SVID key) over exactly those
  bytes. The verifier checks the chain against its trust bundle, that its SPIFFE ID is X, and
  the signature. No listener, another identity, a bad signature, a namespace the listener is not
  in, or no answer within the timeout: PermissionDenied.

So a caller can only have a namespace programmed if a process holding its identity's key is
inside it: a remote caller never can, nor can a caller name the node's namespace (refused
structurally first, :class:`nsm.kernel.netns.NodeNetns`) or another pod's.

Wire (one request and one answer per connection, each a 4-byte big-endian length and JSON):
request ``{"v": 1, "id": X, "nonce": <b64 32 bytes>, "netns": "<dev>:<ino>", "verifier": <ID>}``;
answer ``{"chain": <PEM>, "signature": <b64 DER ECDSA-SHA256 over "nsm-netns-proof/v1\\0" +
request bytes>}`` or ``{"error": <text>}``.

Plain asyncio and sockets; no pyroute2.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import errno
import hashlib
import json
import os
import secrets
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from nsm.api.connection_pb2 import PathSegment
from nsm.errors import InvalidArgument, NsmError, PermissionDenied
from nsm.kernel.netns import NetnsId, entered_netns, open_netns
from nsm.log import get_logger
from nsm.security.ids import SpiffeId, parse_id
from nsm.security.svid import load_pem_chain, now, verify_chain
from nsm.security.tls import Security
from nsm.security.tokens import claims_of

log = get_logger("nsm.security.netns")

#: Domain separation of the signed bytes.
CONTEXT = b"nsm-netns-proof/v1\0"
#: How long a proof may take before the namespace is refused.
PROOF_TIMEOUT = 1.0
#: Largest request or answer accepted (an SVID chain is a few KiB).
MAX_FRAME = 64 * 1024
#: How often a listener whose address is taken (another listener of the same identity in the
#: namespace, e.g. a second client of the same workload) tries to take it over.
STANDBY_RETRY = 0.2
#: How many checked SVID chains a verifier remembers.
CHAIN_CACHE = 256


def proof_address(spiffe_id: str | SpiffeId) -> bytes:
    """The abstract unix socket address at which ``spiffe_id`` proves a namespace is its own."""
    digest = hashlib.sha256(str(spiffe_id).encode()).hexdigest()[:32]
    return b"\0nsm-netns/" + digest.encode()


def claimed_id(segment: PathSegment) -> SpiffeId | None:
    """The identity a path segment claims: its token's ``sub``, decoded *without* verifying
    (the token elements verify every token hop by hop); None when it has no (readable) token."""
    if not segment.token:
        return None
    try:
        return parse_id(claims_of(segment.token).sub)
    except (PermissionDenied, InvalidArgument):
        return None


def _ident(fd: int) -> NetnsId:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _own_ident() -> NetnsId:
    st = os.stat("/proc/thread-self/ns/net")
    return st.st_dev, st.st_ino


def _socket_in(ns_fd: int) -> socket.socket:
    """A non-blocking AF_UNIX stream socket created inside the namespace open at ``ns_fd``
    (synchronously: ``setns`` there and straight back, no ``await`` in between; no ``setns``
    when this thread is inside already)."""
    if _ident(ns_fd) == _own_ident():
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    else:
        with entered_netns(ns_fd):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.setblocking(False)
    return sock


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    (size,) = struct.unpack(">I", await reader.readexactly(4))
    if size > MAX_FRAME:
        raise ValueError(f"frame of {size} bytes is larger than {MAX_FRAME}")
    return await reader.readexactly(size)


def _frame(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


class ProofListener:
    """A listening socket inside one namespace answering proofs for one identity (the current
    SVID of ``security``, so rotation needs nothing). Made by :meth:`NetnsProof.listen`."""

    def __init__(self, security: Security, netns: str) -> None:
        self.security = security
        self.netns = netns
        self.address = proof_address(security.svid.spiffe_id)
        self._fd = open_netns(netns)
        self.ident = _ident(self._fd)
        self._server: asyncio.AbstractServer | None = None
        self._standby: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def listening(self) -> bool:
        """Whether this listener holds the address (False: on standby behind another one)."""
        return self._server is not None

    async def start(self) -> None:
        if not await self._bind():
            # Another listener of this identity holds the address in this namespace (a second
            # client of the same workload): it proves the same thing; take over when it goes.
            log.debug("proof address taken in the namespace; standing by", netns=self.netns)
            self._standby = asyncio.ensure_future(self._take_over())

    async def _bind(self) -> bool:
        sock = _socket_in(self._fd)
        try:
            sock.bind(self.address)
            sock.listen(64)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
        self._server = await asyncio.start_unix_server(self._serve, sock=sock)
        return True

    async def _take_over(self) -> None:
        while True:
            await asyncio.sleep(STANDBY_RETRY)
            if await self._bind():
                log.debug("proof address taken over", netns=self.netns)
                return

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(PROOF_TIMEOUT):
                request = await _read_frame(reader)
                writer.write(_frame(self._answer(request)))
                await writer.drain()
        except (OSError, ValueError, TimeoutError, asyncio.IncompleteReadError) as exc:
            log.debug("proof request failed", netns=self.netns, error=str(exc))
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def _answer(self, request: bytes) -> bytes:
        svid = self.security.svid
        try:
            doc = json.loads(request)
            asked, where = doc["id"], doc["netns"]
        except (ValueError, KeyError, TypeError):
            return json.dumps({"error": "malformed proof request"}).encode()
        if asked != svid.id:
            return json.dumps({"error": f"this listener proves for {svid.id}, not {asked}"}).encode()
        if where != f"{self.ident[0]}:{self.ident[1]}":
            return json.dumps({"error": f"this listener is in namespace "
                                        f"{self.ident[0]}:{self.ident[1]}, not {where}"}).encode()
        signature = svid.key.sign(CONTEXT + request, ec.ECDSA(hashes.SHA256()))
        return json.dumps({"chain": svid.chain_pem.decode(),
                           "signature": base64.b64encode(signature).decode()}).encode()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._standby is not None:
            self._standby.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._standby
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        os.close(self._fd)


class NetnsProof:
    """The proof protocol (see the module docstring): :meth:`listen` for workloads; an
    instance (one per verifying daemon: it remembers the SVID chains it checked) :meth:`prove`s
    for the forwarder."""

    def __init__(self, security: Security, *, timeout: float = PROOF_TIMEOUT) -> None:
        self.security = security
        self.timeout = timeout
        #: (chain PEM, bundle PEM) -> (SPIFFE ID, leaf key, end of validity) of checked chains.
        self._chains: dict[tuple[str, bytes], tuple[SpiffeId, ec.EllipticCurvePublicKey, dt.datetime]] = {}

    @staticmethod
    @contextlib.asynccontextmanager
    async def listen(security: Security, netns: str) -> AsyncIterator[ProofListener | None]:
        """``async with NetnsProof.listen(security, "/var/run/netns/pod"):`` — prove, while
        inside, that this process's identity owns ``netns`` (a path). Yields None, doing
        nothing, when ``security`` is insecure (no identity to prove)."""
        if not security.enabled:
            yield None
            return
        listener = ProofListener(security, netns)
        try:
            await listener.start()
            yield listener
        finally:
            await listener.close()

    async def prove(self, ns_fd: int, claimed: SpiffeId | str, *, where: str = "",
                    timeout: float | None = None) -> SpiffeId:
        """Check that ``claimed`` has a listener inside the namespace open at ``ns_fd`` and
        holds the key of a valid SVID of our trust domain for that ID; its SPIFFE ID.
        PermissionDenied (with the reason) otherwise."""
        where = where or f"the namespace at fd {ns_fd}"
        timeout = self.timeout if timeout is None else timeout
        ident = _ident(ns_fd)
        nonce = secrets.token_bytes(32)
        request = json.dumps({"v": 1, "id": str(claimed), "nonce": base64.b64encode(nonce).decode(),
                              "netns": f"{ident[0]}:{ident[1]}", "verifier": self.security.id or ""},
                             sort_keys=True).encode()
        try:
            async with asyncio.timeout(timeout):
                answer = await _exchange(ns_fd, proof_address(claimed), request)
        except TimeoutError:
            raise PermissionDenied(f"{where}: no proof from {claimed} within {timeout} s") from None
        except ConnectionRefusedError:
            raise PermissionDenied(f"{where} is not {claimed}'s: no process of {claimed} is "
                                   "inside it (no proof listener)") from None
        except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
            raise PermissionDenied(f"{where}: the proof of {claimed} failed ({exc})") from None
        return self._verify(answer, request, claimed, where)

    def _verify(self, answer: bytes, request: bytes, claimed: SpiffeId | str, where: str) -> SpiffeId:
        try:
            doc: dict[str, Any] = json.loads(answer)
        except ValueError:
            raise PermissionDenied(f"{where}: the proof of {claimed} is malformed") from None
        if not isinstance(doc, dict):
            raise PermissionDenied(f"{where}: the proof of {claimed} is malformed")
        if "error" in doc:
            raise PermissionDenied(f"{where}: the listener of {claimed} refused: "
                                   f"{str(doc['error'])[:200]}")
        try:
            pem = str(doc["chain"])
            signature = base64.b64decode(str(doc["signature"]), validate=True)
        except (KeyError, ValueError) as exc:
            raise PermissionDenied(f"{where}: the proof of {claimed} is malformed ({exc})") from None
        sid, key = self._chain(pem, claimed, where)
        if str(sid) != str(claimed):
            raise PermissionDenied(f"{where} is not {claimed}'s: its listener is {sid}")
        try:
            key.verify(signature, CONTEXT + request, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise PermissionDenied(f"{where}: the proof of {claimed} is not signed by its SVID "
                                   "key") from None
        return sid

    def _chain(self, pem: str, claimed: SpiffeId | str,
               where: str) -> tuple[SpiffeId, ec.EllipticCurvePublicKey]:
        """The SPIFFE ID and leaf key of a chain checked against our bundle (remembered until
        the chain's end of validity)."""
        svid = self.security.svid
        key = (pem, svid.bundle_pem)
        known = self._chains.get(key)
        if known is not None and now() <= known[2]:
            return known[0], known[1]
        try:
            chain = load_pem_chain(pem.encode(), "proof chain")
            sid = verify_chain(chain, svid.bundle, self.security.trust_domain)
        except NsmError as exc:
            raise PermissionDenied(f"{where}: the proof of {claimed} carries no valid SVID: "
                                   f"{exc.message}") from None
        leaf = chain[0].public_key()
        if not isinstance(leaf, ec.EllipticCurvePublicKey):
            raise PermissionDenied(f"{where}: the SVID of {claimed} has no EC key")
        if len(self._chains) >= CHAIN_CACHE:
            self._chains.clear()
        self._chains[key] = (sid, leaf, min(c.not_valid_after_utc for c in chain))
        return sid, leaf


async def _exchange(ns_fd: int, address: bytes, request: bytes) -> bytes:
    loop = asyncio.get_running_loop()
    with _socket_in(ns_fd) as sock:
        await loop.sock_connect(sock, address)
        await loop.sock_sendall(sock, _frame(request))
        data = b""
        while len(data) < 4 or len(data) < 4 + struct.unpack(">I", data[:4])[0]:
            if len(data) >= 4 and struct.unpack(">I", data[:4])[0] > MAX_FRAME:
                raise ValueError(f"answer larger than {MAX_FRAME} bytes")
            chunk = await loop.sock_recv(sock, 65536)
            if not chunk:
                raise asyncio.IncompleteReadError(data, None)
            data += chunk
        return data[4:4 + struct.unpack(">I", data[:4])[0]]

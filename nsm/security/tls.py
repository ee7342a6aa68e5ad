"""A process's security settings: its identity (the current SVID, its rotations), and who the
caller of a gRPC call is.

Every listen and dial of :mod:`nsm.transport` takes a :class:`Security` and builds its mTLS
credentials from :attr:`Security.svid` (there, and nowhere else); with ``Security.insecure()``
(``--insecure``) they are plaintext. grpcio checks a DNS name of the server's certificate (it has
no SPIFFE verifier): every SVID must carry the DNS SAN :attr:`Security.server_name` (the trust
domain unless configured; the built-in CA adds it, a SPIRE registration entry needs it as a DNS
name), and every channel asks for that name. Who the peer is, is decided on its SPIFFE ID (the
URI SAN), never on that name.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable

import grpc
from cryptography import x509

from nsm.errors import Unauthenticated
from nsm.log import get_logger
from nsm.security.ids import SpiffeId
from nsm.security.sources import SvidSource
from nsm.security.svid import Svid, spiffe_id_of

log = get_logger("nsm.security")

#: How many peer certificates (parsed, with their IDs) are remembered (parsing one costs ~50 µs).
PEER_CACHE = 1024


class Security:
    """mTLS with the SVIDs of ``source``, or plaintext (:meth:`insecure`)."""

    def __init__(self, source: SvidSource | None, *, trust_domain: str,
                 server_name: str | None = None) -> None:
        self.source = source
        self.trust_domain = trust_domain
        self.server_name = server_name or trust_domain
        self._generation = 0
        self._lock = threading.Lock()
        self._peers: dict[bytes, tuple[SpiffeId, x509.Certificate]] = {}
        self._rotations: list[Callable[[Svid], None]] = []
        self._started = False
        self._starting: asyncio.Future[None] | None = None
        if source is not None:
            source.subscribe(self._rotated)

    @classmethod
    def insecure(cls) -> Security:
        return cls(None, trust_domain="")

    @property
    def enabled(self) -> bool:
        return self.source is not None

    @property
    def svid(self) -> Svid:
        if self.source is None:
            raise Unauthenticated("this process runs --insecure: it has no identity")
        return self.source.svid

    @property
    def id(self) -> str | None:
        """This process's SPIFFE ID (None when insecure)."""
        return None if self.source is None else self.source.svid.id

    async def __aenter__(self) -> Security:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Get the first SVID (idempotent; concurrent callers wait for the same start)."""
        if self._starting is None:
            self._starting = asyncio.ensure_future(self._start())
        await asyncio.shield(self._starting)

    async def _start(self) -> None:
        self._started = True
        if self.source is None:
            log.warning("running --insecure: plaintext gRPC, no identities, no authorization")
            return
        try:
            await self.source.start()
        except BaseException:
            self._started = False
            self._starting = None
            raise
        svid = self.source.svid
        log.info("identity", spiffe_id=svid.id, expires=f"{svid.expires:%Y-%m-%dT%H:%M:%SZ}")

    async def close(self) -> None:
        starting, self._starting = self._starting, None
        if starting is not None:
            with contextlib.suppress(BaseException):
                await starting
        if self.source is not None and self._started:
            self._started = False
            await self.source.close()

    def on_rotate(self, callback: Callable[[Svid], None]) -> Callable[[], None]:
        """Call ``callback(svid)`` after each rotation (channels are renewed on it)."""
        self._rotations.append(callback)
        return lambda: self._rotations.remove(callback) if callback in self._rotations else None

    def _rotated(self, svid: Svid) -> None:
        with self._lock:
            self._generation += 1
        for callback in list(self._rotations):
            callback(svid)

    @property
    def generation(self) -> int:
        """How many times the SVID has rotated (the transport's server credentials move to the
        new one at their next handshake when this changed)."""
        with self._lock:
            return self._generation

    # -- the peer -------------------------------------------------------------------------

    def peer_id(self, context: grpc.aio.ServicerContext) -> SpiffeId | None:
        """The caller's SPIFFE ID from its TLS certificate (the handshake already checked the
        chain against our bundle); None when insecure. Unauthenticated when a secure call
        carries no SVID of our trust domain."""
        if self.source is None:
            return None
        auth = context.auth_context() or {}
        pems = auth.get("x509_pem_cert") or []
        if not pems:
            raise Unauthenticated("the caller presented no certificate")
        sid = self._peer(pems[0])[0]
        if sid.trust_domain != self.trust_domain:
            raise Unauthenticated(f"{sid} is not of trust domain {self.trust_domain}")
        return sid

    def peer_certificate(self, context: grpc.aio.ServicerContext) -> x509.Certificate | None:
        """The caller's leaf certificate (None when insecure or absent)."""
        if self.source is None:
            return None
        pems = (context.auth_context() or {}).get("x509_pem_cert") or []
        return self._peer(pems[0])[1] if pems else None

    def _peer(self, pem: bytes) -> tuple[SpiffeId, x509.Certificate]:
        """A peer's leaf certificate (PEM, as the handshake checked it), parsed once."""
        held = self._peers.get(pem)
        if held is None:
            cert = x509.load_pem_x509_certificate(pem)
            held = (spiffe_id_of(cert), cert)
            if len(self._peers) >= PEER_CACHE:
                self._peers.clear()
            self._peers[pem] = held
        return held

"""Helpers of the identity-source and rotation tests: what certificate a server presents (a
TLS handshake of our own: grpcio shows a client nothing of it), SVID files written the way
spiffe-helper and cert-manager's csi-driver-spiffe write them, and a fake SPIFFE Workload API
(a real gRPC server on a unix socket, py-spiffe's generated protos)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import socket
import ssl
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from security_ids import TD  # type: ignore[import-not-found]
from spiffe._proto import workload_pb2, workload_pb2_grpc

from nsm.security.ca import CertificateAuthority
from nsm.security.ids import parse_id
from nsm.security.sources import SvidSource
from nsm.security.svid import Svid, now

#: The header every Workload API request carries (SPIRE refuses a request without it).
WORKLOAD_HEADER = ("workload.spiffe.io", "true")


# -- what a server presents -------------------------------------------------------------------


def presented(url: str, client: Svid, *, timeout: float = 5.0) -> x509.Certificate:
    """The leaf certificate the server at ``url`` (``unix:///path`` or ``tcp://host:port``)
    presents to a new TLS connection with ``client`` as client certificate (blocking)."""
    with tempfile.TemporaryDirectory() as tmp:
        chain, key, bundle = (Path(tmp) / n for n in ("c.pem", "k.pem", "b.pem"))
        chain.write_bytes(client.chain_pem)
        key.write_bytes(client.key_pem)
        bundle.write_bytes(client.bundle_pem)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False  # the SPIFFE ID is what matters, checked by the caller
        ctx.load_verify_locations(str(bundle))
        ctx.load_cert_chain(str(chain), str(key))
    ctx.set_alpn_protocols(["h2"])
    if url.startswith("unix://"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(url[len("unix://"):])
    else:
        host, port = url[len("tcp://"):].rsplit(":", 1)
        sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
    with ctx.wrap_socket(sock) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


async def presented_serial(url: str, client: Svid) -> int:
    return (await asyncio.to_thread(presented, url, client)).serial_number


# -- SVID files as the tools write them ---------------------------------------------------------

SPIFFE_HELPER = ("svid.pem", "svid_key.pem", "svid_bundle.pem")
CSI_DRIVER = ("tls.crt", "tls.key", "ca.crt")


def pems(svid: Svid) -> tuple[bytes, bytes, bytes]:
    return svid.chain_pem, svid.key_pem, svid.bundle_pem


def write_in_place(path: Path, data: bytes) -> None:
    """Truncate and write (what spiffe-helper does, file after file)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_spiffe_helper(directory: Path, svid: Svid, *, only: tuple[str, ...] | None = None) -> None:
    """spiffe-helper's layout, each file rewritten in place (``only``: just those names)."""
    for name, data in zip(SPIFFE_HELPER, pems(svid), strict=True):
        if only is None or name in only:
            write_in_place(directory / name, data)


def write_csi_driver(directory: Path, svid: Svid) -> None:
    """csi-driver-spiffe's layout, written as kubelet's atomic writer does: the files in a new
    timestamped directory, ``..data`` swapped to it by a rename, ``tls.crt`` etc. symlinks into
    ``..data``; the previous directory removed."""
    stamp = f"..{dt.datetime.now(dt.UTC):%Y_%m_%d_%H_%M_%S.%f}"
    fresh = directory / stamp
    fresh.mkdir()
    for name, data in zip(CSI_DRIVER, pems(svid), strict=True):
        write_in_place(fresh / name, data)
    data_link = directory / "..data"
    old = os.readlink(data_link) if data_link.is_symlink() else None
    tmp = directory / "..data_tmp"
    os.symlink(stamp, tmp)
    os.rename(tmp, data_link)
    for name in CSI_DRIVER:
        if not (directory / name).is_symlink():
            os.symlink(f"..data/{name}", directory / name)
    if old is not None:
        for child in (directory / old).iterdir():
            child.unlink()
        (directory / old).rmdir()


# -- a fake SPIFFE Workload API ----------------------------------------------------------------


def response(svid: Svid) -> workload_pb2.X509SVIDResponse:
    """What a SPIRE agent streams for one SVID (DER chain, PKCS#8 DER key, DER bundle)."""
    der = serialization.Encoding.DER
    return workload_pb2.X509SVIDResponse(svids=[workload_pb2.X509SVID(
        spiffe_id=svid.id,
        x509_svid=b"".join(c.public_bytes(der) for c in svid.chain),
        x509_svid_key=svid.key.private_bytes(der, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()),
        bundle=b"".join(c.public_bytes(der) for c in svid.bundle))])


class FakeWorkloadApi(workload_pb2_grpc.SpiffeWorkloadAPIServicer):
    """``SpiffeWorkloadAPI.FetchX509SVID`` as a SPIRE agent serves it: each stream gets the
    current SVID, then every one :meth:`push` sets; a request without the workload header is
    refused as SPIRE does (INVALID_ARGUMENT)."""

    def __init__(self, path: str, first: Svid) -> None:
        self.path = path
        self.url = f"unix://{path}"
        self.current = response(first)
        self.metadata: list[dict[str, str]] = []
        self.refused = 0
        self._streams: set[asyncio.Queue[workload_pb2.X509SVIDResponse]] = set()
        self._server = grpc.aio.server()
        workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(self, self._server)

    @property
    def streams(self) -> int:
        return len(self._streams)

    async def start(self) -> FakeWorkloadApi:
        self._server.add_insecure_port(f"unix:{self.path}")
        await self._server.start()
        return self

    async def stop(self) -> None:
        await self._server.stop(0)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def push(self, svid: Svid) -> None:
        self.current = response(svid)
        for queue in list(self._streams):
            queue.put_nowait(self.current)

    async def FetchX509SVID(self, request: workload_pb2.X509SVIDRequest,
                            context: grpc.aio.ServicerContext
                            ) -> AsyncIterator[workload_pb2.X509SVIDResponse]:
        metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        self.metadata.append(metadata)
        if metadata.get(WORKLOAD_HEADER[0]) != WORKLOAD_HEADER[1]:
            self.refused += 1
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "security header missing from request")
        queue: asyncio.Queue[workload_pb2.X509SVIDResponse] = asyncio.Queue()
        self._streams.add(queue)
        try:
            yield self.current
            while True:
                yield await queue.get()
        finally:
            self._streams.discard(queue)


# -- identities a CA would not issue -------------------------------------------------------------


class StaticSource(SvidSource):
    """One given SVID, never renewed (forged, expired or foreign identities for refusals)."""

    def __init__(self, svid: Svid) -> None:
        super().__init__()
        self._given = svid

    async def start(self) -> None:
        self._set(self._given)


def forge(ca: CertificateAuthority, uri: str | None, *, dns: str, lifetime: float = 3600.0,
          age: float = 60.0, bundle: tuple[x509.Certificate, ...] | None = None) -> Svid:
    """A leaf signed by ``ca`` with URI SAN ``uri`` (None: none) whatever its trust domain,
    valid from ``age`` seconds ago for ``lifetime`` seconds; its bundle ``bundle`` (default
    the CA)."""
    key = ec.generate_private_key(ec.SECP256R1())
    start = now() - dt.timedelta(seconds=age)
    sans: list[x509.GeneralName] = [x509.DNSName(dns)]
    if uri is not None:
        sans.insert(0, x509.UniformResourceIdentifier(uri))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, uri or "no id")]))
            .issuer_name(ca.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + dt.timedelta(seconds=lifetime))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .sign(ca.key, hashes.SHA256()))
    if uri is None:  # Svid insists on an ID: build it around one, then swap the certificate in
        holder = Svid.__new__(Svid)
        object.__setattr__(holder, "chain", (cert,))
        object.__setattr__(holder, "key", key)
        object.__setattr__(holder, "spiffe_id", parse_id(f"spiffe://{dns}/what-it-claims-locally"))
        object.__setattr__(holder, "bundle", bundle or (ca.cert,))
        object.__setattr__(holder, "chain_pem", cert.public_bytes(serialization.Encoding.PEM))
        object.__setattr__(holder, "key_pem", key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        object.__setattr__(holder, "bundle_pem", b"".join(
            c.public_bytes(serialization.Encoding.PEM) for c in (bundle or (ca.cert,))))
        return holder
    return Svid((cert,), key, bundle or (ca.cert,))


def refused_identities(ca: CertificateAuthority) -> dict[str, Svid]:
    """Client identities a secure server of ``ca`` (trust domain nsm.lab) must refuse; each
    trusts ``ca`` for the server's certificate, so only the server's check refuses it
    (the identity-source tests and the metrics listener's)."""
    other = CertificateAuthority.create("other.example")
    impostor = CertificateAuthority.create(TD)  # another authority calling itself nsm.lab
    return {
        "another trust domain's CA": forge(other, "spiffe://other.example/ns/default/pod/x", dns=TD,
                                           bundle=(ca.cert,)),
        "another CA of the same name": forge(impostor, f"spiffe://{TD}/ns/default/pod/x", dns=TD,
                                             bundle=(ca.cert,)),
        "our CA, another trust domain's ID": forge(ca, "spiffe://other.example/ns/default/pod/x", dns=TD),
        "our CA, no SPIFFE ID": forge(ca, None, dns=TD),
        "expired": forge(ca, f"spiffe://{TD}/ns/default/pod/x", dns=TD, age=7200, lifetime=3600),
    }

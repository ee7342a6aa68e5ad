"""Where an SVID comes from (issue 9, item 1): the built-in CA's SVIDs, PEM files in the layouts
spiffe-helper and cert-manager's csi-driver-spiffe write (reloaded when they are rewritten; a
half-written set skipped), and the SPIFFE Workload API (a fake SPIRE agent: a real gRPC server on
a unix socket streaming a first SVID, then a rotated one). Real ``nsm registry`` processes take
their identity from files (``--svid-dir``) and from the Workload API (``--spiffe-socket`` or
``SPIFFE_ENDPOINT_SOCKET``), and keep serving after a rotation: new connections get the new
certificate, an old live channel (and a watch stream on it) keeps working."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from security_ids import TD  # type: ignore[import-not-found]
from tls_probe import (  # type: ignore[import-not-found]
    CSI_DRIVER,
    SPIFFE_HELPER,
    WORKLOAD_HEADER,
    FakeWorkloadApi,
    StaticSource,
    forge,
    presented_serial,
    refused_identities,
    write_csi_driver,
    write_spiffe_helper,
)

from nsm.api.registry_pb2 import NetworkServiceEndpoint
from nsm.errors import FailedPrecondition, NsmError
from nsm.lab.processes import Daemon, daemon_env, tail
from nsm.registry.client import RegistryClient
from nsm.security import prove
from nsm.security.ca import DEFAULT_SVID_TTL, CertificateAuthority
from nsm.security.ids import identity_name, registry_id
from nsm.security.options import add_security_flags, security_from_args
from nsm.security.sources import CaSource, FilesSource, WorkloadApiSource
from nsm.security.svid import Svid
from nsm.security.tls import Security
from nsm.transport import Server, dial

pytestmark = pytest.mark.timeout(60)

POLL = 0.1
#: "Within a couple of poll intervals", with room for a loaded machine.
PICKUP = 2 * POLL + 1.5
REG = registry_id(TD)
CLIENT = f"spiffe://{TD}/test/sources-client"


def svid_of(ca: CertificateAuthority, spiffe_id: str = REG, ttl: float = DEFAULT_SVID_TTL) -> Svid:
    return ca.issue(spiffe_id, ttl=ttl, dns_names=(TD,))


def serial(svid: Svid) -> int:
    return svid.chain[0].serial_number


async def until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.1f} s")
        await asyncio.sleep(0.02)


@pytest.fixture
def src_dir(nsm_run_prefix: str) -> Iterator[Path]:
    """A short directory (unix sockets go into it) named by the run, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix=f"{nsm_run_prefix}-ids-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def src_files() -> AsyncIterator[Callable[..., Any]]:
    """``await watch(directory, svid, write)``: ``svid`` written into ``directory`` by ``write``
    (default spiffe-helper's way), a started FilesSource of it polling every :data:`POLL` and
    the list its subscriber appends rotations to; closed at the end of the test."""
    made: list[FilesSource] = []

    async def watch(directory: Path, svid: Svid, write: Callable[[Path, Svid], None] = write_spiffe_helper,
                    ) -> tuple[FilesSource, list[Svid]]:
        write(directory, svid)
        source = FilesSource.directory(directory, poll=POLL, trust_domain=TD)
        made.append(source)
        got: list[Svid] = []
        source.subscribe(got.append)
        await source.start()
        assert serial(source.svid) == serial(svid) and source.svid.id == svid.id
        return source, got

    yield watch
    for source in made:
        await source.close()


# -- the built-in CA --------------------------------------------------------------------------


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_security_flags(parser)
    return parser.parse_args(list(argv))


async def test_built_in_ca_svids_are_short_lived_p256_with_uri_and_dns_sans_for_client_and_server(
        src_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("NSM_SVID_TTL", "NSM_SPIFFE_SOCKET", "SPIFFE_ENDPOINT_SOCKET", "NSM_SVID_DIR"):
        monkeypatch.delenv(var, raising=False)
    for argv, ttl in (([], 3600.0), (["--svid-ttl", "90s"], 90.0)):
        security = security_from_args(_args("--ca-dir", str(src_dir / "ca"), "--trust-domain", TD, *argv),
                                      REG)
        async with security:
            leaf = security.svid.chain[0]
            left = (leaf.not_valid_after_utc - dt_now()).total_seconds()
            assert ttl - 5 <= left <= ttl + 1, (argv, left)
            assert leaf.not_valid_before_utc <= dt_now()
            key = leaf.public_key()
            assert isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)
            san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            assert san.get_values_for_type(x509.UniformResourceIdentifier) == [REG]
            # The TLS server name, and the identity's own name under it.
            assert san.get_values_for_type(x509.DNSName) == [TD, identity_name(REG, TD)]
            eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
            assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
            assert leaf.signature_hash_algorithm is not None
            assert isinstance(leaf.signature_hash_algorithm, hashes.SHA256)
            assert security.svid.bundle[0].subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert DEFAULT_SVID_TTL == 3600.0


def dt_now() -> Any:
    from nsm.security.svid import now
    return now()


# -- PEM files ------------------------------------------------------------------------------


LAYOUTS = {"spiffe-helper": (SPIFFE_HELPER, write_spiffe_helper),
           "csi-driver-spiffe": (CSI_DRIVER, write_csi_driver)}


@pytest.mark.parametrize("layout", list(LAYOUTS))
async def test_files_of_either_layout_are_read_and_a_rewrite_is_picked_up(
        layout: str, src_dir: Path, ca: CertificateAuthority, src_files: Callable[..., Any]) -> None:
    names, write = LAYOUTS[layout]
    source, got = await src_files(src_dir, svid_of(ca), write)
    assert [p.name for p in source.paths] == list(names)
    assert not got  # the first SVID is no rotation
    for _ in range(2):  # two rotations: new key and certificate from the same CA
        fresh = svid_of(ca)
        t0 = time.monotonic()
        write(src_dir, fresh)
        await until(lambda fresh=fresh: got and serial(got[-1]) == serial(fresh), PICKUP,
                    f"{layout}: the rewritten files picked up")
        assert time.monotonic() - t0 <= PICKUP
        assert serial(source.svid) == serial(fresh)
        assert source.svid.key.private_numbers() == fresh.key.private_numbers()
    assert len(got) == 2


async def test_a_half_written_set_is_skipped_and_the_complete_one_taken(
        src_dir: Path, ca: CertificateAuthority, src_files: Callable[..., Any]) -> None:
    first = svid_of(ca)
    source, got = await src_files(src_dir, first)
    fresh = svid_of(ca)
    # The key first: it does not match the certificate still there.
    write_spiffe_helper(src_dir, fresh, only=("svid_key.pem",))
    await asyncio.sleep(5 * POLL)
    assert not got and serial(source.svid) == serial(first)
    # A certificate half written (cut in the middle of its PEM).
    (src_dir / "svid.pem").write_bytes(fresh.chain_pem[: len(fresh.chain_pem) // 2])
    await asyncio.sleep(5 * POLL)
    assert not got and serial(source.svid) == serial(first)
    # Now complete.
    write_spiffe_helper(src_dir, fresh, only=("svid.pem",))
    await until(lambda: got, PICKUP, "the completed set picked up")
    assert [serial(s) for s in got] == [serial(fresh)]


async def test_the_watch_survives_files_that_are_no_svid(
        src_dir: Path, ca: CertificateAuthority, src_files: Callable[..., Any]) -> None:
    """A certificate without a SPIFFE ID (a writer's mistake, or the wrong file copied in) is
    refused, and the watch goes on: the next correct set is taken."""
    first = svid_of(ca)
    source, got = await src_files(src_dir, first)
    write_spiffe_helper(src_dir, forge(ca, None, dns=TD))  # signed by the CA, but no SPIFFE ID
    await asyncio.sleep(5 * POLL)
    assert not got and serial(source.svid) == serial(first)
    fresh = svid_of(ca)
    write_spiffe_helper(src_dir, fresh)
    await until(lambda: got, PICKUP, "the correct set after a wrong one picked up")
    assert serial(got[-1]) == serial(fresh)


async def test_files_rewritten_with_the_same_svid_are_no_rotation(
        src_dir: Path, ca: CertificateAuthority, src_files: Callable[..., Any]) -> None:
    """spiffe-helper rewrites the files whenever the agent sends an update (a bundle change,
    a restart): the same SVID again makes no subscriber renew its channels."""
    first = svid_of(ca)
    _, got = await src_files(src_dir, first)
    write_spiffe_helper(src_dir, first)
    await asyncio.sleep(0.02)
    write_spiffe_helper(src_dir, first, only=("svid_bundle.pem",))
    await asyncio.sleep(6 * POLL)
    assert got == []
    fresh = svid_of(ca)
    write_spiffe_helper(src_dir, fresh)
    await until(lambda: got, PICKUP, "a real rotation after a rewrite of the same SVID")


async def test_files_of_another_trust_domain_or_no_files_are_refused_clearly(
        src_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPIFFE_ENDPOINT_SOCKET", raising=False)
    other = CertificateAuthority.create("other.example")
    write_spiffe_helper(src_dir, other.issue("spiffe://other.example/nsm/registry", dns_names=(TD,)))
    security = security_from_args(_args("--svid-dir", str(src_dir), "--trust-domain", TD), REG)
    with pytest.raises(FailedPrecondition, match=r"not of trust domain nsm\.lab"):
        await security.start()
    empty = src_dir / "empty"
    empty.mkdir()
    with pytest.raises(FailedPrecondition, match=r"no SVID files in .*svid\.pem.*tls\.crt"):
        security_from_args(_args("--svid-dir", str(empty), "--trust-domain", TD), REG)


# -- real daemons ------------------------------------------------------------------------------


class Registry:
    """``nsm registry`` as a real process on two unix sockets (one credentials object each)."""

    def __init__(self, base: Path, client: Security, *flags: str, env: dict[str, str] | None = None) -> None:
        self.urls = [f"unix://{base}/reg-a.sock", f"unix://{base}/reg-b.sock"]
        self.log = base / "registry.log"
        args = ["registry", "--listen", *self.urls, "--trust-domain", TD, "--policy-off", "url",
                "--ca-dir", str(base / "no-ca"), *flags]
        self.daemon = Daemon("registry", args, url=self.urls[0], log_path=self.log, security=client,
                             env={"SPIFFE_ENDPOINT_SOCKET": "", **(env or {})})

    def logs(self) -> str:
        return tail(self.log, 60)


@pytest.fixture
async def src_registry() -> AsyncIterator[Callable[..., Any]]:
    """``await start(base, client, *flags)``: a started :class:`Registry`, stopped at the end."""
    started: list[Registry] = []

    async def start(base: Path, client: Security, *flags: str, env: dict[str, str] | None = None) -> Registry:
        reg = Registry(base, client, *flags, env=env)
        started.append(reg)
        try:
            await reg.daemon.start(timeout=20)
        except BaseException:
            print(reg.logs())
            raise
        return reg

    yield start
    for reg in started:
        await reg.daemon.stop()


async def assert_identity(reg: Registry, client: Security, svid: Svid) -> None:
    """Every listener of ``reg`` presents ``svid`` to a new connection and proves its ID, and a
    new gRPC channel works."""
    for url in reg.urls:
        assert await presented_serial(url, client.svid) == serial(svid), (url, reg.logs())
        channel = dial(url, client)
        try:
            sid, cert = await prove.prove(channel, client)
            assert str(sid) == svid.id and cert.serial_number == serial(svid)
            assert await RegistryClient(channel, security=client).find_nse(timeout=5) is not None
        finally:
            await channel.close()


async def rotation_keeps_the_old_channel(reg: Registry, client: Security, rotate: Callable[[], Svid],
                                         ) -> None:
    """A channel and a watch stream opened before ``rotate()``: after it new connections get
    the new SVID on every listener, and the old channel and its stream still work."""
    old = dial(reg.urls[1], client)
    try:
        registry = RegistryClient(old, security=client)
        await registry.find_nse(timeout=5)
        async with registry.watch_nse() as watch:
            fresh = rotate()
            await until_presented(reg, client, fresh)
            await assert_identity(reg, client, fresh)
            await registry.register_nse(NetworkServiceEndpoint(
                name="after-rotation", url="tcp://192.0.2.1:5001", network_service_names=["s"]),
                timeout=5)
            nse, deleted = await asyncio.wait_for(watch.__anext__(), 5)
            assert nse.name == "after-rotation" and not deleted
        assert [n.name for n in await registry.find_nse(timeout=5)] == ["after-rotation"]
    finally:
        await old.close()


async def until_presented(reg: Registry, client: Security, svid: Svid, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while await presented_serial(reg.urls[0], client.svid) != serial(svid):
        assert time.monotonic() < deadline, f"the new SVID is not served\n{reg.logs()}"
        await asyncio.sleep(0.1)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("layout", list(LAYOUTS))
async def test_a_daemon_serves_with_the_files_identity_and_through_their_rotation(
        layout: str, src_dir: Path, ca: CertificateAuthority, identity: Any,
        src_registry: Callable[..., Any]) -> None:
    _, write = LAYOUTS[layout]
    svids = src_dir / "svid"
    svids.mkdir()
    first = svid_of(ca)
    write(svids, first)
    client = await identity(CLIENT)
    reg = await src_registry(src_dir, client, "--svid-dir", str(svids))
    await assert_identity(reg, client, first)
    assert "SVID" not in reg.logs() or "rotated" not in reg.logs()

    def rotate() -> Svid:
        fresh = svid_of(ca)
        write(svids, fresh)
        return fresh

    await rotation_keeps_the_old_channel(reg, client, rotate)
    assert "SVID rotated" in reg.logs()


# -- the SPIFFE Workload API --------------------------------------------------------------------


@pytest.fixture
async def src_agent(src_dir: Path, ca: CertificateAuthority) -> AsyncIterator[FakeWorkloadApi]:
    """A fake SPIRE agent at ``<src_dir>/agent.sock`` handing out SVIDs of the registry's ID."""
    api = await FakeWorkloadApi(str(src_dir / "agent.sock"), svid_of(ca)).start()
    yield api
    await api.stop()


async def test_workload_api_source_gets_the_svid_then_its_rotation(
        src_agent: FakeWorkloadApi, ca: CertificateAuthority) -> None:
    first = svid_of(ca)
    src_agent.push(first)
    source = WorkloadApiSource(src_agent.url, trust_domain=TD, timeout=5)
    got: list[Svid] = []
    source.subscribe(got.append)
    with warnings.catch_warnings(record=True) as warned:  # py-spiffe's deprecated accessors
        warnings.simplefilter("always")                    # are not used
        await source.start()
    try:
        assert not [w for w in warned if issubclass(w.category, DeprecationWarning)], \
            [str(w.message) for w in warned]
        assert serial(source.svid) == serial(first) and source.svid.id == REG
        assert [c.serial_number for c in source.svid.bundle] == [ca.cert.serial_number]
        assert src_agent.metadata and all(m.get(WORKLOAD_HEADER[0]) == WORKLOAD_HEADER[1]
                                          for m in src_agent.metadata)
        assert not got
        src_agent.push(first)  # the same SVID again (e.g. a bundle update elsewhere): no rotation
        fresh = svid_of(ca)
        await asyncio.sleep(0.3)
        src_agent.push(fresh)
        await until(lambda: got, 5, "the rotation through the Workload API")
        assert [serial(s) for s in got] == [serial(fresh)]
        assert serial(source.svid) == serial(fresh)
    finally:
        await source.close()
    await until(lambda: src_agent.streams == 0, 5, "the stream to the agent closed")


async def test_workload_api_svid_of_another_trust_domain_or_no_agent_is_refused(
        src_agent: FakeWorkloadApi, src_dir: Path) -> None:
    other = CertificateAuthority.create("other.example")
    src_agent.push(other.issue("spiffe://other.example/nsm/registry", dns_names=(TD,)))
    source = WorkloadApiSource(src_agent.url, trust_domain=TD, timeout=5)
    with pytest.raises(FailedPrecondition, match=r"not an SVID of trust domain nsm\.lab"):
        await source.start()
    await until(lambda: src_agent.streams == 0, 5, "the refused source's stream closed")
    missing = WorkloadApiSource(f"unix://{src_dir}/none.sock", trust_domain=TD, timeout=2)
    with pytest.raises(FailedPrecondition, match=r"none\.sock"):
        await missing.start()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("how", ["flag", "SPIFFE_ENDPOINT_SOCKET"])
async def test_a_daemon_takes_its_identity_from_the_workload_api_and_its_rotations(
        how: str, src_dir: Path, src_agent: FakeWorkloadApi, ca: CertificateAuthority, identity: Any,
        src_registry: Callable[..., Any]) -> None:
    first = svid_of(ca)
    src_agent.push(first)
    client = await identity(CLIENT)
    if how == "flag":
        reg = await src_registry(src_dir, client, "--spiffe-socket", src_agent.url)
    else:
        reg = await src_registry(src_dir, client, env={"SPIFFE_ENDPOINT_SOCKET": src_agent.url})
    await assert_identity(reg, client, first)
    assert src_agent.streams == 1

    def rotate() -> Svid:
        fresh = svid_of(ca)
        src_agent.push(fresh)
        return fresh

    await rotation_keeps_the_old_channel(reg, client, rotate)


# -- who is refused, at the transport ------------------------------------------------------------


class Counted:
    """A secure in-process server with one method that counts the calls reaching it."""

    def __init__(self) -> None:
        self.hits = 0

    def add(self, server: Server) -> None:
        async def hit(request: bytes, context: Any) -> bytes:
            self.hits += 1
            return b"ok"

        server.grpc.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "test.Count", {"Hit": grpc.unary_unary_rpc_method_handler(hit)}),))


async def call_hit(channel: grpc.aio.Channel) -> grpc.StatusCode:
    try:
        await channel.unary_unary("/test.Count/Hit")(b"", timeout=3)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def health_code(channel: grpc.aio.Channel) -> grpc.StatusCode:
    try:
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


#: What each is refused with: at the handshake (UNAVAILABLE) or, for a certificate our CA signed
#: whose ID is not of the trust domain, before any servicer (UNAUTHENTICATED).
REFUSAL = {"another trust domain's CA": grpc.StatusCode.UNAVAILABLE,
           "another CA of the same name": grpc.StatusCode.UNAVAILABLE,
           "our CA, another trust domain's ID": grpc.StatusCode.UNAUTHENTICATED,
           "our CA, no SPIFFE ID": grpc.StatusCode.UNAUTHENTICATED,
           "expired": grpc.StatusCode.UNAVAILABLE}


@contextlib.asynccontextmanager
async def refused_callers(ca: CertificateAuthority, url: str
                          ) -> AsyncIterator[list[tuple[str, grpc.StatusCode, grpc.aio.Channel]]]:
    """Channels to ``url`` of every caller to refuse, plaintext first, with the code each must
    get: ``(what, code, channel)``; closed (and their identities) at the end."""
    made: list[Security] = []
    callers = [("plaintext", grpc.StatusCode.UNAVAILABLE, dial(url))]
    try:
        for what, svid in refused_identities(ca).items():
            security = Security(StaticSource(svid), trust_domain=TD)
            await security.start()
            made.append(security)
            callers.append((what, REFUSAL[what], dial(url, security)))
        yield callers
    finally:
        for _, _, channel in callers:
            await channel.close()
        for security in made:
            await security.close()


async def test_plaintext_foreign_forged_and_expired_callers_never_reach_a_servicer(
        ca: CertificateAuthority, identity: Any, nsm_run_prefix: str) -> None:
    server_sec = await identity(REG)
    counted = Counted()
    server = Server([f"unix:///tmp/{nsm_run_prefix}-refuse.sock", "tcp://127.0.0.1:0"], security=server_sec)
    counted.add(server)
    await server.start()
    try:
        for url in map(str, server.urls):
            good = dial(url, await identity(CLIENT))
            try:
                assert await call_hit(good) == grpc.StatusCode.OK
            finally:
                await good.close()
            async with refused_callers(ca, url) as callers:
                for what, code, channel in callers:
                    assert await call_hit(channel) == code, (url, what)
                    assert await health_code(channel) == code, (url, what)
        assert counted.hits == 2  # the good caller's, one per listener
    finally:
        await server.stop(0)


@pytest.mark.timeout(90)
async def test_a_secure_daemon_refuses_plaintext_foreign_and_forged_callers(
        src_dir: Path, src_registry: Callable[..., Any]) -> None:
    """A real ``nsm registry`` with its built-in CA: a plaintext client, one of another CA and
    one whose certificate that CA signed for another trust domain's ID are refused; a client
    of the CA is served."""
    ca_dir = src_dir / "ca"
    ca = CertificateAuthority.open(ca_dir, TD)
    good = Security(CaSource(ca, CLIENT, trust_domain=TD, dns_names=(TD,)), trust_domain=TD)
    await good.start()
    try:
        reg = await src_registry(src_dir, good, "--ca-dir", str(ca_dir))
        for url in reg.urls:
            channel = dial(url, good)
            try:
                assert await RegistryClient(channel, security=good).find_nse(timeout=5) == []
            finally:
                await channel.close()
            async with refused_callers(ca, url) as callers:
                for what, code, channel in callers:
                    with pytest.raises(NsmError) as err:
                        await RegistryClient(channel).find_nse(timeout=5)
                    assert err.value.code.name == code.name, (what, err.value)
        assert reg.daemon.running
    finally:
        await good.close()


@pytest.mark.timeout(60)
async def test_insecure_is_logged_loudly_and_a_foreign_spiffe_id_is_a_clear_error(
        src_dir: Path) -> None:
    sock = f"unix://{src_dir}/insecure.sock"
    log = src_dir / "insecure.log"
    daemon = Daemon("registry", ["registry", "--insecure", "--listen", sock], url=sock, log_path=log,
                    env={"SPIFFE_ENDPOINT_SOCKET": ""})
    await daemon.start(timeout=20)
    try:
        warned = [line for line in log.read_text().splitlines() if "insecure" in line]
        assert warned and any("warn" in line.lower() for line in warned), log.read_text()
    finally:
        await daemon.stop()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nsm.cli", "registry", "--listen", f"unix://{src_dir}/bad.sock",
        "--ca-dir", str(src_dir / "ca"), "--trust-domain", TD,
        "--spiffe-id", "spiffe://other.example/nsm/registry",
        env=daemon_env({"SPIFFE_ENDPOINT_SOCKET": ""}), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    text = out.decode()
    assert proc.returncode not in (0, None), text
    assert "spiffe://other.example/nsm/registry is not of trust domain nsm.lab" in text, text
    assert "Traceback" not in text, text
    assert not (src_dir / "bad.sock").exists()

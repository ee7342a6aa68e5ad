"""A client that knows whom to expect at its manager URL (``nsm nsc --manager-id``): the TLS
handshake proves the manager's identity (its SVID carries the identity's own DNS name), so the
client signs its token at once, with no ``Prove`` round trip; the manager's certificate comes
with its answer and verifies its token. Any other identity is refused before a Request leaves
the client; a manager whose SVID lacks the name (a SPIRE entry without it) proves itself by the
round trip instead, and must still be the expected identity.

In-process: a real secure gRPC server (:class:`nsm.transport.Server`) serving a manager-like
chain (its path segment, the token element), and the client chain's real ``ManagerConnect``
over :class:`nsm.transport.Channels`."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from security_ids import TD  # type: ignore[import-not-found]
from tls_probe import StaticSource, forge  # type: ignore[import-not-found]

from nsm.chain import Chain, Ctx, Element, NextRequest
from nsm.client.chain import new_request
from nsm.client.connect import ManagerConnect
from nsm.elements.tokens import PathTokens
from nsm.elements.updatepath import UpdatePath
from nsm.errors import Unauthenticated
from nsm.role import network_service
from nsm.security import prove
from nsm.security.ca import CertificateAuthority
from nsm.security.ids import MANAGER, identity_name, node_id, parse_id, workload_id
from nsm.security.policy import Policies
from nsm.security.svid import Svid
from nsm.security.tls import Security
from nsm.transport import Channels, Server

pytestmark = pytest.mark.timeout(30)

MGR = node_id(TD, "node1", MANAGER)
OTHER_MGR = node_id(TD, "node2", MANAGER)
POD = workload_id(TD, "pod-a")


class Served(Element):
    """Counts the Requests that reached the chain's tail."""

    def __init__(self) -> None:
        self.requests = 0

    async def request(self, ctx: Ctx, request: Any, next: NextRequest) -> Any:
        self.requests += 1
        return await next(ctx, request)


class Proves:
    """Counts the client's Prove round trips (the module function Channels calls)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = prove.prove

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return await real(*args, **kwargs)

        monkeypatch.setattr(prove, "prove", counted)


@contextlib.asynccontextmanager
async def manager(svid: Svid) -> AsyncIterator[tuple[str, Served]]:
    """A secure server at a fresh unix socket with ``svid``, serving a manager's token chain."""
    security = Security(StaticSource(svid), trust_domain=TD, server_name=TD)
    await security.start()
    served = Served()
    chain = Chain([UpdatePath("node1"), PathTokens(security, Policies(), last_hop=True), served],
                  name="manager")
    with tempfile.TemporaryDirectory(prefix="nsm-pin-") as tmp:
        url = f"unix://{Path(tmp) / 'mgr.sock'}"
        server = Server([url], security=security)
        server.add(network_service(chain, security))
        await server.start()
        try:
            yield url, served
        finally:
            await server.stop(None)
            await security.close()


@contextlib.asynccontextmanager
async def client(identity: Any, url: str, expect: str | None
                 ) -> AsyncIterator[tuple[ManagerConnect, Channels]]:
    security = await identity(POD)
    channels = Channels(security=security)
    if expect is not None:
        channels.expect(url, expect)
    try:
        yield ManagerConnect(channels, url, timeout=5.0), channels
    finally:
        await channels.close()


async def request(connect: ManagerConnect) -> Any:
    req = new_request(service="blue", name="pod-a", mechanisms=[])
    return await connect.request(Ctx(chain=Chain([], name="client")), req, None)  # type: ignore[arg-type]


def without_identity_name(ca: CertificateAuthority, spiffe_id: str) -> Svid:
    """An SVID of ``spiffe_id`` carrying only the common server name (as a SPIRE entry without
    the identity's DNS name would be)."""
    return forge(ca, spiffe_id, dns=TD)


def dns_names(cert: x509.Certificate) -> list[str]:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName)


async def test_the_built_in_ca_puts_the_identitys_own_name_in_every_svid(ca: CertificateAuthority) -> None:
    svid = ca.issue(MGR, dns_names=(TD,))
    assert dns_names(svid.chain[0]) == [TD, f"manager.node1.{TD}"]
    pod = ca.issue(POD, dns_names=(TD,))
    assert dns_names(pod.chain[0])[1].startswith("id-") and dns_names(pod.chain[0])[1].endswith(f".{TD}")
    ids = (MGR, OTHER_MGR, POD, node_id(TD, "node1", "forwarder"), node_id(TD, "Node_1", MANAGER),
           node_id(TD, "manager.node1", MANAGER))
    names = {identity_name(i, TD) for i in ids}
    assert len(names) == 6  # distinct identities, distinct names (a node name unfit for DNS: hashed)
    assert identity_name(node_id(TD, "Node_1", MANAGER), TD).startswith("id-")  # type: ignore[union-attr]
    assert identity_name(MGR, "x" * 250) is None  # too long for DNS: the name is left out


async def test_an_expected_manager_is_proven_by_the_handshake_with_no_round_trip(
        ca: CertificateAuthority, identity: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    proves = Proves(monkeypatch)
    checks = []
    real_check = prove.chain_from
    monkeypatch.setattr(prove, "chain_from", lambda *a, **k: checks.append(1) or real_check(*a, **k))
    async with manager(ca.issue(MGR, dns_names=(TD,))) as (url, served), \
            client(identity, url, MGR) as (connect, channels):
        assert channels.named(url)
        conn = await request(connect)
        assert served.requests == 1
        assert proves.calls == 0
        # The manager's token for its segment was checked against the certificate it sent.
        assert conn.path.path_segments[1].token
        sid, cert = await channels.peer(url)
        assert str(sid) == MGR and cert is not None
        await request(connect)
        assert proves.calls == 0 and served.requests == 2
        assert len(checks) == 1  # the same chain again (a refresh): not checked twice


async def test_after_a_rotation_the_managers_chain_is_checked_again(
        ca: CertificateAuthority, identity: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The chain a refresh skips checking is checked again once this client's SVID rotated (a
    rotation may bring another trust bundle)."""
    checks = []
    real_check = prove.chain_from
    monkeypatch.setattr(prove, "chain_from", lambda *a, **k: checks.append(1) or real_check(*a, **k))
    security = await identity(POD, ttl=2.0)  # renewed at half its life
    channels = Channels(security=security)
    try:
        async with manager(ca.issue(MGR, dns_names=(TD,))) as (url, served):
            channels.expect(url, MGR)
            connect = ManagerConnect(channels, url, timeout=5.0)
            await request(connect)
            await request(connect)
            assert len(checks) == 1
            generation = security.generation
            for _ in range(60):
                if security.generation > generation:
                    break
                await asyncio.sleep(0.05)
            assert security.generation > generation, "the SVID did not rotate"
            await request(connect)
            assert len(checks) == 2 and served.requests == 3
    finally:
        await channels.close()


async def test_without_an_expected_id_the_manager_proves_itself_by_a_round_trip(
        ca: CertificateAuthority, identity: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    proves = Proves(monkeypatch)
    async with manager(ca.issue(MGR, dns_names=(TD,))) as (url, served), \
            client(identity, url, None) as (connect, _):
        await request(connect)
        assert proves.calls == 1 and served.requests == 1


async def test_a_manager_of_another_identity_is_refused_before_any_request_reaches_it(
        ca: CertificateAuthority, identity: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    Proves(monkeypatch)
    async with manager(ca.issue(OTHER_MGR, dns_names=(TD,))) as (url, served), \
            client(identity, url, MGR) as (connect, _):
        with pytest.raises(Unauthenticated, match=f"is {OTHER_MGR}, not {MGR}"):
            await request(connect)
        assert served.requests == 0


async def test_a_manager_whose_svid_lacks_the_name_proves_itself_and_must_still_be_expected(
        ca: CertificateAuthority, identity: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    proves = Proves(monkeypatch)
    async with manager(without_identity_name(ca, MGR)) as (url, served), \
            client(identity, url, MGR) as (connect, channels):
        conn = await request(connect)
        assert conn.path.path_segments[1].token
        assert served.requests == 1 and proves.calls == 1
        assert not channels.named(url)  # from now on by the round trip
    async with manager(without_identity_name(ca, OTHER_MGR)) as (url, served), \
            client(identity, url, MGR) as (connect, _):
        with pytest.raises(Unauthenticated, match=f"is {OTHER_MGR}, not {MGR}"):
            await request(connect)
        assert served.requests == 0


async def test_a_chain_sent_with_an_answer_must_be_of_the_trust_domain_and_the_expected_id(
        ca: CertificateAuthority, identity: Any) -> None:
    me = await identity(POD)
    good = ca.issue(MGR, dns_names=(TD,))
    metadata = [(prove.CHAIN_HEADER, c.public_bytes(Encoding.DER)) for c in good.chain]
    assert prove.chain_from(metadata, me, parse_id(MGR)) == good.chain[0]
    assert prove.chain_from([], me, parse_id(MGR)) is None
    with pytest.raises(Unauthenticated, match="not of"):
        prove.chain_from(metadata, me, parse_id(OTHER_MGR))
    foreign = CertificateAuthority.create(TD).issue(MGR, dns_names=(TD,))
    with pytest.raises(Unauthenticated, match="authority"):
        prove.chain_from([(prove.CHAIN_HEADER, c.public_bytes(Encoding.DER)) for c in foreign.chain],
                         me, parse_id(MGR))
    with pytest.raises(Unauthenticated, match="malformed"):
        prove.chain_from([(prove.CHAIN_HEADER, b"\x30\x03abc")], me, parse_id(MGR))
    with pytest.raises(Unauthenticated, match="too large"):
        prove.chain_from([(prove.CHAIN_HEADER, b"x" * (prove.MAX_ANSWER + 1))], me, parse_id(MGR))


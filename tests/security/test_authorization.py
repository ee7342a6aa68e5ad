"""Authorization over real gRPC with secure in-process roles (mTLS with SVIDs of an in-memory
CA): the endpoint as forwarders call it (path tokens, each token policy, who holds a
connection, who may call at all, who sees what in the monitor) and the manager (only forwarders
ask for REMOTE mechanisms). Each attack is refused with PERMISSION_DENIED (or, without an SVID of
the trust domain, at the TLS handshake) and leaves nothing behind."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import jwt
import pytest
from security_ids import EVIL, FWD1, FWD2, MGR1, MGR2, NSC, NSE, TD  # type: ignore[import-not-found]

from nsm.api import connection_pb2_grpc, networkservice_pb2_grpc
from nsm.api.connection_pb2 import Connection, MonitorScopeSelector
from nsm.api.networkservice_pb2 import NetworkServiceRequest
from nsm.chain import Chain, Ctx, Element, NextRequest
from nsm.elements.begin import Begin
from nsm.elements.callers import NodeManagerOnly
from nsm.elements.connect import Connect
from nsm.elements.owner import Ownership
from nsm.elements.updatepath import UpdatePath, ts
from nsm.endpoint.endpoint import Endpoint
from nsm.errors import PermissionDenied
from nsm.manager.manager import Manager
from nsm.mechanisms import kernel, vxlan
from nsm.security.ca import CertificateAuthority
from nsm.security.ids import parse_id
from nsm.security.policy import Policies
from nsm.security.tls import Security
from nsm.security.tokens import TOKEN_HEADER, mint, verify
from nsm.transport import Channels, dial

pytestmark = pytest.mark.timeout(60)

OBSERVER = "spiffe://nsm.lab/test/observer"


async def _unused(ctx: Ctx, request: NetworkServiceRequest) -> Connection:
    raise AssertionError("Connect is the tail")


class Hop:
    """A forwarder-like caller: the real ``Connect`` element (signs its segment for the proven
    endpoint, checks the endpoint's token), and raw calls for attacks."""

    def __init__(self, security: Security, url: str) -> None:
        self.security = security
        self.url = url
        self.channels = Channels(security=security)
        self.connect = Connect(self.channels, url=lambda ctx, req: url)
        self.chain = Chain([self.connect], name="test-hop")
        self.ctx: dict[str, Ctx] = {}

    async def request(self, request: NetworkServiceRequest) -> Connection:
        ctx = self.ctx.setdefault(request.connection.id, self.chain.context())
        return await self.connect.request(ctx, request, _unused)

    async def close(self, conn: Connection) -> None:
        await self.connect.close(self.ctx[conn.id], conn, self.chain._close)

    def stub(self) -> networkservice_pb2_grpc.NetworkServiceStub:
        return networkservice_pb2_grpc.NetworkServiceStub(self.channels.get(self.url))

    async def raw(self, request: NetworkServiceRequest, token: str | None) -> Connection:
        metadata = [(TOKEN_HEADER, token)] if token is not None else []
        conn: Connection = await self.stub().Request(request, timeout=5, metadata=metadata)
        return conn

    async def monitor(self) -> dict[str, Connection]:
        call = connection_pb2_grpc.MonitorConnectionStub(self.channels.get(self.url)).MonitorConnections(
            MonitorScopeSelector())
        try:
            event = await asyncio.wait_for(call.read(), 5)
        finally:
            call.cancel()
        return dict(event.connections)

    async def aclose(self) -> None:
        await self.channels.close()


@pytest.fixture
async def nse(identity, tmp_path: Path) -> AsyncIterator[Endpoint]:  # type: ignore[no-untyped-def]
    endpoint = Endpoint(name="nse-1", services=["blue"], cidr="172.16.0.0/24",
                        listen=[f"unix://{tmp_path}/nse.sock"], grace=0.1,
                        security=await identity(NSE),
                        policies=Policies(observers=frozenset({OBSERVER})))
    async with endpoint:
        yield endpoint


@pytest.fixture
async def hops(identity, nse: Endpoint) -> AsyncIterator[dict[str, Hop]]:  # type: ignore[no-untyped-def]
    made = {sid: Hop(await identity(sid), nse.url) for sid in (FWD1, FWD2, EVIL, OBSERVER)}
    yield made
    for hop in made.values():
        await hop.aclose()


@pytest.fixture
async def upstream(identity) -> dict[str, Security]:  # type: ignore[no-untyped-def]
    """The client and manager before the forwarder (their tokens are on the path)."""
    return {NSC: await identity(NSC), MGR1: await identity(MGR1)}


def forwarder_request(upstream: dict[str, Security], *, expires_in: float = 60.0,
                      nsc_aud: str = MGR1, forwarder: str = FWD1) -> NetworkServiceRequest:
    """What forwarder 1 sends: nsc, manager and forwarder segments (the first two signed, each
    for the next), index 2, id = the forwarder's segment id."""
    conn = Connection(network_service="blue", network_service_endpoint_name="nse-1", payload="IP")
    expires = time.time() + expires_in
    for name, signer, aud in (("nsc-1", NSC, nsc_aud), ("mgr-1", MGR1, forwarder), ("fwd-1", None, "")):
        seg = conn.path.path_segments.add(name=name, id=str(uuid.uuid4()))
        seg.expires.CopyFrom(ts(expires))
        if signer is not None:
            seg.token = mint(upstream[signer].svid, aud, expires=expires).text
    conn.path.index = 2
    conn.id = conn.path.path_segments[2].id
    request = NetworkServiceRequest(connection=conn)
    request.mechanism_preferences.append(kernel())
    return request


async def denied(call: object, policy: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, info.value
    assert policy in (info.value.details() or ""), info.value.details()


async def test_tokens_along_the_path(nse: Endpoint, hops, upstream) -> None:  # type: ignore[no-untyped-def]
    hop = hops[FWD1]
    conn = await hop.request(forwarder_request(upstream))
    segments = conn.path.path_segments
    fwd, end = segments[2], segments[3]
    claims = verify(fwd.token, hop.security.svid.chain[0])
    assert claims.sub == FWD1 and claims.aud == (NSE,)
    # The expiry follows the token (to the millisecond).
    assert abs(fwd.expires.seconds + fwd.expires.nanos / 1e9 - claims.exp) < 1e-3
    theirs = verify(end.token, nse.security.svid.chain[0])
    assert theirs.sub == NSE and theirs.aud == (FWD1,) and theirs.exp <= claims.exp
    assert list(nse.monitor.connections) == [end.id]

    refreshed = await hop.request(NetworkServiceRequest(connection=conn,
                                                        mechanism_preferences=[kernel()]))
    assert refreshed.path.path_segments[3].id == end.id
    await hop.close(refreshed)
    assert not nse.monitor.connections and len(nse.begin) == 0


async def test_a_close_is_accepted_after_the_closers_segment_expired(  # type: ignore[no-untyped-def]
        nse: Endpoint, hops, upstream) -> None:
    """A Close's token says who closes: valid from its signing, not only until the segment's
    expiry. A connection whose refreshes failed (its segment expired where the caller holds it),
    or one a cancelled heal rebuilt under the same id, is still closed by its owner: before,
    the Close was signed to expire with the segment and refused as tokens_expired, and the
    connection stayed until its expiry at the next hop."""
    hop = hops[FWD1]
    conn = await hop.request(forwarder_request(upstream))
    assert list(nse.monitor.connections)
    stale = Connection()
    stale.CopyFrom(conn)
    stale.path.path_segments[2].expires.CopyFrom(ts(time.time() - 2))
    await hop.close(stale)
    assert not nse.monitor.connections and len(nse.begin) == 0


async def test_unauthenticated_caller_refused(nse: Endpoint, upstream) -> None:  # type: ignore[no-untyped-def]
    channel = dial(nse.url)  # plaintext to a secure server
    try:
        stub = networkservice_pb2_grpc.NetworkServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Request(forwarder_request(upstream), timeout=3)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await channel.close()
    assert not nse.monitor.connections


async def test_other_trust_domain_refused(identity, nse: Endpoint, upstream) -> None:  # type: ignore[no-untyped-def]
    evil_ca = CertificateAuthority.create("evil.lab")
    stranger = await identity("spiffe://evil.lab/nsm/node/node1/forwarder", authority=evil_ca,
                              trust_domain="evil.lab")
    hop = Hop(stranger, nse.url)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await hop.raw(forwarder_request(upstream), "x")
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await hop.aclose()
    assert not nse.monitor.connections


async def test_a_workload_cannot_call_an_endpoint(nse: Endpoint, hops, upstream) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PermissionDenied, match="endpoint_callers"):
        await hops[EVIL].request(forwarder_request(upstream))
    assert not nse.monitor.connections


def own_token(hop: Hop, *, aud: str = NSE, expires_in: float = 60.0) -> str:
    return mint(hop.security.svid, aud, expires=time.time() + expires_in).text


async def test_expired_token_refused(nse: Endpoint, hops, upstream) -> None:  # type: ignore[no-untyped-def]
    hop = hops[FWD1]
    await denied(hop.raw(forwarder_request(upstream), own_token(hop, expires_in=-5)), "tokens_expired")
    await denied(hop.raw(forwarder_request(upstream, expires_in=-5), own_token(hop)), "tokens_expired")
    assert not nse.monitor.connections


async def test_missing_token_refused(nse: Endpoint, hops, upstream) -> None:  # type: ignore[no-untyped-def]
    await denied(hops[FWD1].raw(forwarder_request(upstream), None), "tokens_valid")
    await denied(hops[FWD1].raw(forwarder_request(upstream), "not.a.token"), "tokens_valid")
    assert not nse.monitor.connections


async def test_forged_token_refused(nse: Endpoint, hops, upstream) -> None:  # type: ignore[no-untyped-def]
    """Forwarder 2 signs with its own key a token that claims forwarder 1's identity."""
    attacker = hops[FWD2]
    forged = jwt.encode({"sub": FWD1, "aud": [NSE], "exp": int(time.time()) + 60},
                        attacker.security.svid.key, algorithm="ES256")
    await denied(attacker.raw(forwarder_request(upstream), forged), "prev_token_signed")
    assert not nse.monitor.connections


async def test_replayed_token_refused(nse: Endpoint, hops, upstream) -> None:  # type: ignore[no-untyped-def]
    """Forwarder 1's request and token, stolen and sent by forwarder 2 over its own TLS."""
    victim, attacker = hops[FWD1], hops[FWD2]
    request = forwarder_request(upstream)
    stolen = own_token(victim)
    await denied(attacker.raw(request, stolen), "prev_token_signed")
    assert not nse.monitor.connections
    await victim.raw(request, stolen)  # the victim's own, from the victim: fine
    assert len(nse.monitor.connections) == 1


async def test_unchained_tokens_refused(nse: Endpoint, hops, upstream) -> None:  # type: ignore[no-untyped-def]
    hop = hops[FWD1]
    await denied(hop.raw(forwarder_request(upstream), own_token(hop, aud=MGR2)), "tokens_chained")
    await denied(hop.raw(forwarder_request(upstream, nsc_aud=EVIL), own_token(hop)), "tokens_chained")
    assert not nse.monitor.connections


async def test_another_identitys_connection(nse: Endpoint, hops, upstream) -> None:  # type: ignore[no-untyped-def]
    """Forwarder 2 cannot take over, close or watch forwarder 1's connection; forwarder 1 and
    the observer can still see it, and forwarder 1 can refresh and close it."""
    victim, attacker = hops[FWD1], hops[FWD2]
    conn = await victim.request(forwarder_request(upstream))
    again = NetworkServiceRequest(connection=conn, mechanism_preferences=[kernel()])
    takeover = forwarder_request(upstream, forwarder=FWD2)  # a good path of its own ...
    takeover.connection.id = conn.id  # ... with the victim's connection id
    await denied(attacker.raw(takeover, own_token(attacker)), "connection_owner")
    await denied(attacker.raw(again, own_token(attacker)), "tokens_chained")  # the victim's path
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await attacker.stub().Close(conn, timeout=5, metadata=[(TOKEN_HEADER, own_token(attacker))])
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "connection_owner" in (info.value.details() or "")
    own_id = conn.path.path_segments[3].id
    assert list(nse.monitor.connections) == [own_id] and len(nse.begin) == 1
    assert await attacker.monitor() == {}
    assert list(await victim.monitor()) == [own_id]
    assert list(await hops[OBSERVER].monitor()) == [own_id]
    refreshed = await victim.request(again)
    await victim.close(refreshed)
    assert not nse.monitor.connections


async def test_only_forwarders_ask_a_manager_for_remote(identity, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    manager = Manager(name="node2", listen=[f"unix://{tmp_path}/mgr.sock"],
                      registry_url=f"unix://{tmp_path}/no-registry.sock", request_timeout=2,
                      security=await identity(MGR2))
    async with manager:
        def request() -> NetworkServiceRequest:
            conn = Connection(id=str(uuid.uuid4()), network_service="blue",
                              network_service_endpoint_name="nse-1")
            seg = conn.path.path_segments.add(name="fwd-1", id=conn.id)
            seg.expires.CopyFrom(ts(time.time() + 60))
            return NetworkServiceRequest(connection=conn, mechanism_preferences=[vxlan("10.0.0.1")])

        workload, forwarder = Hop(await identity(NSC), manager.bound[0].__str__()), \
            Hop(await identity(FWD1), str(manager.bound[0]))
        try:
            await denied(workload.raw(request(), own_token(workload, aud=MGR2)),
                         "remote_from_forwarders")
            with pytest.raises(grpc.aio.AioRpcError) as info:  # past the rule: no such service
                await forwarder.raw(request(), own_token(forwarder, aud=MGR2))
            assert info.value.code() != grpc.StatusCode.PERMISSION_DENIED
        finally:
            await workload.aclose()
            await forwarder.aclose()
        assert not manager.monitor.connections


async def test_a_forwarder_serves_only_its_nodes_manager(identity) -> None:  # type: ignore[no-untyped-def]
    rule = NodeManagerOnly(await identity(FWD1), Policies())
    chain = Chain([rule])
    request = NetworkServiceRequest(connection=Connection(id="x"))
    ok = chain.context(peer=parse_id(MGR1))
    assert await chain.request(request, ok) is request.connection
    for other in (MGR2, FWD2, NSC):
        with pytest.raises(PermissionDenied, match="forwarder_callers"):
            await chain.request(request, chain.context(peer=parse_id(other)))
        with pytest.raises(PermissionDenied, match="forwarder_callers"):
            await chain.close(request.connection, chain.context(peer=parse_id(other)))
    await chain.close(request.connection, chain.context(internal=True))  # an expiry passes
    off = Chain([NodeManagerOnly(rule.security, Policies(forwarder_callers=False))])
    assert await off.request(request, off.context(peer=parse_id(NSC))) is request.connection
    assert TD in MGR1


class ForgeOwnToken(Element):
    """An endpoint's extra element that replaces the endpoint's token with one of another key."""

    def __init__(self, key: object) -> None:
        self.key = key

    async def request(self, ctx: Ctx, request: NetworkServiceRequest, next: NextRequest) -> Connection:
        own = request.connection.path.path_segments[request.connection.path.index]
        own.token = jwt.encode({"sub": NSE, "aud": [FWD1], "exp": int(time.time()) + 60}, self.key,
                               algorithm="ES256")
        return await next(ctx, request)


async def test_next_token_signed(identity, tmp_path: Path, upstream) -> None:  # type: ignore[no-untyped-def]
    """An answer whose next segment is not signed by the hop that answered is refused, and the
    connection it made is closed again."""
    impostor = await identity(EVIL)
    endpoint = Endpoint(name="nse-1", services=["blue"], cidr="172.16.0.0/24",
                        listen=[f"unix://{tmp_path}/nse.sock"], grace=0.1,
                        security=await identity(NSE), elements=[ForgeOwnToken(impostor.svid.key)])
    async with endpoint:
        hop = Hop(await identity(FWD1), endpoint.url)
        try:
            with pytest.raises(PermissionDenied, match="next_token_signed"):
                await hop.request(forwarder_request(upstream))
        finally:
            await hop.aclose()
        assert not endpoint.monitor.connections and len(endpoint.begin) == 0


async def test_a_path_segment_of_another_identitys_connection(identity) -> None:  # type: ignore[no-untyped-def]
    """A caller that replays another identity's path under a new connection id does not get
    this hop's segment of that connection (what this hop would send on as its own)."""
    security = await identity(MGR1)
    owner = Ownership(security, Policies())
    chain = Chain([Begin(), UpdatePath("mgr-1"), owner])
    conn = Connection(id="nsc-conn")
    conn.path.path_segments.add(name="nsc-1", id="nsc-conn")
    made = await chain.request(NetworkServiceRequest(connection=conn), chain.context(peer=parse_id(NSC)))
    replay = Connection()
    replay.CopyFrom(made)
    replay.id = replay.path.path_segments[0].id = "evil-conn"  # a new connection id, the same path
    with pytest.raises(PermissionDenied, match="connection_owner: path segment"):
        await chain.request(NetworkServiceRequest(connection=replay), chain.context(peer=parse_id(EVIL)))
    assert len(owner) == 1
    await chain.close(made, chain.context(peer=parse_id(NSC)))
    assert len(owner) == 0

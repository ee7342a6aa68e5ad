"""The point-to-point IPAM element alone (in a chain with Begin)."""

from __future__ import annotations

import time

import pytest

from nsm.api.connection_pb2 import Connection
from nsm.api.networkservice_pb2 import NetworkServiceRequest
from nsm.chain import Chain, Ctx, Element, NextRequest
from nsm.elements.begin import Begin
from nsm.endpoint.ipam import PointToPointIPAM, Pool, parse_cidr
from nsm.errors import InvalidArgument, ResourceExhausted, Unavailable

pytestmark = pytest.mark.timeout(10)


class Fail(Element):
    """Fails the next ``times`` requests after the IPAM did its part."""

    def __init__(self) -> None:
        self.times = 0

    async def request(self, ctx: Ctx, request: NetworkServiceRequest, next: NextRequest) -> Connection:
        if self.times:
            self.times -= 1
            raise Unavailable("downstream failed")
        return await next(ctx, request)


def make(cidr: str = "10.0.0.0/24") -> tuple[Chain, PointToPointIPAM, Fail]:
    ipam, fail = PointToPointIPAM(cidr), Fail()
    return Chain([Begin(), ipam, fail], name="test"), ipam, fail


def req(conn_id: str, *, excluded: list[str] | None = None, src: list[str] | None = None,
        dst: list[str] | None = None) -> NetworkServiceRequest:
    r = NetworkServiceRequest(connection=Connection(id=conn_id, network_service="svc"))
    ip = r.connection.context.ip_context
    ip.excluded_prefixes.extend(excluded or [])
    ip.src_ip_addrs.extend(src or [])
    ip.dst_ip_addrs.extend(dst or [])
    return r


def pair(conn: Connection) -> tuple[list[str], list[str]]:
    ip = conn.context.ip_context
    return list(ip.dst_ip_addrs), list(ip.src_ip_addrs)


async def test_pairs_in_order_with_routes() -> None:
    chain, ipam, _ = make()
    a = await chain.request(req("a"))
    b = await chain.request(req("b"))
    assert pair(a) == (["10.0.0.1/32"], ["10.0.0.2/32"])
    assert pair(b) == (["10.0.0.3/32"], ["10.0.0.4/32"])
    ip = a.context.ip_context
    assert [r.prefix for r in ip.src_routes] == ["10.0.0.1/32"]
    assert [r.prefix for r in ip.dst_routes] == ["10.0.0.2/32"]
    assert ipam.connections == 2


async def test_refresh_keeps_the_pair() -> None:
    chain, ipam, _ = make()
    first = await chain.request(req("a"))
    await chain.request(req("b"))
    again = NetworkServiceRequest(connection=first)
    second = await chain.request(again)
    assert pair(second) == (["10.0.0.1/32"], ["10.0.0.2/32"])
    assert len(second.context.ip_context.src_routes) == 1
    # A refresh whose context was lost still gets its pair back from the metadata.
    third = await chain.request(req("a"))
    assert pair(third) == (["10.0.0.1/32"], ["10.0.0.2/32"])
    assert ipam.connections == 2


async def test_close_releases_and_addresses_are_reused() -> None:
    chain, ipam, _ = make()
    a = await chain.request(req("a"))
    await chain.request(req("b"))
    await chain.close(a)
    assert ipam.connections == 1
    c = await chain.request(req("c"))
    assert pair(c) == (["10.0.0.1/32"], ["10.0.0.2/32"])
    await chain.close(Connection(id="unknown"))  # idempotent, releases nothing
    assert ipam.connections == 2


async def test_first_request_failing_downstream_releases() -> None:
    chain, ipam, fail = make()
    fail.times = 1
    with pytest.raises(Unavailable):
        await chain.request(req("a"))
    assert ipam.connections == 0
    b = await chain.request(req("b"))
    assert pair(b) == (["10.0.0.1/32"], ["10.0.0.2/32"])


async def test_refresh_failing_downstream_keeps_the_pair() -> None:
    chain, ipam, fail = make()
    await chain.request(req("a"))
    fail.times = 1
    with pytest.raises(Unavailable):
        await chain.request(req("a"))
    assert ipam.connections == 1
    again = await chain.request(req("a"))
    assert pair(again) == (["10.0.0.1/32"], ["10.0.0.2/32"])


async def test_exhausted() -> None:
    chain, ipam, _ = make("10.0.0.0/30")  # .1 and .2 usable
    await chain.request(req("a"))
    with pytest.raises(ResourceExhausted, match=r"CIDR 10.0.0.0/30 exhausted: 1 connections"):
        await chain.request(req("b"))
    assert ipam.connections == 1 and ipam.free == 0


async def test_odd_address_left_is_not_leaked_when_exhausted() -> None:
    chain, ipam, _ = make("10.0.0.0/29")  # .1 - .6: three pairs
    for i in range(3):
        await chain.request(req(f"c{i}"))
    with pytest.raises(ResourceExhausted):
        await chain.request(req("x"))
    await chain.close(Connection(id="c1"))
    assert ipam.free == 2
    got = await chain.request(req("y"))
    assert pair(got) == (["10.0.0.3/32"], ["10.0.0.4/32"])


@pytest.mark.parametrize("cidr", ["", "banana", "10.0.0.0/33", "10.0.0.1/24", "10.0.0.0", "fd00::/129"])
def test_invalid_cidr(cidr: str) -> None:
    with pytest.raises(InvalidArgument, match="CIDR"):
        PointToPointIPAM(cidr)


def test_cidr_too_small() -> None:
    with pytest.raises(InvalidArgument, match="room for no connection"):
        PointToPointIPAM("10.0.0.7/32")


async def test_slash_31_uses_both_addresses() -> None:
    chain, _, _ = make("10.0.0.0/31")
    a = await chain.request(req("a"))
    assert pair(a) == (["10.0.0.0/32"], ["10.0.0.1/32"])


async def test_excluded_prefixes_are_never_handed_out() -> None:
    chain, ipam, _ = make()
    a = await chain.request(req("a", excluded=["10.0.0.0/30", "10.0.0.4/32", "192.168.0.0/16", "fd00::/8"]))
    assert pair(a) == (["10.0.0.5/32"], ["10.0.0.6/32"])
    # The skipped addresses stay free for a client that does not exclude them.
    b = await chain.request(req("b"))
    assert pair(b) == (["10.0.0.1/32"], ["10.0.0.2/32"])
    # A pair that the client later excludes is replaced on refresh.
    again = await chain.request(req("b", excluded=["10.0.0.0/31"]))
    assert pair(again) == (["10.0.0.2/32"], ["10.0.0.3/32"])
    assert ipam.connections == 2


async def test_excluding_everything_exhausts() -> None:
    chain, _, _ = make()
    with pytest.raises(ResourceExhausted):
        await chain.request(req("a", excluded=["10.0.0.0/25", "10.0.0.128/25"]))


async def test_bad_excluded_prefix() -> None:
    chain, ipam, _ = make()
    with pytest.raises(InvalidArgument, match="excluded prefix"):
        await chain.request(req("a", excluded=["nope"]))
    assert ipam.connections == 0


async def test_ipv6() -> None:
    chain, _, _ = make("fd00:1::/64")
    a = await chain.request(req("a"))
    b = await chain.request(req("b"))
    assert pair(a) == (["fd00:1::1/128"], ["fd00:1::2/128"])
    assert pair(b) == (["fd00:1::3/128"], ["fd00:1::4/128"])
    assert [r.prefix for r in a.context.ip_context.src_routes] == ["fd00:1::1/128"]
    assert [r.prefix for r in a.context.ip_context.dst_routes] == ["fd00:1::2/128"]


async def test_dual_stack_chain_keeps_both_families() -> None:
    chain = Chain([Begin(), PointToPointIPAM("10.0.0.0/24"), PointToPointIPAM("fd00::/120")])
    a = await chain.request(req("a"))
    assert sorted(pair(a)[0]) == ["10.0.0.1/32", "fd00::1/128"]
    a = await chain.request(NetworkServiceRequest(connection=a))
    assert sorted(pair(a)[1]) == ["10.0.0.2/32", "fd00::2/128"]
    assert len(a.context.ip_context.src_routes) == 2


async def test_addresses_carried_by_the_request_are_kept_when_ours() -> None:
    """An endpoint that restarted (no metadata) gives a client its addresses back."""
    chain, ipam, _ = make()
    a = await chain.request(req("a", dst=["10.0.0.7/32"], src=["10.0.0.9/32"]))
    assert pair(a) == (["10.0.0.7/32"], ["10.0.0.9/32"])
    # Taken already: another connection carrying them gets a fresh pair.
    b = await chain.request(req("b", dst=["10.0.0.7/32"], src=["10.0.0.9/32"]))
    assert pair(b) == (["10.0.0.1/32"], ["10.0.0.2/32"])
    await chain.close(a)
    assert ipam.connections == 1


async def test_foreign_addresses_and_their_routes_are_replaced() -> None:
    chain, _, _ = make()
    r = req("a", dst=["172.16.0.1/32"], src=["172.16.0.2/32"])
    ip = r.connection.context.ip_context
    ip.src_routes.add(prefix="172.16.0.1/32")
    ip.src_routes.add(prefix="192.168.0.0/16")  # not a host route to a replaced address: kept
    ip.dst_routes.add(prefix="172.16.0.2/32")
    a = await chain.request(r)
    assert pair(a) == (["10.0.0.1/32"], ["10.0.0.2/32"])
    assert [x.prefix for x in a.context.ip_context.src_routes] == ["10.0.0.1/32", "192.168.0.0/16"]
    assert [x.prefix for x in a.context.ip_context.dst_routes] == ["10.0.0.2/32"]


async def test_large_pool_is_cheap() -> None:
    chain, ipam, _ = make("10.0.0.0/8")
    started = time.monotonic()
    for i in range(500):
        await chain.request(req(f"c{i}"))
    assert time.monotonic() - started < 2.0
    assert ipam.free == 2**24 - 2 - 1000
    await chain.close(Connection(id="c100"))
    got = await chain.request(req("again"))
    assert pair(got) == (["10.0.0.201/32"], ["10.0.0.202/32"])


def test_pool_merges_released_ranges() -> None:
    pool = Pool(parse_cidr("10.0.0.0/28"))  # .1 - .14
    taken = [pool.take([]) for _ in range(14)]
    assert None not in taken and pool.take([]) is None
    for value in taken[3:9]:
        pool.release(value)
    assert pool._starts == [taken[3]] and pool._ends == [taken[8] + 1]
    pool.release(taken[0])
    pool.release(taken[2])
    pool.release(taken[1])
    assert len(pool._starts) == 1
    pool.release(taken[1])  # double release is harmless
    assert pool.used == 5
    assert pool.take([(taken[0], taken[5])]) == taken[5]

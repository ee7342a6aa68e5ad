"""The link a connection gives a pod: real traffic over it (scapy ICMP both ways, a TCP
exchange), Close removing both ends with a DELETE in the manager's monitor and the address pair
released, and refreshes that change nothing in the kernel."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from nsm.api import connection_pb2_grpc
from nsm.api.connection_pb2 import DELETE, INITIAL_STATE_TRANSFER, UPDATE, Connection, MonitorScopeSelector
from nsm.kernel.netns import run_in_netns
from nsm.lab.traffic import icmp_echo as scapy_echo
from nsm.lab.traffic import tcp_exchange

pytestmark = [pytest.mark.kernel, pytest.mark.asyncio(loop_scope="session")]


def ip_of(cidr: str) -> str:
    return cidr.split("/")[0]


@pytest.mark.timeout(60)
async def test_icmp_both_ways_and_tcp_over_the_link(mesh) -> None:
    ns = await mesh.netns()
    client = mesh.client(ns, ifname="nsm-1")
    conn = await client.request()
    ip = conn.context.ip_context
    assert (ip.dst_ip_addrs[0], ip.src_ip_addrs[0]) == mesh.first_pair
    src, dst = ip_of(ip.src_ip_addrs[0]), ip_of(ip.dst_ip_addrs[0])
    assert conn.mechanism.parameters["name"] == "nsm-1"
    assert conn.network_service_endpoint_name == mesh.main.name

    # client → endpoint
    out = await asyncio.to_thread(run_in_netns, ns, scapy_echo, src, dst, 0x4E53, b"to-nse")
    assert out is not None, f"no echo reply from {dst} in the client pod"
    assert (out["src"], out["dst"], out["type"], out["id"]) == (dst, src, 0, 0x4E53)
    assert out["payload"] == b"to-nse"
    assert out["iface"] == "nsm-1"
    # endpoint → client
    back = await asyncio.to_thread(run_in_netns, mesh.main.netns, scapy_echo, dst, src, 0x4E54,
                                   b"to-nsc")
    assert back is not None, f"no echo reply from {src} in the endpoint pod"
    assert (back["src"], back["dst"], back["type"], back["id"]) == (src, dst, 0, 0x4E54)
    assert back["payload"] == b"to-nsc"
    nse_links = await mesh.link_names(mesh.main.netns)
    assert back["iface"] in nse_links

    # TCP: a server in the endpoint's pod, a client in the client's pod, 64 KiB echoed
    await asyncio.to_thread(tcp_exchange, ns, mesh.main.netns, dst, 64 * 1024)
    # and the other way round
    await asyncio.to_thread(tcp_exchange, mesh.main.netns, ns, src, 8 * 1024)
    await client.close()


async def _next_event(call: Any, timeout: float = 5.0) -> Any:
    return await asyncio.wait_for(call.read(), timeout)


@pytest.mark.timeout(60)
async def test_close_removes_both_ends_reports_delete_and_releases_the_pair(mesh) -> None:
    ns = await mesh.netns()
    stub = connection_pb2_grpc.MonitorConnectionStub(mesh.channel(mesh.manager_url))
    watch = stub.MonitorConnections(MonitorScopeSelector())
    try:
        initial = await _next_event(watch)
        assert initial.type == INITIAL_STATE_TRANSFER
        assert not initial.connections

        client = mesh.client(ns, ifname="nsm-1")
        conn = await client.request()
        client_link = await mesh.netlink.link(ns, "nsm-1")
        assert client_link is not None and client_link.oper_up
        nse_links = await mesh.link_names(mesh.main.netns)
        assert len(nse_links) == 1, nse_links
        pair = (conn.context.ip_context.dst_ip_addrs[0], conn.context.ip_context.src_ip_addrs[0])

        update = await _next_event(watch)
        assert update.type == UPDATE
        (seen,) = update.connections.values()
        assert seen.path.path_segments[0].id == client.conn_id
        assert seen.network_service_endpoint_name == mesh.main.name

        await client.close()
        assert await mesh.netlink.link(ns, "nsm-1") is None, "client end still there after Close"
        assert await mesh.link_names(mesh.main.netns) == [], "endpoint end still there after Close"
        event = await _next_event(watch)
        assert event.type == DELETE, event
        (gone,) = event.connections.values()
        assert gone.id == seen.id
        assert gone.path.path_segments[0].id == client.conn_id
    finally:
        watch.cancel()
    for url in (mesh.manager_url, mesh.forwarder_url, mesh.main.url):
        assert await mesh.connections(url) == {}, url

    # The pair went back to the pool: the next connection gets it again.
    again = mesh.client(await mesh.netns(), ifname="nsm-1")
    conn2 = await again.request()
    assert (conn2.context.ip_context.dst_ip_addrs[0], conn2.context.ip_context.src_ip_addrs[0]) == pair
    assert conn2.id != conn.id
    await again.close()


@pytest.mark.timeout(60)
async def test_refresh_changes_nothing_in_the_kernel(mesh) -> None:
    ns = await mesh.netns()
    updates: list[Connection] = []
    lifetime = 2.0  # the SDK refreshes at a third of the time left: about every 0.7 s
    client = mesh.client(ns, ifname="nsm-1", lifetime=lifetime, on_update=updates.append)
    conn = await client.request()
    nse_ifname = (await mesh.link_names(mesh.main.netns))[0]

    async def kernel_state() -> tuple[Any, ...]:
        c = await mesh.netlink.link(ns, "nsm-1")
        e = await mesh.netlink.link(mesh.main.netns, nse_ifname)
        assert c is not None and e is not None
        return (c.index, c.mac, c.mtu, c.alias, e.index, e.mac, e.mtu, e.alias,
                sorted(await mesh.netlink.addresses(ns, "nsm-1")),
                sorted(await mesh.netlink.addresses(mesh.main.netns, nse_ifname)),
                sorted(r.dst for r in await mesh.netlink.routes(ns, dev="nsm-1")),
                sorted(r.dst for r in await mesh.netlink.routes(mesh.main.netns, dev=nse_ifname)))

    before = await kernel_state()
    assert conn.context.ip_context.src_ip_addrs[0] in before[8]
    started = time.monotonic()
    await mesh.eventually(lambda: _at_least(updates, 5), timeout=15, what="4 refreshes")
    # The connection outlived several lifetimes only thanks to the refreshes.
    assert time.monotonic() - started > lifetime
    after = await kernel_state()
    assert after == before
    ids = {u.id for u in updates}
    assert ids == {conn.id}
    addrs = {(tuple(u.context.ip_context.src_ip_addrs), tuple(u.context.ip_context.dst_ip_addrs))
             for u in updates}
    assert len(addrs) == 1
    # Still exactly one connection everywhere, and traffic flows.
    for url in (mesh.manager_url, mesh.forwarder_url, mesh.main.url):
        assert len(await mesh.connections(url)) == 1
    from nsm.kernel.ping import ping
    result = await asyncio.to_thread(ping, ns, conn.context.ip_context.dst_ip_addrs[0].split("/")[0],
                                     count=2)
    assert result.received == 2
    await client.close()


async def _at_least(items: list[Any], n: int) -> bool:
    return len(items) >= n


@pytest.mark.timeout(60)
async def test_tcp_over_an_ipv6_link(mesh) -> None:
    nse = await mesh.start_nse("v6", services=["e2e-v6"], cidr="fd00:e2e::/64")
    ns = await mesh.netns()
    client = mesh.client(ns, service="e2e-v6", ifname="nsm-1")
    conn = await client.request()
    ip = conn.context.ip_context
    assert (ip.dst_ip_addrs[0], ip.src_ip_addrs[0]) == ("fd00:e2e::1/128", "fd00:e2e::2/128")
    (nse_if,) = await mesh.link_names(nse.netns)
    assert "fd00:e2e::2/128" in await mesh.netlink.addresses(ns, "nsm-1")
    assert "fd00:e2e::1/128" in await mesh.netlink.addresses(nse.netns, nse_if)
    await asyncio.to_thread(tcp_exchange, ns, nse.netns, "fd00:e2e::1", 32 * 1024)
    await asyncio.to_thread(tcp_exchange, nse.netns, ns, "fd00:e2e::2", 4 * 1024)
    await client.close(raise_errors=True)
    assert await mesh.link_names(ns) == [] and await mesh.link_names(nse.netns) == []

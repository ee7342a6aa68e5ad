"""Fifty clients in fifty pods connected to one endpoint at once (the reference timed out at this
load), all with working traffic and distinct addresses, then all closed without a trace."""

from __future__ import annotations

import asyncio
import ipaddress
import time

import pytest

from nsm.kernel.ping import ping

pytestmark = [pytest.mark.kernel, pytest.mark.asyncio(loop_scope="session")]

CLIENTS = 50


@pytest.mark.timeout(120)
async def test_fifty_clients_at_once_on_one_endpoint(mesh) -> None:
    namespaces = await mesh.netns_many(CLIENTS, "pod")
    clients = [mesh.client(ns, ifname="nsm-1", request_timeout=60) for ns in namespaces]

    t0 = time.perf_counter()
    conns = await asyncio.gather(*(c.request() for c in clients))
    setup = time.perf_counter() - t0
    print(f"{CLIENTS} concurrent requests in {setup:.2f} s")

    assert {c.network_service_endpoint_name for c in conns} == {mesh.main.name}
    assert len({c.id for c in conns}) == CLIENTS
    srcs = [c.context.ip_context.src_ip_addrs[0] for c in conns]
    dsts = [c.context.ip_context.dst_ip_addrs[0] for c in conns]
    every = srcs + dsts
    assert len(set(every)) == 2 * CLIENTS, "an address was handed out twice"
    pool = ipaddress.ip_network(mesh.cidr)
    assert all(ipaddress.ip_interface(a).ip in pool for a in every)

    # Both ends of every link exist: the client's nsm-1 and one interface per connection in
    # the endpoint's pod.
    for ns, src in zip(namespaces, srcs, strict=True):
        assert src in await mesh.netlink.addresses(ns, "nsm-1")
    assert len(await mesh.link_names(mesh.main.netns)) == CLIENTS
    for url in (mesh.manager_url, mesh.forwarder_url, mesh.main.url):
        assert len(await mesh.connections(url)) == CLIENTS, url

    # Traffic on every link (a few pings at a time).
    limit = asyncio.Semaphore(8)

    async def ping_one(ns: str, dst: str) -> int:
        async with limit:
            result = await asyncio.to_thread(ping, ns, dst.split("/")[0], count=2, interval=0.01)
            return result.received

    received = await asyncio.gather(*(ping_one(ns, d) for ns, d in zip(namespaces, dsts, strict=True)))
    failed = [ns for ns, r in zip(namespaces, received, strict=True) if r != 2]
    assert not failed, f"no traffic from {len(failed)} pods: {failed[:5]}"

    t0 = time.perf_counter()
    await asyncio.gather(*(c.close(raise_errors=True) for c in clients))
    print(f"{CLIENTS} concurrent closes in {time.perf_counter() - t0:.2f} s")

    for ns in namespaces:
        assert await mesh.link_names(ns) == [], f"interface left in {ns}"
    assert await mesh.link_names(mesh.main.netns) == []
    for url in (mesh.manager_url, mesh.forwarder_url, mesh.main.url):
        assert await mesh.connections(url) == {}, url

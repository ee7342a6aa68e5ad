"""Many cross-node connections at once: 30 clients on node1 (a pod each) to one endpoint on
node2, requested concurrently, all with traffic, then all closed concurrently, nothing left."""

from __future__ import annotations

import asyncio
import time

import pytest

pytestmark = [pytest.mark.kernel, pytest.mark.asyncio(loop_scope="session")]

N = 30
NODE_IP = {"node1": "172.30.0.1", "node2": "172.30.0.2"}


def ip_of(cidr: str) -> str:
    return cidr.split("/")[0]


@pytest.mark.timeout(120)
async def test_30_concurrent_cross_node_clients(cluster) -> None:
    pods = [await cluster.pod("s") for _ in range(N)]
    clients = [cluster.client("node1", "ip", pod, name=f"nsc-scale-{i}", request_timeout=30)
               for i, pod in enumerate(pods)]
    t0 = time.monotonic()
    conns = await asyncio.gather(*(c.request() for c in clients))
    setup = time.monotonic() - t0
    print(f"{N} concurrent cross-node requests in {setup:.2f}s")

    for conn in conns:
        assert [s.name for s in conn.path.path_segments][1:] == [
            "node1", "node1-fwd", "node2", "node2-fwd", "nse-ip"]
        assert conn.context.MTU == 1450
    pairs = {(conn.context.ip_context.src_ip_addrs[0], conn.context.ip_context.dst_ip_addrs[0])
             for conn in conns}
    assert len(pairs) == N, "address pairs must be distinct"
    # N halves on each side, N distinct VNIs agreed by both ends.
    for node, peer in (("node1", "node2"), ("node2", "node1")):
        vx = cluster.vxlans(node)
        assert len(vx) == N and len({v["id"] for v in vx.values()}) == N, (node, len(vx))
        assert {v["remote"] for v in vx.values()} == {NODE_IP[peer]}
        rules = [r for r in await cluster.netlink.rules(cluster.node_netns(node))
                 if r.priority == 1000]
        assert len(rules) == 2 * N, (node, len(rules))
    assert set(cluster.vxlans("node1")) and \
        {v["id"] for v in cluster.vxlans("node1").values()} == \
        {v["id"] for v in cluster.vxlans("node2").values()}
    assert len(await cluster.link_names(cluster.nse_netns("nse-ip"))) == N

    # Traffic on every one of them, all at once (a ping each, from its own pod).
    results = await asyncio.gather(*(
        cluster.ping(pod, ip_of(conn.context.ip_context.dst_ip_addrs[0]), count=3, interval=0.02)
        for pod, conn in zip(pods, conns, strict=True)))
    dead = [(r.dst, r.received, r.errors) for r in results if r.received != 3]
    assert not dead, f"connections without (full) traffic: {dead}"

    t0 = time.monotonic()
    await asyncio.gather(*(c.close(raise_errors=True) for c in clients))
    print(f"{N} concurrent closes in {time.monotonic() - t0:.2f}s")
    await cluster.assert_clean()
    left = [await cluster.link_names(pod) for pod in pods]
    assert not any(left), left

"""Monitoring on every hop across nodes: an endpoint on node2 killed (SIGKILL) makes every hop of
its connection report DOWN, from forwarder2 (its stream to the endpoint broke) through manager2
and forwarder1 up to the client's manager on node1, within about a second; a refresh once the
endpoint is back is UP on every hop again; Close is a DELETE."""

from __future__ import annotations

import time

import pytest

from nsm.api.connection_pb2 import DELETE, DOWN, UP, UPDATE
from nsm.errors import NsmError
from nsm.lab import EndpointSpec, NodeSpec, ServiceSpec, Topology
from nsm.retry import retry

pytestmark = [pytest.mark.kernel, pytest.mark.asyncio(loop_scope="session")]

DOWN_WITHIN = 2.0

TOPOLOGY = Topology(
    nodes=(NodeSpec("node1"), NodeSpec("node2")),
    endpoints=(EndpointSpec("nse-mon", "node2", ("svc-mon",), "172.16.12.0/24"),),
    services=(ServiceSpec("svc-mon"),),
)
#: The passthrough hops, upstream first.
HOPS = ("manager.node1", "forwarder.node1", "manager.node2", "forwarder.node2")


@pytest.mark.timeout(120)
async def test_remote_endpoint_killed_is_down_on_every_hop_then_up_after_a_refresh(
        new_lab, monitor_watch) -> None:
    async with new_lab(TOPOLOGY, tag="mon") as cluster:
        client, conn, _ = await cluster.connect("node1", "svc-mon", heal=None)  # the DOWN must stay
        assert [s.name for s in conn.path.path_segments][1:] == [
            "node1", "node1-fwd", "node2", "node2-fwd", "nse-mon"]
        urls = cluster.monitor_urls()

        async def states() -> dict[str, list[int]]:
            return {hop: [c.state for c in (await cluster.connections(urls[hop])).values()]
                    for hop in HOPS}

        watch = monitor_watch(cluster.channel(urls["manager.node1"]), segment_id=client.conn_id)
        assert [c.state for c in (await watch.initial()).values()] == [UP]

        t0 = time.monotonic()
        await cluster.lab.kill("nse.nse-mon")
        kind, down = await watch.next(DOWN_WITHIN)
        print(f"node1's manager published DOWN {1000 * (time.monotonic() - t0):.0f} ms after the "
              "endpoint on node2 was killed")
        assert (kind, down.state) == (UPDATE, DOWN)
        assert down.id == conn.path.path_segments[1].id and down.path.index == 1
        assert await states() == {hop: [DOWN] for hop in HOPS}

        # Back: once it registered again and the channels reconnected, a refresh is UP.
        await cluster.lab.start_daemon("nse.nse-mon")
        refreshed = await retry(client.request, what="refresh", retry_on=(NsmError,), deadline=15)
        assert refreshed.state == UP
        await watch.until(UPDATE, UP, 5)
        assert await states() == {hop: [UP] for hop in HOPS}

        await client.close(raise_errors=True)
        await watch.until(DELETE, None, 5)
        await cluster.assert_clean()

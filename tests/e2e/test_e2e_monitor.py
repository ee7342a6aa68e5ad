"""Monitoring on every hop, with real daemons: an endpoint killed (SIGKILL) makes the client's
manager publish its connection DOWN within about a second (the forwarder's stream to the
endpoint breaks → the forwarder reports DOWN → the manager sees it on its stream to the
forwarder); a refresh after the endpoint is back (same name and URL) is UP again; Close is a
DELETE."""

from __future__ import annotations

import time

import pytest

from nsm.api.connection_pb2 import DELETE, DOWN, UP, UPDATE
from nsm.errors import NsmError
from nsm.retry import retry

pytestmark = [pytest.mark.kernel, pytest.mark.asyncio(loop_scope="session")]

#: The bar is ~1 s; the test allows 2 s on a loaded machine.
DOWN_WITHIN = 2.0


@pytest.mark.timeout(90)
async def test_endpoint_killed_is_down_at_the_manager_then_up_after_a_refresh_then_deleted(
        mesh, monitor_watch) -> None:
    service = mesh.name("e2e-mon")
    nse = await mesh.start_nse("mon", services=[service], cidr="10.91.0.0/24")
    client = mesh.client(await mesh.netns(), service=service, heal=None)  # the DOWN must stay
    conn = await client.request()
    manager_id = conn.path.path_segments[1].id
    watch = monitor_watch(mesh.channel(mesh.manager_url), segment_id=client.conn_id)
    assert [c.state for c in (await watch.initial()).values()] == [UP]

    t0 = time.monotonic()
    await nse.daemon.kill()
    kind, down = await watch.next(DOWN_WITHIN)
    print(f"manager published DOWN {1000 * (time.monotonic() - t0):.0f} ms after the endpoint "
          "was killed")
    assert (kind, down.state) == (UPDATE, DOWN)
    # The manager's view: its own segment id and index; the client's segment selected it.
    assert down.id == manager_id and down.path.index == 1
    assert down.path.path_segments[0].id == client.conn_id
    assert down.network_service_endpoint_name == nse.name
    fwd = await mesh.connections(mesh.forwarder_url)
    assert [c.state for c in fwd.values()] == [DOWN], fwd

    # Back with the same name and URL: a refresh goes through and it is UP again.
    await nse.daemon.start()
    await mesh.wait_registered(nse.name)
    refreshed = await retry(client.request, what="refresh", retry_on=(NsmError,), deadline=10)
    assert refreshed.state == UP
    assert (await watch.until(UPDATE, UP, 5)).id == manager_id
    fwd = await mesh.connections(mesh.forwarder_url)
    assert [c.state for c in fwd.values()] == [UP], fwd

    await client.close()
    assert (await watch.until(DELETE, None, 5)).id == manager_id

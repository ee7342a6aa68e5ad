"""Something dies mid-connection: a client killed without Close is torn down everywhere at
expiry; a client whose endpoint was killed still closes both ends of its link."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

pytestmark = [pytest.mark.kernel, pytest.mark.asyncio(loop_scope="session")]

LIFETIME = 3.0
MARGIN = 3.0


@pytest.mark.timeout(60)
async def test_killed_client_is_cleaned_up_at_expiry(mesh) -> None:
    ns = await mesh.netns()
    proc = await mesh.spawn_cli("nsc", "--manager", mesh.manager_url, "--service", mesh.service,
                                "--netns", ns, "--ifname", "nsm-1", "--lifetime", f"{LIFETIME}s",
                                "--name", mesh.name("nsc"))
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
    connected_at = time.monotonic()
    assert line.startswith("connected id="), line
    nse_links = await mesh.link_names(mesh.main.netns)
    assert await mesh.link_names(ns) == ["nsm-1"]
    assert len(nse_links) == 1

    os.killpg(proc.pid, signal.SIGKILL)  # no Close, no more refreshes
    await proc.wait()
    # Killing the client closes nothing by itself ...
    assert await mesh.link_names(ns) == ["nsm-1"]
    snaps = await mesh.all_connections()
    assert all(len(snaps[k]) == 1 for k in ("manager", "forwarder", mesh.main.name)), snaps

    # ... the expiry of its path segment does, on both sides and in every hop.
    async def all_gone() -> bool:
        if await mesh.link_names(ns) or await mesh.link_names(mesh.main.netns):
            return False
        return not any((await mesh.all_connections()).values())

    await mesh.eventually(all_gone, timeout=LIFETIME + MARGIN, what="cleanup at expiry")
    gone_after = time.monotonic() - connected_at
    print(f"cleaned up {gone_after:.2f} s after connect (lifetime {LIFETIME} s)")
    # Not before the lifetime (refreshing every lifetime/3, the client was alive until the kill).
    assert gone_after > LIFETIME - 1.0


@pytest.mark.timeout(60)
async def test_close_after_the_endpoint_died_removes_both_ends(mesh) -> None:
    nse = await mesh.start_nse("doomed", services=["e2e-doomed"], cidr="10.90.0.0/24")
    ns = await mesh.netns()
    client = mesh.client(ns, service="e2e-doomed")
    await client.request()
    assert await mesh.link_names(ns) == ["nsm-1"]
    assert len(await mesh.link_names(nse.netns)) == 1
    await nse.daemon.kill()
    await client.close()
    assert await mesh.link_names(ns) == []
    assert await mesh.link_names(nse.netns) == []
    snaps = await mesh.all_connections()
    assert not snaps["manager"] and not snaps["forwarder"], snaps

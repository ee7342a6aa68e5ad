"""Cross-node connections leave nothing on either node: after Close, and after the client
process dies (SIGKILL) once its lifetime runs out — links (``nsv``/``nsx``/``nsb``), policy rules
and tables, pod interfaces and the daemons' connections all go."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time

import pytest

pytestmark = [pytest.mark.kernel, pytest.mark.asyncio(loop_scope="session")]

NSE = {"ip": "nse-ip", "eth": "nse-eth"}
LIFETIME = 3.0
MARGIN = 4.0


async def built_state(cluster) -> dict[str, list[str]]:
    """What the two cross-node connections of these tests build on node1 and node2."""
    return {node: sorted(await cluster.tunnel_links(node)) for node in ("node1", "node2")}


@pytest.mark.timeout(60)
async def test_close_cleans_both_nodes(cluster) -> None:
    pod = await cluster.pod()
    clients = {svc: cluster.client("node1", svc, pod, ifname=f"nsm-{svc}") for svc in NSE}
    conns = {svc: await c.request() for svc, c in clients.items()}
    before = await built_state(cluster)
    for node in ("node1", "node2"):
        # IP: veth end + VXLAN; ETHERNET: veth end + VXLAN + bridge
        assert len(before[node]) == 5, before
        rules = [r for r in await cluster.netlink.rules(cluster.node_netns(node))
                 if r.priority == 1000]
        assert len(rules) == 2, rules
        assert "lookup " in cluster.rules_text(node)
    assert await cluster.link_names(pod) == ["nsm-eth", "nsm-ip"]
    for svc, conn in conns.items():
        await cluster.iface_with(cluster.nse_netns(NSE[svc]), conn.context.ip_context.dst_ip_addrs[0])
        await cluster.assert_ping(pod, conn.context.ip_context.dst_ip_addrs[0].split("/")[0])

    for c in clients.values():
        await c.close(raise_errors=True)
    # Close is synchronous through every hop: all gone right away, on both nodes.
    for node in ("node1", "node2"):
        assert await cluster.tunnel_links(node) == {}, node
        assert await cluster.policy(node) == [], node
        text = cluster.rules_text(node)
        assert not re.search(r"^1000:", text, re.M), text
        assert set(re.findall(r"lookup (\S+)", text)) <= {"local", "main", "default"}, text
    assert await cluster.link_names(pod) == []
    for svc in NSE:
        assert await cluster.link_names(cluster.nse_netns(NSE[svc])) == []
    await cluster.assert_clean()


async def _connected(proc: asyncio.subprocess.Process, timeout: float = 20.0) -> str:
    assert proc.stdout is not None
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout)).decode()
    except TimeoutError:
        raise AssertionError("nsm nsc printed nothing") from None
    if not line.startswith("connected "):
        err = await asyncio.wait_for(proc.stderr.read(), 5) if proc.stderr is not None else b""
        raise AssertionError(f"nsm nsc: {line!r} {err.decode()}")
    return line


@pytest.mark.timeout(60)
async def test_client_killed_everything_expires_on_both_nodes(cluster) -> None:
    """Two ``nsm nsc`` processes (IP and ETHERNET) with a 3 s lifetime, SIGKILLed: no Close
    ever comes, the managers' timeouts clean both nodes within lifetime + margin."""
    pod = await cluster.pod()
    procs = {}
    for svc in NSE:
        procs[svc] = await cluster.spawn(
            "nsc", "--manager", cluster.node("node1").manager_url, "--service", svc,
            "--netns", pod, "--ifname", f"nsm-{svc}", "--lifetime", f"{LIFETIME:g}s",
            "--name", f"nsc-kill-{svc}")
    for svc, proc in procs.items():
        line = await _connected(proc)
        assert f"ifname=nsm-{svc}" in line and f"endpoint={NSE[svc]}" in line, line
    built = await built_state(cluster)
    assert all(len(names) == 5 for names in built.values()), built
    # Let it refresh at least once (at a third of the lifetime) before it dies.
    await asyncio.sleep(LIFETIME / 2)
    assert await built_state(cluster) == built

    for proc in procs.values():
        os.killpg(proc.pid, signal.SIGKILL)
    killed = time.monotonic()
    for proc in procs.values():
        assert await asyncio.wait_for(proc.wait(), 5) == -signal.SIGKILL
    # Still there right after the death (no Close was sent): expiry does the work.
    await asyncio.sleep(0.2)
    assert await built_state(cluster) == built

    took = await cluster.eventually_clean(LIFETIME + MARGIN, nodes=["node1", "node2"])
    took += 0.2
    assert took <= LIFETIME + MARGIN
    assert await cluster.link_names(pod) == []
    assert time.monotonic() - killed <= LIFETIME + MARGIN + 1
    await cluster.assert_clean()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("service", ["ip", "eth"])
async def test_close_after_the_client_pod_is_gone(cluster, service: str) -> None:
    """The pod dies first (its namespace, with the veth's pod end, is deleted): Close still
    removes the rest on both nodes."""
    pod = await cluster.pod()
    client = cluster.client("node1", service, pod)
    await client.request()
    assert len(await cluster.tunnel_links("node1")) in (2, 3)
    from nsm.kernel import netns as nsns

    nsns.delete_netns(os.path.basename(pod))
    await client.close(raise_errors=True)
    await cluster.assert_clean()

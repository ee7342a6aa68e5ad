"""A forwarder restart keeps the datapath (SIGKILL, started again 3 s later), with traffic running:

- cross-node IP and ETHERNET connections (and a local one on the client's node) carry a steady
  ping at 50 packets/s through the restart of the forwarder of the client's node or of the
  endpoint's node: not one packet is lost, and every link keeps its ifindex;
- the next Request of each connection (a refresh) adopts what the earlier run left: nothing in
  the kernel changes, and Close still removes everything on both nodes;
- a half that differs from what the Request wants is built again (and carries traffic);
- a Close that arrives before the connection is requested again removes what the earlier run
  left, here and on the other node, at once;
- what no connection claims (its client closed while the forwarder was down) is removed after the
  grace period (``--adopt-grace``), and the removal is logged.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from typing import Any

import pytest

from nsm.kernel.ping import EchoStream, StreamResult
from nsm.lab import EndpointSpec, NodeSpec, ServiceSpec, Topology

pytestmark = [pytest.mark.kernel, pytest.mark.asyncio(loop_scope="session")]

RATE = 50.0
DOWN = 3.0  # seconds between the kill and the start
RESTART = Topology(
    nodes=(NodeSpec("node1"), NodeSpec("node2")),
    endpoints=(EndpointSpec("nse-ip", "node2", ("ip",), "172.16.21.0/24"),
               EndpointSpec("nse-eth", "node2", ("eth",), "172.16.22.0/24"),
               EndpointSpec("nse-loc", "node1", ("loc",), "172.16.23.0/24"),
               EndpointSpec("nse-ip6", "node2", ("ip6",), "fd00:21::/64")),
    services=(ServiceSpec("ip"), ServiceSpec("eth", payload="ETHERNET"), ServiceSpec("loc"),
              ServiceSpec("ip6")),
)
NSE = {"ip": "nse-ip", "eth": "nse-eth", "loc": "nse-loc", "ip6": "nse-ip6"}
#: The connections whose datapath the forwarder of each node built.
BUILT_BY = {"node1": ("ip", "eth", "ip6", "loc"), "node2": ("ip", "eth", "ip6")}


def stamp(line: str) -> float:
    """The time of a daemon's log line (``2026-01-02T03:04:05.678Z ...``), in seconds."""
    return datetime.strptime(line.split()[0], "%Y-%m-%dT%H:%M:%S.%fZ").timestamp()


def ip_of(cidr: str) -> str:
    return cidr.split("/")[0]


async def connect_all(cluster, services: tuple[str, ...], **kwargs: Any) -> dict[str, tuple]:
    """One client on node1 per service: service → (client, connection, pod, destination)."""
    out = {}
    for svc in services:
        client, conn, pod = await cluster.connect("node1", svc, **kwargs)
        out[svc] = (client, conn, pod, ip_of(conn.context.ip_context.dst_ip_addrs[0]))
    return out


async def kernel_state(cluster, conns: dict[str, tuple]) -> dict[str, Any]:
    """Every link of the connections with its ifindex (both nodes' tunnel links, the pods'
    interfaces, the endpoints' pods), and the nodes' policy rules and routes."""
    state: dict[str, Any] = {}
    for node in ("node1", "node2"):
        state[node] = {name: (link.index, link.kind, link.mtu, link.master, link.alias)
                       for name, link in (await cluster.tunnel_links(node)).items()}
        state[f"{node} policy"] = sorted(await cluster.policy(node))
    for svc, (_, _, pod, _) in conns.items():
        state[f"pod {svc}"] = {link.name: link.index for link in await cluster.links(pod)}
        nse_ns = cluster.nse_netns(NSE[svc])
        state[f"nse {svc}"] = {link.name: link.index for link in await cluster.links(nse_ns)}
    return state


async def streams_through(conns: dict[str, tuple], fault) -> tuple[dict[str, StreamResult], float]:
    """Run a 50/s ping per (IPv4) connection while ``fault()`` runs (plus a second before and
    after): the streams' results and how long they ran at least."""
    streams = {svc: EchoStream(pod, dst, rate=RATE).start()
               for svc, (_, _, pod, dst) in conns.items() if ":" not in dst}
    t0 = time.monotonic()
    try:
        await asyncio.sleep(1.0)
        await fault()
        await asyncio.sleep(1.0)
    finally:
        took = time.monotonic() - t0
        stopped = await asyncio.gather(*(asyncio.to_thread(s.stop) for s in streams.values()))
    return dict(zip(streams, stopped, strict=True)), took


async def assert_reachable(cluster, client, conn, pod: str, dst: str) -> None:
    if ":" not in dst:
        await cluster.assert_ping(pod, dst)
        return
    src = ip_of(conn.context.ip_context.src_ip_addrs[0])
    assert await cluster.icmp(pod, src, dst, 0x4E55, b"after-restart") is not None, dst


def assert_no_loss(results: dict[str, StreamResult], seconds: float) -> None:
    for svc, r in results.items():
        assert r.sent >= RATE * seconds * 0.8, f"{svc}: only {r.sent} echoes in {seconds:.1f} s"
        assert not r.lost and not r.errors, (
            f"{svc}: {len(r.lost)} of {r.sent} echoes lost (longest outage "
            f"{r.longest_outage:.2f} s), errors {r.errors[:3]}")


def restart(cluster, node: str):
    async def fault() -> None:
        await cluster.lab.kill(f"forwarder.{node}")
        await asyncio.sleep(DOWN)
        await cluster.lab.start_daemon(f"forwarder.{node}")
    return fault


@pytest.mark.timeout(120)
@pytest.mark.parametrize("node", ["node1", "node2"])
async def test_forwarder_restart_loses_no_packet_and_the_refresh_adopts(new_lab, node: str) -> None:
    async with new_lab(RESTART, tag="a") as cluster:
        conns = await connect_all(cluster, BUILT_BY[node])
        before = await kernel_state(cluster, conns)
        assert len(before["node1"]) == len(before["node2"]) == 7, before

        results, seconds = await streams_through(conns, restart(cluster, node))
        assert_no_loss(results, seconds)
        assert await kernel_state(cluster, conns) == before, "the restart changed the kernel"
        log = cluster.lab.logs()[f"forwarder.{node}"]
        assert "found the datapath of connections an earlier run" in log, log

        # The refresh after the restart adopts: the kernel does not change, traffic flows.
        for client, conn, _, _ in conns.values():
            again = await client.request()
            assert [s.name for s in again.path.path_segments] == [
                s.name for s in conn.path.path_segments]
        assert await kernel_state(cluster, conns) == before, "the refresh changed the kernel"
        log = cluster.lab.logs()[f"forwarder.{node}"]
        assert log.count("adopted the datapath an earlier run") == 3, log  # ip, eth, ip6
        assert log.count("adopted the veth an earlier run") == ("loc" in conns), log
        assert "rebuilding" not in log and "no connection claimed it" not in log, log
        forwarder = cluster.node(node).forwarder_url
        assert len(await cluster.connections(forwarder)) == len(BUILT_BY[node])
        for conn_info in conns.values():
            await assert_reachable(cluster, *conn_info)
        # A second refresh is an ordinary one.
        for client, *_ in conns.values():
            await client.request()
        assert await kernel_state(cluster, conns) == before

        for client, *_ in conns.values():
            await client.close(raise_errors=True)
        await cluster.assert_clean()
        for _, _, pod, _ in conns.values():
            assert await cluster.link_names(pod) == []


@pytest.mark.timeout(120)
async def test_what_differs_is_built_again(new_lab) -> None:
    """While the forwarder of node1 is down the MTU of its VXLAN device (a cross-node half) and
    of a local veth's client end is changed: the refresh after the restart adopts neither but
    builds each again, and traffic flows."""
    async with new_lab(RESTART, tag="b") as cluster:
        conns = await connect_all(cluster, ("ip", "loc"))
        before = await cluster.tunnel_links("node1")
        vxlan = next(name for name in before if name.startswith("nsx"))
        local_pod = conns["loc"][2]
        local_before = await cluster.netlink.link(local_pod, "nsm-1")
        await cluster.lab.kill("forwarder.node1")
        await cluster.netlink.set_mtu(cluster.node_netns("node1"), vxlan, 1400)
        await cluster.netlink.set_mtu(local_pod, "nsm-1", 1400)
        await cluster.lab.start_daemon("forwarder.node1")
        for client, *_ in conns.values():
            await client.request()
        after = await cluster.tunnel_links("node1")
        assert sorted(after) == sorted(before)
        assert after[vxlan].index != before[vxlan].index and after[vxlan].mtu == 1450
        local_after = await cluster.netlink.link(local_pod, "nsm-1")
        assert local_before is not None and local_after is not None
        assert local_after.index != local_before.index and local_after.mtu == local_before.mtu
        log = cluster.lab.logs()["forwarder.node1"]
        assert "rebuilding what an earlier run of this forwarder left" in log, log
        assert "rebuilding the veth an earlier run of this forwarder built" in log, log
        assert log.count("MTU 1400") == 2, log
        for client, _, pod, dst in conns.values():
            await cluster.assert_ping(pod, dst)
            await client.close(raise_errors=True)
        await cluster.assert_clean()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("node", ["node1", "node2"])
async def test_close_before_the_refresh_removes_what_the_earlier_run_left(new_lab,
                                                                          node: str) -> None:
    """The forwarder restarts; its connections are closed before any refresh: each Close
    removes what the earlier run left and goes on to the next hop, so both nodes (and the
    endpoints) are clean at once, long before any expiry or grace period. (Heal off: its
    re-request after the restart would adopt them before the Close.)"""
    async with new_lab(RESTART, tag="c") as cluster:
        services = ("ip", "eth", "loc") if node == "node1" else ("ip", "eth")
        conns = await connect_all(cluster, services, heal=None)  # no heal: nothing refreshes first
        await cluster.lab.kill(f"forwarder.{node}")
        await cluster.lab.start_daemon(f"forwarder.{node}")
        for client, *_ in conns.values():
            await client.close(raise_errors=True)
        await cluster.assert_clean()
        for _, _, pod, _ in conns.values():
            assert await cluster.link_names(pod) == []
        log = cluster.lab.logs()[f"forwarder.{node}"]
        assert log.count("closing a connection an earlier run") == len(conns), log


@pytest.mark.timeout(120)
async def test_a_connection_healed_by_a_new_path_takes_over_the_interface_left(new_lab) -> None:
    """The forwarder of node1 is down for longer than the connection's lifetime: the other hops
    close it, and the client heals it with a new path (new ids below the client). The restarted
    forwarder finds the interface the new connection wants held by the half its earlier run
    left for the former one, which nothing claims: it removes that half and builds the new one
    at once, instead of refusing the interface until the grace period is over."""
    async with new_lab(RESTART, tag="e") as cluster:
        lifetime = 3.0
        conns = await connect_all(cluster, ("ip",), lifetime=lifetime)
        client, _, pod, dst = conns["ip"]
        await cluster.lab.kill("forwarder.node1")
        await cluster.eventually(lambda: _expired(cluster, "node2"), timeout=lifetime + 5,
                                 what="the connection expired on node2")
        await cluster.lab.start_daemon("forwarder.node1")

        async def healed() -> bool:
            return (await cluster.ping(pod, dst, count=1, timeout=0.3)).received == 1

        await cluster.eventually(healed, timeout=15, what="traffic through the healed connection")
        log = cluster.lab.logs()["forwarder.node1"]
        assert "left for the former connection of this interface" in log, log
        await client.close(raise_errors=True)
        await cluster.assert_clean()


async def _expired(cluster, node: str) -> bool:
    return not await cluster.tunnel_links(node)


GRACE = 4.0
LIFETIME = 6.0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("node", ["node1", "node2"])
async def test_what_no_connection_claims_is_removed_after_the_grace_period(new_lab,
                                                                           node: str) -> None:
    """The clients close while the forwarder is down (the Close cannot reach it): the restarted
    forwarder keeps what its earlier run left for the grace period, then removes it and logs
    what it removed; the rest of the path expires on its own."""
    grace = ["--adopt-grace", f"{GRACE:g}s"]
    async with new_lab(RESTART, tag="g", extra_args={"forwarder.node1": grace,
                                                     "forwarder.node2": grace}) as cluster:
        conns = await connect_all(cluster, ("ip", "eth"), lifetime=LIFETIME)
        left = sorted(await cluster.tunnel_links(node))
        assert len(left) == 5
        await cluster.lab.kill(f"forwarder.{node}")
        for client, *_ in conns.values():
            await client.close()
        await cluster.lab.start_daemon(f"forwarder.{node}")
        started = time.monotonic()
        assert sorted(await cluster.tunnel_links(node)) == left, "removed before the grace period"
        async def removed() -> bool:
            logged = cluster.lab.logs()[f"forwarder.{node}"].count(
                "no connection claimed it within the grace period")
            return logged == 2 and not await cluster.tunnel_links(node)

        await cluster.eventually(removed, timeout=GRACE + 5, what=f"{node}'s leftovers removed")
        assert time.monotonic() - started <= GRACE + 5
        log = cluster.lab.logs()[f"forwarder.{node}"]
        # The grace period runs from when the restarted forwarder serves (its log's clock).
        serving = [stamp(line) for line in log.splitlines() if "'forwarder serving'" in line][-1]
        for line in log.splitlines():
            if "no connection claimed it" in line:
                assert GRACE - 0.1 <= stamp(line) - serving <= GRACE + 3, line
        for name in left:
            assert name in log, (name, log)
        await cluster.eventually_clean(LIFETIME + 5)

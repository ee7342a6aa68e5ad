"""Bad input and broken peers across nodes: an unreachable remote manager answers UNAVAILABLE
and leaves nothing on either node (and the path works again once it is back), an unknown service
answers NOT_FOUND, a routed payload on a node that does not forward is refused,
VNIs are reused cleanly when 20 cross-node connections are opened and
closed again and again, and a forwarder killed (SIGKILL) under a live connection removes the half
it left behind after its restart once no connection claims it, or adopts it when the client's
refresh comes."""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc
import pytest

from nsm.errors import NotFound, NsmError, Unavailable
from nsm.lab import EndpointSpec, NodeSpec, ServiceSpec, Topology

pytestmark = [pytest.mark.kernel, pytest.mark.asyncio(loop_scope="session")]

NODE_IP = {"node1": "172.30.0.1", "node2": "172.30.0.2", "node3": "172.30.0.3"}


def ip_of(cidr: str) -> str:
    return cidr.split("/")[0]


UNREACHABLE = Topology(
    nodes=(NodeSpec("node1"), NodeSpec("node2")),
    endpoints=(EndpointSpec("nse-u", "node2", ("svc-u",), "172.16.9.0/24"),),
    services=(ServiceSpec("svc-u"),),
)


@pytest.mark.timeout(90)
async def test_unreachable_remote_manager_is_unavailable_and_leaves_nothing(new_lab) -> None:
    # A short registration expiry for the endpoint: once node2's manager is back, the endpoint
    # registers through it again within seconds (the manager forgot its local URL).
    async with new_lab(UNREACHABLE, tag="u",
                       extra_args={"nse.nse-u": ["--expiry", "6s"]}) as cluster:
        lab = cluster.lab
        # The path works ...
        client, conn, pod = await cluster.connect("node1", "svc-u", name="nsc-before")
        assert len(conn.path.path_segments) == 6
        await cluster.assert_ping(pod, ip_of(conn.context.ip_context.dst_ip_addrs[0]))
        await client.close(raise_errors=True)
        await cluster.assert_clean()

        # ... until node2's manager goes away while its endpoint is still registered.
        await lab.stop_daemon("manager.node2")
        pod = await cluster.pod()
        client = cluster.client("node1", "svc-u", pod, request_timeout=20)
        t0 = time.monotonic()
        with pytest.raises(NsmError) as info:
            await client.request()
        took = time.monotonic() - t0
        assert isinstance(info.value, Unavailable), f"{type(info.value).__name__}: {info.value}"
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        assert took < 10, f"UNAVAILABLE took {took:.1f}s"
        # Nothing half-built on either node (node2's forwarder and endpoint still run).
        await cluster.assert_clean()
        assert await cluster.link_names(pod) == []
        assert client.connection is None

        # Back again: the same client gets through (no VNI, table or name was kept).
        await lab.start_daemon("manager.node2")
        deadline = time.monotonic() + 30
        while True:
            try:
                conn = await client.request()
                break
            except NsmError as exc:
                if time.monotonic() > deadline:
                    raise AssertionError(f"still failing after node2's manager is back: "
                                         f"{exc.code.name}: {exc.message}") from exc
                await asyncio.sleep(0.5)
        assert [s.name for s in conn.path.path_segments][1:] == [
            "node1", "node1-fwd", "node2", "node2-fwd", "nse-u"]
        await cluster.assert_ping(pod, ip_of(conn.context.ip_context.dst_ip_addrs[0]))
        await client.close(raise_errors=True)
        await cluster.assert_clean()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("node", ["node1", "node3"])
async def test_unknown_service_is_not_found_and_leaves_nothing(cluster, node: str) -> None:
    pod = await cluster.pod()
    client = cluster.client(node, "no-such-service", pod)
    with pytest.raises(NsmError) as info:
        await client.request()
    assert isinstance(info.value, NotFound), f"{type(info.value).__name__}: {info.value}"
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    assert "no-such-service" in info.value.message
    assert await cluster.link_names(pod) == []
    await cluster.assert_clean()


@pytest.mark.timeout(60)
async def test_routed_payload_without_forwarding_is_refused_and_leaves_nothing(cluster) -> None:
    """A node whose kernel does not forward IPv6 would drop routed packets silently: the
    forwarder refuses with FAILED_PRECONDITION instead, and nothing is left on either node."""
    node2 = cluster.node_netns("node2")
    key = "net.ipv6.conf.all.forwarding"
    await cluster.netlink.set_sysctl_in_netns(node2, key, 0)
    try:
        pod = await cluster.pod()
        client = cluster.client("node1", "ip6", pod)
        with pytest.raises(NsmError) as info:
            await client.request()
        assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION, info.value
        assert "IPv6 forwarding is disabled" in info.value.message
        assert await cluster.link_names(pod) == []
        await cluster.assert_clean()
    finally:
        await cluster.netlink.set_sysctl_in_netns(node2, key, 1)
    # The refused attempt gave back everything it took (its routing table included): two new
    # routed connections get tables of their own and both carry traffic.
    made = [await cluster.connect("node1", "ip", name=f"nsc-fwd-back-{i}") for i in range(2)]
    for _client, conn, pod in made:
        await cluster.assert_ping(pod, ip_of(conn.context.ip_context.dst_ip_addrs[0]))
    for client, _conn, _pod in made:
        await client.close(raise_errors=True)
    await cluster.assert_clean()


@pytest.mark.timeout(120)
async def test_vni_reuse_20_connections_opened_and_closed_repeatedly(cluster) -> None:
    """20 connections into node2 (10 from node1, 10 from node3; IP and ETHERNET), all up at once,
    then all closed; three rounds with the same connection ids, so the same link names and
    freshly released VNIs are used again at once."""
    plan = [(node, svc) for node in ("node1", "node3") for svc in ("ip", "eth") for _ in range(5)]
    clients = []
    for i, (node, svc) in enumerate(plan):
        pod = await cluster.pod("v")
        clients.append((node, pod, cluster.client(node, svc, pod, conn_id=f"vni-reuse-{i:02d}")))
    seen_vnis: list[set[int]] = []
    for round_ in range(3):
        conns = await asyncio.gather(*(c.request() for _, _, c in clients))
        await asyncio.gather(*(cluster.assert_ping(pod, ip_of(conn.context.ip_context.dst_ip_addrs[0]))
                               for (_, pod, _), conn in zip(clients, conns, strict=True)))
        for conn, (_, _, c) in zip(conns, clients, strict=True):
            assert conn.id == c.conn_id and len(conn.path.path_segments) == 6
        # One VXLAN per connection on each side: a distinct VNI per node, both ends agree.
        server = cluster.vxlans("node2")
        assert len(server) == 20 and len({v["id"] for v in server.values()}) == 20, server
        by_vni = {v["id"]: v for v in server.values()}
        for node in ("node1", "node3"):
            side = cluster.vxlans(node)
            assert len(side) == 10, (node, side)
            for v in side.values():
                assert v["remote"] == NODE_IP["node2"] and v["local"] == NODE_IP[node]
                assert by_vni[v["id"]]["remote"] == NODE_IP[node], (node, v)
        seen_vnis.append(set(by_vni))

        await asyncio.gather(*(c.close(raise_errors=True) for _, _, c in clients))
        await cluster.assert_clean()
        left = [await cluster.link_names(pod) for _, pod, _ in clients]
        assert not any(left), f"round {round_}: pod interfaces left: {left}"
    assert len(seen_vnis) == 3


FORWARDER_KILL = Topology(
    nodes=(NodeSpec("node1"), NodeSpec("node2")),
    endpoints=(EndpointSpec("nse-f", "node2", ("svc-f",), "172.16.10.0/24"),),
    services=(ServiceSpec("svc-f"),),
)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("node", ["node1", "node2"])
async def test_forwarder_killed_and_restarted_leaves_nothing_after_close(new_lab,
                                                                         node: str) -> None:
    grace = 2.0
    flags = ["--adopt-grace", f"{grace:g}s"]
    async with new_lab(FORWARDER_KILL, tag="f", extra_args={"forwarder.node1": flags,
                                                            "forwarder.node2": flags}) as cluster:
        lifetime = 3.0
        client, conn, pod = await cluster.connect("node1", "svc-f", lifetime=lifetime)
        assert len(conn.path.path_segments) == 6
        await cluster.lab.kill(f"forwarder.{node}")
        with contextlib.suppress(NsmError):
            await client.close(raise_errors=True)
        await cluster.lab.start_daemon(f"forwarder.{node}")
        assert "found the datapath of connections an earlier run" in cluster.lab.logs()[
            f"forwarder.{node}"]
        # Everything of the connection is gone on both nodes once its lifetime (elsewhere) and
        # the restarted forwarder's grace period (here) are over, and the pod can get a
        # connection with the same interface name again.
        await cluster.eventually_clean(max(lifetime, grace) + 5)
        assert "no connection claimed it" in cluster.lab.logs()[f"forwarder.{node}"]
        assert await cluster.link_names(pod) == []
        again = cluster.client("node1", "svc-f", pod)
        await again.request()
        await again.close(raise_errors=True)
        await cluster.assert_clean()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("node", ["node1", "node2"])
async def test_forwarder_killed_under_a_refreshing_client_is_healed_by_the_refresh(
        new_lab, node: str) -> None:
    """The client keeps refreshing while a forwarder is SIGKILLed and restarted: the restarted
    forwarder keeps its old half, the next refresh that gets through adopts it (same addresses),
    and traffic flows; Close then leaves nothing. (With a 3 s lifetime a slow restart may let
    the connection expire on the other hops; the client's heal then builds a new path, which
    takes over the pod's interface on the client's node, and what the earlier run left on the
    endpoint's node goes after the grace period.)"""
    grace = 2.0
    flags = ["--adopt-grace", f"{grace:g}s"]
    async with new_lab(FORWARDER_KILL, tag="h", extra_args={"forwarder.node1": flags,
                                                            "forwarder.node2": flags}) as cluster:
        client, conn, pod = await cluster.connect("node1", "svc-f", lifetime=3.0)
        dst = ip_of(conn.context.ip_context.dst_ip_addrs[0])
        await cluster.assert_ping(pod, dst)
        await cluster.lab.kill(f"forwarder.{node}")
        await cluster.lab.start_daemon(f"forwarder.{node}")
        assert "found the datapath of connections an earlier run" in cluster.lab.logs()[
            f"forwarder.{node}"]

        async def healed() -> bool:
            return (await cluster.ping(pod, dst, count=1, timeout=0.3)).received == 1

        await cluster.eventually(healed, timeout=15, what="traffic through the healed connection")
        healed_conn = client.connection
        assert healed_conn is not None
        assert list(healed_conn.context.ip_context.src_ip_addrs) == list(
            conn.context.ip_context.src_ip_addrs)
        assert len(healed_conn.path.path_segments) == 6
        await cluster.assert_ping(pod, dst)
        await client.close(raise_errors=True)
        await cluster.eventually_clean(grace + 5)
        assert await cluster.link_names(pod) == []


@pytest.mark.timeout(90)
@pytest.mark.parametrize("daemon", ["manager.node1", "manager.node2"])
async def test_manager_killed_under_a_refreshing_client_keeps_the_datapath(
        new_lab, daemon: str) -> None:
    """A manager SIGKILLed and restarted while a client refreshes: the kernel datapath (built by
    the forwarders, which still hold it) keeps carrying traffic throughout, refreshes succeed again
    once the manager is back, and Close then removes everything on both nodes."""
    async with new_lab(FORWARDER_KILL, tag="m") as cluster:
        client, conn, pod = await cluster.connect("node1", "svc-f", lifetime=3.0)
        dst = ip_of(conn.context.ip_context.dst_ip_addrs[0])
        await cluster.lab.kill(daemon)
        await cluster.assert_ping(pod, dst)  # the kernel does not need the manager
        await cluster.lab.start_daemon(daemon)
        refreshed = client.connection

        async def refreshed_again() -> bool:
            return client.connection is not refreshed and client.connection is not None

        await cluster.eventually(refreshed_again, timeout=10, what="a refresh through the restarted manager")
        again = client.connection
        assert again is not None and len(again.path.path_segments) == 6
        assert list(again.context.ip_context.src_ip_addrs) == list(conn.context.ip_context.src_ip_addrs)
        await cluster.assert_ping(pod, dst)
        await client.close(raise_errors=True)
        await cluster.assert_clean()
        assert await cluster.link_names(pod) == []


REGISTRY_RESTART = Topology(
    nodes=(NodeSpec("node1"), NodeSpec("node2")),
    # No ServiceSpec: the endpoint registers its service itself, through node2's manager.
    endpoints=(EndpointSpec("nse-r", "node2", ("svc-r",), "172.16.11.0/24"),),
)


@pytest.mark.timeout(90)
async def test_registry_restart_is_healed_by_the_managers_within_seconds(new_lab) -> None:
    """The (in-memory) registry is SIGKILLed and restarted empty. The live connection keeps its
    traffic; node2's manager registers again the service and endpoint that went through it as
    soon as its registry channel is back (the endpoint's own refresh is 20 s away), so a new
    client on node1 gets a connection within seconds."""
    async with new_lab(REGISTRY_RESTART, tag="r") as cluster:
        client, conn, pod = await cluster.connect("node1", "svc-r")
        dst = ip_of(conn.context.ip_context.dst_ip_addrs[0])
        await cluster.lab.kill("registry")
        await cluster.assert_ping(pod, dst)
        await cluster.lab.start_daemon("registry")
        t0 = time.monotonic()
        pod2 = await cluster.pod()
        while True:
            fresh = cluster.client("node1", "svc-r", pod2)
            try:
                conn2 = await fresh.request()
                break
            except NsmError as exc:
                await fresh.close()
                if time.monotonic() - t0 > 10:
                    raise AssertionError(f"no connection 10 s after the registry restart: "
                                         f"{exc.code.name}: {exc.message}") from exc
                await asyncio.sleep(0.2)
        assert "registered again what goes through us" in cluster.lab.logs()["manager.node2"]
        assert [s.name for s in conn2.path.path_segments][1:] == [
            "node1", "node1-fwd", "node2", "node2-fwd", "nse-r"]
        await cluster.assert_ping(pod2, ip_of(conn2.context.ip_context.dst_ip_addrs[0]))
        await cluster.assert_ping(pod, dst)
        await fresh.close(raise_errors=True)
        await client.close(raise_errors=True)
        await cluster.assert_clean()

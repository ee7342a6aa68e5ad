"""Real traffic on the emulated cluster: a local connection between two pods of one node, and
the VXLAN datapath between nodes for both payloads (IP: routed, a policy table per connection;
ETHERNET: bridged, ARP and any frame cross), IPv4 and IPv6, with its MTU (1450 on a 1500 underlay,
1350 on 1400) enforced at the sender, never a silent drop; refreshes change nothing in the
kernel of either node."""

from __future__ import annotations

import os

import pytest

from nsm.forwarder.vxlan import VXLAN_PORT

pytestmark = [pytest.mark.kernel, pytest.mark.asyncio(loop_scope="session")]

TUNNEL_MTU = 1450
MAX_ICMP_PAYLOAD = TUNNEL_MTU - 28  # IPv4 header 20 + ICMP header 8
NODE_IP = {"node1": "172.30.0.1", "node2": "172.30.0.2", "node3": "172.30.0.3"}
ENDPOINT = {"ip": "nse-ip", "eth": "nse-eth"}
ETHERTYPE = 0x88B5  # IEEE 802 local experimental


def ip_of(cidr: str) -> str:
    return cidr.split("/")[0]


async def both_ways(cluster, client_ns: str, server_ns: str, src: str, dst: str,
                    client_if: str = "nsm-1") -> None:
    """scapy ICMP echo client → endpoint and endpoint → client, then TCP both ways."""
    out = await cluster.icmp(client_ns, src, dst, 0x4E53, b"to-nse")
    assert out is not None, f"no echo reply from {dst} in the client pod"
    assert (out["src"], out["dst"], out["type"], out["id"]) == (dst, src, 0, 0x4E53)
    assert out["payload"] == b"to-nse" and out["iface"] == client_if
    back = await cluster.icmp(server_ns, dst, src, 0x4E54, b"to-nsc")
    assert back is not None, f"no echo reply from {src} in the endpoint pod"
    assert (back["src"], back["dst"], back["type"], back["id"]) == (src, dst, 0, 0x4E54)
    assert back["payload"] == b"to-nsc"
    await cluster.tcp(client_ns, server_ns, dst, 256 * 1024)
    await cluster.tcp(server_ns, client_ns, src, 16 * 1024)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("service", ["ip", "eth"])
async def test_kernel2kernel_on_one_node(cluster, service: str) -> None:
    nse = ENDPOINT[service]
    client, conn, pod = await cluster.connect("node2", service, name=f"nsc-local-{service}")
    ip = conn.context.ip_context
    src, dst = ip.src_ip_addrs[0], ip.dst_ip_addrs[0]
    assert [s.name for s in conn.path.path_segments] == [
        client.name, "node2", "node2-fwd", nse]
    assert conn.network_service_endpoint_name == nse
    assert conn.mechanism.type == "KERNEL" and conn.mechanism.parameters["name"] == "nsm-1"
    # One veth straight between the two pods: nothing on any node.
    for node in ("node1", "node2", "node3"):
        assert await cluster.tunnel_links(node) == {}, node
        assert await cluster.policy(node) == [], node
    nse_ns = cluster.nse_netns(nse)
    client_link = await cluster.netlink.link(pod, "nsm-1")
    nse_link = await cluster.iface_with(nse_ns, dst)
    assert client_link is not None and client_link.oper_up and client_link.kind == "veth"
    assert src in await cluster.netlink.addresses(pod, "nsm-1")
    await both_ways(cluster, pod, nse_ns, ip_of(src), ip_of(dst))

    await client.close(raise_errors=True)
    assert await cluster.link_names(pod) == []
    assert nse_link.name not in await cluster.link_names(nse_ns)


async def check_remote_halves(cluster, conn_payload: str) -> dict[str, str]:
    """One half per node (node1: client side, node2: endpoint side) with the right shape;
    returns the VXLAN device name per node."""
    vx_names = {}
    vnis = set()
    for node, peer in (("node1", "node2"), ("node2", "node1")):
        links = await cluster.tunnel_links(node)
        kinds = sorted((name[:3], link.kind) for name, link in links.items())
        want = [("nsv", "veth"), ("nsx", "vxlan")]
        if conn_payload == "ETHERNET":
            want.insert(0, ("nsb", "bridge"))
        assert kinds == want, f"{node}: {sorted(links)}"
        for link in links.values():
            assert link.mtu == TUNNEL_MTU, f"{node}: {link.name} mtu {link.mtu}"
            assert link.admin_up, f"{node}: {link.name} is down"
        (vx_name,) = [n for n in links if n.startswith("nsx")]
        vx_names[node] = vx_name
        vx = cluster.vxlans(node)[vx_name]
        assert vx["port"] == VXLAN_PORT == 4789
        assert vx["local"] == NODE_IP[node] and vx["remote"] == NODE_IP[peer]
        vnis.add(vx["id"])
        if conn_payload == "ETHERNET":
            (br,) = [link for n, link in links.items() if n.startswith("nsb")]
            enslaved = sorted(link.name[:3] for link in links.values() if link.master == br.index)
            assert enslaved == ["nsv", "nsx"], f"{node}: bridge ports {enslaved}"
            assert await cluster.policy(node) == [], f"{node}: routed bits on a bridged path"
        else:
            rules = [r for r in await cluster.netlink.rules(cluster.node_netns(node))
                     if r.priority == 1000]
            assert sorted(r.iif[:3] for r in rules) == ["nsv", "nsx"], f"{node}: rules {rules}"
            (table,) = {r.table for r in rules}
            routes = await cluster.netlink.routes(cluster.node_netns(node), table=table)
            assert "0.0.0.0/0" in {r.dst for r in routes}, f"{node}: table {table}: {routes}"
            assert f"lookup {table}" in cluster.rules_text(node)
    assert len(vnis) == 1, f"both ends of the tunnel must use one VNI: {vnis}"
    return vx_names


@pytest.mark.timeout(60)
async def test_kernel2ip2kernel_across_nodes(cluster) -> None:
    client, conn, pod = await cluster.connect("node1", "ip", name="nsc-k2ip2k")
    assert [s.name for s in conn.path.path_segments] == [
        client.name, "node1", "node1-fwd", "node2", "node2-fwd", "nse-ip"]
    assert len({s.id for s in conn.path.path_segments}) == 6
    assert conn.payload == "IP"
    assert conn.context.MTU == TUNNEL_MTU
    ip = conn.context.ip_context
    src, dst = ip.src_ip_addrs[0], ip.dst_ip_addrs[0]
    nse_ns = cluster.nse_netns("nse-ip")
    client_link = await cluster.netlink.link(pod, "nsm-1")
    nse_link = await cluster.iface_with(nse_ns, dst)
    assert client_link is not None and client_link.oper_up
    assert (client_link.mtu, nse_link.mtu) == (TUNNEL_MTU, TUNNEL_MTU)
    await check_remote_halves(cluster, "IP")
    assert await cluster.tunnel_links("node3") == {}
    # Routed: the pod's peer is a permanent neighbour (no ARP over the tunnel).
    (neigh,) = cluster.ip_json(pod, "neigh", "show", "dev", "nsm-1", "to", ip_of(dst))
    assert "PERMANENT" in neigh["state"], neigh

    await both_ways(cluster, pod, nse_ns, ip_of(src), ip_of(dst))
    await client.close(raise_errors=True)
    await cluster.assert_clean()


@pytest.mark.timeout(60)
async def test_kernel2ethernet2kernel_across_nodes(cluster) -> None:
    client, conn, pod = await cluster.connect("node1", "eth", name="nsc-k2eth2k")
    assert [s.name for s in conn.path.path_segments] == [
        client.name, "node1", "node1-fwd", "node2", "node2-fwd", "nse-eth"]
    assert conn.payload == "ETHERNET"
    assert conn.context.MTU == TUNNEL_MTU
    ip = conn.context.ip_context
    src, dst = ip_of(ip.src_ip_addrs[0]), ip_of(ip.dst_ip_addrs[0])
    nse_ns = cluster.nse_netns("nse-eth")
    client_link = await cluster.netlink.link(pod, "nsm-1")
    nse_link = await cluster.iface_with(nse_ns, ip.dst_ip_addrs[0])
    assert client_link is not None and client_link.oper_up
    assert (client_link.mtu, nse_link.mtu) == (TUNNEL_MTU, TUNNEL_MTU)
    await check_remote_halves(cluster, "ETHERNET")

    # ARP crosses the nodes: a who-has from the client pod is answered with the NSE's MAC.
    reply = await cluster.arp(pod, "nsm-1", src, dst)
    assert reply is not None, f"no ARP reply for {dst} across the tunnel"
    assert (reply["psrc"], reply["pdst"]) == (dst, src)
    assert reply["hwsrc"] == reply["ether_src"] == nse_link.mac
    assert reply["ether_dst"] == client_link.mac
    # and the kernel's own resolution ends in a learned (not static) neighbour entry
    await cluster.assert_ping(pod, dst)
    (neigh,) = cluster.ip_json(pod, "neigh", "show", "dev", "nsm-1", "to", dst)
    assert neigh["lladdr"] == nse_link.mac
    assert "PERMANENT" not in neigh["state"] and "FAILED" not in neigh["state"], neigh

    # Any L2 frame crosses untouched: a custom EtherType, unicast and broadcast.
    token = os.urandom(4).hex().encode()
    frames = [(nse_link.mac, ETHERTYPE, b"nsm-l2-unicast-" + token),
              ("ff:ff:ff:ff:ff:ff", ETHERTYPE, b"nsm-l2-broadcast-" + token)]
    sender_mac, got = await cluster.l2(pod, "nsm-1", nse_ns, nse_link.name, frames, ETHERTYPE)
    assert sender_mac == client_link.mac
    assert sorted((g["dst"], g["payload"]) for g in got) == sorted((d, p) for d, _, p in frames)
    assert all(g["src"] == client_link.mac and g["type"] == ETHERTYPE for g in got), got

    await both_ways(cluster, pod, nse_ns, src, dst)
    await client.close(raise_errors=True)
    await cluster.assert_clean()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("service", ["ip", "eth"])
async def test_mtu_full_size_passes_one_byte_more_is_refused(cluster, service: str) -> None:
    client, conn, pod = await cluster.connect("node1", service, name=f"nsc-mtu-{service}")
    assert conn.context.MTU == TUNNEL_MTU
    ip = conn.context.ip_context
    src, dst = ip_of(ip.src_ip_addrs[0]), ip_of(ip.dst_ip_addrs[0])
    nse_ns = cluster.nse_netns(ENDPOINT[service])
    for sender, peer in ((pod, dst), (nse_ns, src)):
        full = await cluster.ping(sender, peer, count=2, size=MAX_ICMP_PAYLOAD, dont_fragment=True)
        assert full.received == 2, f"{TUNNEL_MTU}-byte DF packets from {sender}: {full.errors}"
        over = await cluster.ping(sender, peer, count=1, size=MAX_ICMP_PAYLOAD + 1,
                                  dont_fragment=True)
        assert over.received == 0
        # Refused loudly: EMSGSIZE at the sender (or an ICMP frag-needed), never a silent drop.
        assert over.errors, f"a {TUNNEL_MTU + 1}-byte DF packet vanished without an error"
        assert all("Message too long" in e or "fragmentation needed" in e for e in over.errors), \
            over.errors
        # Without DF the same size is fragmented at the sender and arrives.
        frag = await cluster.ping(sender, peer, count=1, size=MAX_ICMP_PAYLOAD + 1)
        assert frag.received == 1, frag.errors
    # Full-size TCP segments cross both ways (a wrong MTU would stall here).
    await cluster.tcp(pod, nse_ns, dst, 1024 * 1024)
    await cluster.tcp(nse_ns, pod, src, 256 * 1024)
    await client.close(raise_errors=True)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("service", ["ip6", "eth6"])
async def test_ipv6_across_nodes(cluster, service: str) -> None:
    """IPv6 addresses over the (IPv4) VXLAN underlay: routed (a ``::/0`` route and IPv6 rules in
    the connection's table) and bridged (neighbour discovery crosses)."""
    client, conn, pod = await cluster.connect("node1", service, name=f"nsc-{service}")
    nse = {"ip6": "nse-ip6", "eth6": "nse-eth6"}[service]
    assert [s.name for s in conn.path.path_segments][1:] == [
        "node1", "node1-fwd", "node2", "node2-fwd", nse]
    assert conn.context.MTU == TUNNEL_MTU
    ip = conn.context.ip_context
    assert (ip.src_ip_addrs[0], ip.dst_ip_addrs[0]) == (
        {"ip6": "fd00:16::2/128", "eth6": "fd00:17::2/128"}[service],
        {"ip6": "fd00:16::1/128", "eth6": "fd00:17::1/128"}[service])
    nse_ns = cluster.nse_netns(nse)
    assert ip.src_ip_addrs[0] in await cluster.netlink.addresses(pod, "nsm-1")
    await cluster.iface_with(nse_ns, ip.dst_ip_addrs[0])
    if service == "ip6":
        for node in ("node1", "node2"):
            rules = [r for r in await cluster.netlink.rules(cluster.node_netns(node))
                     if r.priority == 1000]
            assert {r.family for r in rules} == {6}, rules
            tables = {r.table for r in rules}
            routes = [r for r in await cluster.netlink.routes(cluster.node_netns(node), table=None)
                      if r.table in tables]
            assert "::/0" in {r.dst for r in routes}, routes
    await both_ways(cluster, pod, nse_ns, ip_of(ip.src_ip_addrs[0]), ip_of(ip.dst_ip_addrs[0]))
    await client.close(raise_errors=True)
    await cluster.assert_clean()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("service", ["ip", "eth"])
async def test_refresh_changes_nothing_on_either_node(cluster, service: str) -> None:
    updates = []
    lifetime = 1.5  # refreshed at a third of the time left: about every 0.5 s
    client, conn, pod = await cluster.connect("node1", service, lifetime=lifetime,
                                              on_update=updates.append)
    nse_ns = cluster.nse_netns(ENDPOINT[service])
    nse_if = (await cluster.iface_with(nse_ns, conn.context.ip_context.dst_ip_addrs[0])).name

    async def state() -> tuple:
        links = {}
        for node in ("node1", "node2"):
            links[node] = sorted((n, li.index, li.mac, li.mtu, li.master)
                                 for n, li in (await cluster.tunnel_links(node)).items())
        rules = {node: sorted((r.iif, r.table) for r in
                              await cluster.netlink.rules(cluster.node_netns(node))
                              if r.priority == 1000) for node in ("node1", "node2")}
        vnis = {node: sorted(v["id"] for v in cluster.vxlans(node).values())
                for node in ("node1", "node2")}
        c = await cluster.netlink.link(pod, "nsm-1")
        e = await cluster.netlink.link(nse_ns, nse_if)
        return (links, rules, vnis, (c.index, c.mac, c.mtu), (e.index, e.mac, e.mtu),
                sorted(await cluster.netlink.addresses(pod, "nsm-1")))

    before = await state()
    await cluster.eventually(lambda: _at_least(updates, 5), timeout=15, what="4 refreshes")
    assert await state() == before
    assert {u.id for u in updates} == {conn.id}
    assert {u.network_service_endpoint_name for u in updates} == {ENDPOINT[service]}
    await cluster.assert_ping(pod, ip_of(conn.context.ip_context.dst_ip_addrs[0]))
    await client.close(raise_errors=True)


async def _at_least(items: list, n: int) -> bool:
    return len(items) >= n


@pytest.mark.timeout(90)
async def test_tunnel_mtu_follows_the_underlay(new_lab) -> None:
    """On a 1400-byte underlay the connections get 1350, and DF sizes are enforced at that."""
    from nsm.lab import EndpointSpec, NodeSpec, ServiceSpec, Topology

    topo = Topology(nodes=(NodeSpec("node1"), NodeSpec("node2")),
                    endpoints=(EndpointSpec("m-ip", "node2", ("m-ip",), "172.16.7.0/24"),
                               EndpointSpec("m-eth", "node2", ("m-eth",), "172.16.8.0/24")),
                    services=(ServiceSpec("m-ip"), ServiceSpec("m-eth", payload="ETHERNET")),
                    mtu=1400)
    async with new_lab(topo, tag="m") as cluster:
        for service in ("m-ip", "m-eth"):
            client, conn, pod = await cluster.connect("node1", service)
            assert conn.context.MTU == 1350
            assert (await cluster.netlink.link(pod, "nsm-1")).mtu == 1350
            dst = ip_of(conn.context.ip_context.dst_ip_addrs[0])
            full = await cluster.ping(pod, dst, count=1, size=1350 - 28, dont_fragment=True)
            assert full.received == 1, full.errors
            over = await cluster.ping(pod, dst, count=1, size=1350 - 27, dont_fragment=True)
            assert over.received == 0 and over.errors, over
            for node in ("node1", "node2"):
                assert {li.mtu for li in (await cluster.tunnel_links(node)).values()} == {1350}
            await client.close(raise_errors=True)
        await cluster.assert_clean()

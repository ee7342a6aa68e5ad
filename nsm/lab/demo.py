"""``nsm demo``: a throwaway two-node mesh on this machine, shown working, then torn down.

It builds an emulated cluster (nodes and pods are network namespaces, joined by a bridged
underlay; the registry, and per node a manager and a forwarder, run as real processes inside the
node namespaces), runs an endpoint in a pod on node2, requests its service from a pod on node1,
and shows the path, the VXLAN tunnel, the link with its addresses, and pings across it. Then it
removes everything, also on Ctrl-C or failure. ``--local`` puts the endpoint on node1 instead
(a veth between the two pods of one node).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

from nsm.client.sdk import Client
from nsm.config import flag
from nsm.kernel.netlink import Netlink
from nsm.kernel.ping import ping
from nsm.lab import EndpointSpec, Lab, NodeSpec, PodSpec, ServiceSpec, Topology
from nsm.mechanisms import PAYLOADS
from nsm.security.tokens import claims_of


def add_arguments(parser: argparse.ArgumentParser) -> None:
    flag(parser, "--service", help="name of the demo network service", default="demo")
    flag(parser, "--payload", help="payload of the service", default="IP", choices=list(PAYLOADS))
    flag(parser, "--cidr", help="endpoint address pool", default="172.31.250.0/24")
    flag(parser, "--pings", help="number of pings", type=int, default=5)
    flag(parser, "--local", help="endpoint on the client's node", switch=True, default=False)
    flag(parser, "--insecure", help="run every daemon --insecure (plaintext, no identities)",
         switch=True, default=False)


def say(text: str = "") -> None:
    print(text, flush=True)


def topology(args: argparse.Namespace) -> Topology:
    nse_node = "node1" if args.local else "node2"
    return Topology(
        nodes=(NodeSpec("node1"), NodeSpec("node2")),
        pods=(PodSpec("client", "node1"), PodSpec("server", nse_node)),
        endpoints=(EndpointSpec("demo-nse", nse_node, (args.service,), args.cidr, pod="server"),),
        services=(ServiceSpec(args.service, payload=args.payload),),
    )


async def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        say("nsm demo: needs root (it creates network namespaces and links)")
        return 1
    started = time.perf_counter()
    topo = topology(args)
    netlink = Netlink()
    ok = False
    try:
        async with Lab(topo, prefix=f"nsmdemo{os.getpid()}", secure=not args.insecure) as lab:
            say(f"cluster up in {lab.build_seconds:.1f} s:")
            if lab.secure:
                say(f"  security: mTLS on every hop, X.509-SVIDs of a built-in CA (trust domain "
                    f"{lab.trust_domain}), signed path tokens, authorization")
            else:
                say("  security: NONE (--insecure): plaintext, no identities")
            for spec in topo.nodes:
                node = lab.node(spec.name)
                say(f"  {node.name}: namespace {node.netns}, underlay {node.ip}, "
                    f"manager {node.manager_tcp_url}")
            client_pod = lab.pod("client")
            say(f"  endpoint demo-nse in pod 'server' on {lab.endpoint('demo-nse').node}; "
                f"client pod 'client' on node1")
            ok = await show(args, lab, netlink, client_pod.netns)
    finally:
        await netlink.close()
        say(f"torn down: processes stopped, namespaces removed "
            f"({time.perf_counter() - started:.1f} s in all)")
    return 0 if ok else 1


async def show(args: argparse.Namespace, lab: Lab, netlink: Netlink, client_ns: str) -> bool:
    node1 = lab.node("node1")
    client = Client(manager_url=node1.manager_url, service=args.service, netns=client_ns,
                    ifname="nsm-1", labels={"app": "demo"}, security=lab.pod_identity(client_ns),
                    manager_id=lab.manager_id("node1"))
    t0 = time.perf_counter()
    conn = await client.request()
    try:
        setup_ms = (time.perf_counter() - t0) * 1000
        say(f"\nconnection to {conn.network_service!r} ({conn.payload}) in {setup_ms:.1f} ms; "
            f"path of {len(conn.path.path_segments)} segments:")
        for i, seg in enumerate(conn.path.path_segments):
            signed = f"  signed by {claims_of(seg.token).sub}" if seg.token else ""
            say(f"  {i}. {seg.name:14}{signed}")
        for link in await netlink.links(node1.netns):
            if link.kind == "vxlan":
                vni = getattr(link, "vxlan_id", None)
                detail = f" vni {vni}" if vni is not None else ""
                say(f"tunnel on node1: {link.name} (vxlan{detail}, udp 4789) mtu {link.mtu}")
        link = await netlink.link(client_ns, "nsm-1")
        addrs = [a for a in await netlink.addresses(client_ns, "nsm-1") if ":" not in a]
        ip = conn.context.ip_context
        if link is not None:
            say(f"client pod link: {link.name} mtu {link.mtu} "
                f"{'up' if link.oper_up else 'down'}, address {', '.join(addrs)}; "
                f"endpoint {', '.join(ip.dst_ip_addrs)}")
        dst = ip.dst_ip_addrs[0].split("/")[0]
        result = await asyncio.to_thread(ping, client_ns, dst, count=args.pings, interval=0.2)
        for i, rtt in enumerate(result.rtts_ms, 1):
            say(f"  ping {dst}: seq={i} time={rtt:.3f} ms")
        say(f"  {result.sent} sent, {result.received} received, {result.loss:.0%} loss")
        mtu = conn.context.MTU or (link.mtu if link else 1500)
        full = await asyncio.to_thread(ping, client_ns, dst, count=1, size=mtu - 28,
                                       dont_fragment=True)
        say(f"  {mtu}-byte packet with don't-fragment: "
            f"{'passes' if full.received else 'FAILS ' + ', '.join(full.errors)}")
        return result.received == result.sent and full.received == 1
    finally:
        await client.close()
        gone = await netlink.link(client_ns, "nsm-1") is None
        say(f"\nclosed: client interface {'removed' if gone else 'STILL PRESENT'}")

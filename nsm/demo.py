"""``nsm demo``: a throwaway mesh on this machine, shown working, then torn down.

It creates namespaces for a client pod and an endpoint pod, starts the registry, a manager, a
forwarder and an endpoint as real processes, requests the service from the client's namespace,
prints the path, the link and its addresses, pings through the link, and removes everything,
also on Ctrl-C or failure.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
from pathlib import Path

from nsm import netns as nsns
from nsm.client.sdk import Client
from nsm.config import flag
from nsm.forwarder.netlink import Netlink
from nsm.ping import ping
from nsm.procs import Daemon


def add_arguments(parser: argparse.ArgumentParser) -> None:
    flag(parser, "--service", help="name of the demo network service", default="demo-ip")
    flag(parser, "--cidr", help="endpoint address pool", default="172.31.250.0/24")
    flag(parser, "--pings", help="number of pings", type=int, default=5)
    flag(parser, "--keep-logs", help="keep the daemons' logs", switch=True, default=False)


def say(text: str = "") -> None:
    print(text, flush=True)


async def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        say("nsm demo: needs root (it creates network namespaces and links)")
        return 1
    tag = f"nsmdemo{os.getpid()}"
    work = Path(tempfile.mkdtemp(prefix=f"{tag}-"))
    namespaces: list[str] = []
    daemons: list[Daemon] = []
    netlink = Netlink()
    client: Client | None = None
    started = time.perf_counter()
    try:
        nsc_ns = nsns.create_netns(f"{tag}-nsc")
        namespaces.append(f"{tag}-nsc")
        nse_ns = nsns.create_netns(f"{tag}-nse")
        namespaces.append(f"{tag}-nse")
        say(f"namespaces: client pod {nsc_ns}, endpoint pod {nse_ns}")

        reg_url = f"unix://{work}/registry.sock"
        mgr_url = f"unix://{work}/manager.sock"
        fwd_url = f"unix://{work}/forwarder.sock"
        nse_url = f"unix://{work}/nse.sock"
        specs = [
            ("registry", ["registry", "--listen", reg_url], reg_url),
            ("manager", ["manager", "--name", "node1", "--listen", mgr_url,
                         "--registry", reg_url], mgr_url),
            ("forwarder", ["forwarder", "--name", "node1-fwd", "--node", "node1", "--listen",
                           fwd_url, "--manager", mgr_url, "--registry", reg_url], fwd_url),
            ("nse", ["nse", "--name", "demo-nse", "--service", args.service, "--cidr", args.cidr,
                     "--netns", nse_ns, "--listen", nse_url, "--registry", reg_url], nse_url),
        ]
        for name, argv, url in specs:
            d = Daemon(name, argv, url=url, log_path=work / f"{name}.log")
            daemons.append(d)
            await d.start()
            say(f"started {name:9} pid {d.pid:<7} {url}")

        client = Client(manager_url=mgr_url, service=args.service, netns=nsc_ns, ifname="nsm-1",
                        labels={"app": "demo"})
        t0 = time.perf_counter()
        conn = await client.request()
        setup_ms = (time.perf_counter() - t0) * 1000
        say(f"\nconnection {conn.id} to {conn.network_service!r} in {setup_ms:.1f} ms")
        say("path:")
        for i, seg in enumerate(conn.path.path_segments):
            say(f"  {i}. {seg.name:12} id {seg.id}")
        ip = conn.context.ip_context
        link = await netlink.link(nsc_ns, "nsm-1")
        addrs = await netlink.addresses(nsc_ns, "nsm-1")
        if link is not None:
            state = "up" if link.oper_up else "down"
            say(f"\nclient pod link: {link.name} mtu {link.mtu} {state} mac {link.mac}")
        say(f"  addresses: {', '.join(addrs)}   endpoint: {', '.join(ip.dst_ip_addrs)}")
        dst = ip.dst_ip_addrs[0].split("/")[0]
        result = await asyncio.to_thread(ping, nsc_ns, dst, count=args.pings, interval=0.2)
        for i, rtt in enumerate(result.rtts_ms, 1):
            say(f"  ping {dst}: seq={i} time={rtt:.3f} ms")
        say(f"  {result.sent} sent, {result.received} received, {result.loss:.0%} loss")
        ok = result.received == result.sent
        await client.close()
        client = None
        gone = await netlink.link(nsc_ns, "nsm-1") is None
        say(f"\nclosed: client interface {'removed' if gone else 'STILL PRESENT'}")
        return 0 if ok and gone else 1
    finally:
        if client is not None:
            await asyncio.shield(client.close())
        for d in reversed(daemons):
            await asyncio.shield(d.stop())
        await netlink.close()
        for name in namespaces:
            nsns.delete_netns(name)
        if args.keep_logs:
            say(f"logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
        say(f"torn down: {len(daemons)} processes, {len(namespaces)} namespaces "
            f"({time.perf_counter() - started:.1f} s in all)")

"""What the data-plane liveness check (:mod:`nsm.kernel.liveness`) costs an agent.

``n`` connections, each a client namespace (a pod) with a veth to one shared endpoint namespace,
an IPv4 /32 pair (and an IPv6 /128 pair with ``--ipv6``). Measured in this process:

- one check of one connection, sockets already open (wall time and CPU time per check);
- the first check in a namespace (its sockets opened: setns, socket, filter, back);
- ``n`` connections watched every ``interval`` s for ``duration`` s (the reference's defaults:
  200 ms, 1 s timeout): CPU of the process (user + system) as a share of one core, checks done,
  transitions to dead (0 expected), event-loop lag (a 10 ms ticker's overshoot) and threads.

    python -m bench.liveness [--n 200] [--duration 10] [--interval 0.2] [--ipv6] [--json-only]
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import sys
import threading
import time
from typing import Any

from bench.common import Scratch, cpu_split, say, summarize
from nsm.kernel.liveness import Liveness
from nsm.kernel.netlink import Netlink

_V4 = ipaddress.ip_network("172.20.0.0/16")
_V6 = ipaddress.ip_network("fd00:20::/64")


def _pair(net: ipaddress.IPv4Network | ipaddress.IPv6Network, i: int) -> tuple[str, str]:
    """(client, endpoint) addresses of connection ``i``."""
    base = net.network_address + 4 * i
    return str(base + 2), str(base + 1)


async def _build(nl: Netlink, scratch: Scratch, n: int, ipv6: bool) -> list[tuple[str, list[str]]]:
    server = scratch.netns("nse")
    clients = scratch.netns_many("c", n)
    out = []
    for i, client in enumerate(clients):
        await nl.create_veth("nsm-1", client, f"nse-{i}", server)
        families = [_V4, _V6] if ipv6 else [_V4]
        pairs = [_pair(net, i) for net in families]
        mask = {4: 32, 6: 128}
        c_addrs = [f"{c}/{mask[ipaddress.ip_address(c).version]}" for c, _ in pairs]
        s_addrs = [f"{s}/{mask[ipaddress.ip_address(s).version]}" for _, s in pairs]
        await nl.setup_interface(client, "nsm-1", addresses=c_addrs, mtu=1500,
                                 routes=[(a, None) for a in s_addrs])
        await nl.setup_interface(server, f"nse-{i}", addresses=s_addrs, mtu=1500,
                                 routes=[(a, None) for a in c_addrs])
        out.append((client, [s for _, s in pairs]))
    for i, (client, _) in enumerate(out):
        await nl.wait_ready(client, "nsm-1", 3.0)
        await nl.wait_ready(server, f"nse-{i}", 3.0)
    nl.forget(server)
    for client, _ in out:
        nl.forget(client)
    return out


async def _ticker(lags: list[float], stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        t = loop.time()
        await asyncio.sleep(0.01)
        lags.append((loop.time() - t - 0.01) * 1000)


async def measure(n: int, duration: float, interval: float, ipv6: bool) -> dict[str, Any]:
    async with Scratch("liveness") as scratch, Netlink() as nl, Liveness() as lv:
        say(f"building {n} connections")
        conns = await _build(nl, scratch, n, ipv6)

        # Warm-up: every data path answers (a fresh veth may take ~1 s), sockets opened.
        first_ms: list[float] = []
        for client, addrs in conns:
            t = time.perf_counter()
            await lv.check(client, addrs, ifname="nsm-1")
            first_ms.append((time.perf_counter() - t) * 1000)
        for client, addrs in conns:
            for _ in range(20):
                if (await lv.check(client, addrs, ifname="nsm-1")).alive:
                    break

        say("one check, sequentially")
        client, addrs = conns[0]
        reps = 1000
        walls: list[float] = []
        cpu0 = time.process_time()
        for _ in range(reps):
            t = time.perf_counter()
            result = await lv.check(client, addrs, ifname="nsm-1")
            walls.append((time.perf_counter() - t) * 1000)
            assert result.alive, result
        cpu_per_check_us = (time.process_time() - cpu0) / reps * 1e6

        say(f"{n} watches every {interval} s for {duration} s")
        dead: list[str] = []
        threads = threading.active_count()
        lags: list[float] = []
        stop = asyncio.Event()
        ticker = asyncio.ensure_future(_ticker(lags, stop))
        u0, s0 = cpu_split()
        t0 = time.monotonic()
        watches = [lv.watch(c, a, ifname="nsm-1", interval=interval,
                            on_dead=lambda r, c=c: dead.append(f"{c}: {r.reason}"))
                   for c, a in conns]
        await asyncio.sleep(duration)
        checks = sum(w.checks for w in watches)
        u1, s1 = cpu_split()
        wall = time.monotonic() - t0
        threads_during = threading.active_count()
        for w in watches:
            await w.stop()
        stop.set()
        await ticker
        lag = summarize(lags)
        return {
            "name": "liveness",
            "connections": n,
            "families": 2 if ipv6 else 1,
            "sockets": lv.socket_count(),
            "first_check_ms": summarize(first_ms),
            "one_check_ms": summarize(walls),
            "one_check_cpu_us": round(cpu_per_check_us, 1),
            "watch": {
                "interval_s": interval,
                "duration_s": round(wall, 2),
                "checks": checks,
                "checks_per_s": round(checks / wall, 1),
                "cpu_user_s": round(u1 - u0, 2),
                "cpu_sys_s": round(s1 - s0, 2),
                "cpu_share_of_one_core": round((u1 - u0 + s1 - s0) / wall, 3),
                "cpu_us_per_check": round((u1 - u0 + s1 - s0) / max(checks, 1) * 1e6, 1),
                "dead_transitions": len(dead),
                "dead_first": dead[:3],
                "loop_lag_ms": {k: lag[k] for k in ("p50", "p99", "max") if k in lag},
                "threads": threads_during - threads,
            },
        }


def _table(r: dict[str, Any]) -> str:
    w = r["watch"]
    return "\n".join([
        f"liveness: {r['connections']} connections, {r['families']} famil"
        f"{'ies' if r['families'] > 1 else 'y'}, {r['sockets']} sockets",
        f"  one check (sockets open): p50 {r['one_check_ms']['p50']} ms, "
        f"p99 {r['one_check_ms']['p99']} ms, CPU {r['one_check_cpu_us']} µs",
        f"  first check in a namespace: p50 {r['first_check_ms']['p50']} ms",
        f"  {r['connections']} watched every {w['interval_s']} s for {w['duration_s']} s: "
        f"{w['checks']} checks ({w['checks_per_s']}/s), CPU {w['cpu_share_of_one_core'] * 100:.1f} % "
        f"of one core ({w['cpu_us_per_check']} µs/check; user {w['cpu_user_s']} s, sys "
        f"{w['cpu_sys_s']} s), dead {w['dead_transitions']}, loop lag p99 "
        f"{w['loop_lag_ms'].get('p99')} ms, extra threads {w['threads']}",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--interval", type=float, default=0.2)
    parser.add_argument("--ipv6", action="store_true")
    parser.add_argument("--json-only", action="store_true")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    result = asyncio.run(measure(args.n, args.duration, args.interval, args.ipv6))
    print(json.dumps(result, indent=None if args.json_only else 2))
    if not args.json_only:
        print(_table(result))
    return 0 if result["watch"]["dead_transitions"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

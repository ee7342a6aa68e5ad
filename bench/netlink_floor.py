"""The floor for the kernel work of one local connection, through :mod:`nsm.kernel.netlink`.

One connection = what the forwarder does for a KERNEL/LOCAL connection: a veth with one end in the
client's namespace and one in the endpoint's (created directly there, with MTU), then
on each end MTU + alias + up + a /32 address + a /32 route to the other side; later the veth is deleted.
Every connection has its own client namespace (a pod) and all share one endpoint namespace; the
namespaces exist before the clock starts (making and destroying them is not the forwarder's work),
but their netlink sockets are opened inside the timed part, as the forwarder must for a new pod.

    python -m bench.netlink_floor [--n 200] [--concurrency 20] [--json-only]

``await measure_floor(n, concurrency)`` returns the same dict, for a benchmark in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import secrets
import sys
import time
from typing import Any

from bench.common import IFNAME, for_each, ms, rates, summarize
from nsm.kernel import netns as nsmod
from nsm.kernel.netlink import Netlink


async def measure_floor(n: int, concurrency: int) -> dict[str, Any]:
    """Set up ``n`` local connections, ``concurrency`` at a time, then delete them the same way.
    Returns per-connection latencies (ms) and throughput (a deletion is the close of a local
    connection: ``close_ms``, ``closes_per_s``)."""
    if n < 1 or concurrency < 1:
        raise ValueError("n and concurrency must be positive")
    prefix = f"nf{os.getpid() % 100000}-{secrets.token_hex(2)}"
    names: list[str] = []
    nl = Netlink()
    try:
        nse = nsmod.create_netns(f"{prefix}-nse")
        names.append(f"{prefix}-nse")
        clients = []
        for i in range(n):
            clients.append(nsmod.create_netns(f"{prefix}-c{i}"))
            names.append(f"{prefix}-c{i}")
        net = ipaddress.ip_network("172.31.0.0/16")
        setup_ms: list[float] = []
        close_ms: list[float] = []

        async def setup(i: int) -> None:
            nse_ip, nsc_ip = net[2 * i + 1], net[2 * i + 2]
            t0 = time.perf_counter()
            await nl.create_veth(IFNAME, clients[i], f"nse-{i}", nse, mtu=1500)
            await asyncio.gather(
                nl.setup_interface(clients[i], IFNAME, addresses=[f"{nsc_ip}/32"],
                                   routes=[(f"{nse_ip}/32", None)], mtu=1500,
                                   alias=f"client-{i}"),
                nl.setup_interface(nse, f"nse-{i}", addresses=[f"{nse_ip}/32"],
                                   routes=[(f"{nsc_ip}/32", None)], mtu=1500,
                                   alias=f"server-{i}"))
            setup_ms.append(ms(t0, time.perf_counter()))

        async def close(i: int) -> None:
            t0 = time.perf_counter()
            if not await nl.delete_link(clients[i], IFNAME):
                raise RuntimeError(f"connection {i}: veth already gone")
            close_ms.append(ms(t0, time.perf_counter()))

        setup_wall = await for_each(n, concurrency, setup)
        close_wall = await for_each(n, concurrency, close)
    finally:
        await nl.close()
        for name in names:
            nsmod.delete_netns(name)
    return {**rates(n, concurrency, setup_wall, close_wall), "setup_ms": summarize(setup_ms),
            "close_ms": summarize(close_ms)}

def _table(results: list[dict[str, Any]]) -> str:
    head = (f"{'n':>5} {'conc':>5} | {'setup p50':>9} {'p95':>7} | {'delete p50':>10} {'p95':>7} "
            f"| {'setups/s':>8} {'deletes/s':>9}")
    rows = [head, "-" * len(head)]
    for r in results:
        rows.append(
            f"{r['n']:>5} {r['concurrency']:>5} | {r['setup_ms']['p50']:>9.2f} "
            f"{r['setup_ms']['p95']:>7.2f} | {r['close_ms']['p50']:>10.2f} "
            f"{r['close_ms']['p95']:>7.2f} | {r['setups_per_s']:>8.1f} {r['closes_per_s']:>9.1f}")
    return "\n".join(rows) + "\n(latencies in ms per connection)"


async def _main(n: int, concurrency: int) -> list[dict[str, Any]]:
    return [await measure_floor(n, 1), await measure_floor(n, concurrency)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--json-only", action="store_true")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    results = asyncio.run(_main(args.n, args.concurrency))
    print(json.dumps(results, indent=None if args.json_only else 2))
    if not args.json_only:
        print(_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

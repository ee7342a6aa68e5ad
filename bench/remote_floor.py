"""The floor for the kernel work of one REMOTE (cross-node, VXLAN, IP payload) connection.

The same kernel work as the two forwarders do for one connection between a client pod on node1
and an endpoint pod on node2 (:mod:`nsm.forwarder.vxlan`, ``_Datapath.build`` and ``_route``),
done directly with :class:`nsm.kernel.netlink.Netlink` (pyroute2), no daemons, no gRPC:

- **server half, on node2** (built first, as forwarder2 builds before it answers): a veth with
  the endpoint's end (``nsm<hash>``) in the endpoint pod and the node end ``nsv…`` in node2
  (MTU 1450, MACs, aliases); a VXLAN ``nsx…`` (VNI, local/remote tunnel address, UDP 4789, over
  ``eth0``, MTU 1450, fixed MAC, no learning); the pod end: MTU + up + /32 address + /32 route
  (one datagram); both node devices up; in the connection's policy table: the pod's /32 via the
  veth and a default route via the VXLAN to 169.254.0.1 on-link; permanent neighbours (pod
  address → pod MAC on the veth; 169.254.0.1 → the remote VXLAN MAC on the VXLAN); ``iif`` rules
  for both devices; a permanent neighbour in the pod (peer → node veth MAC); then the wait until
  the three devices are operationally up (``Netlink.wait_ready``);
- **client half, on node1**: the same toward the client pod (``nsm-1``).

Close = both halves removed concurrently (as forwarder1 removes its half while the Close travels
to node2): four rule deletions per half, then the veth and the VXLAN deleted.

The nodes are built like :mod:`nsm.lab` builds them (a fabric namespace with a bridge, node
namespaces with ``eth0`` on it, 172.30.0.<i>/24, MTU 1500, ``ip_forward=1``); every connection
has its own client pod namespace and all share one endpoint pod namespace. Namespaces exist
before the clock starts; their netlink sockets are opened inside the timed part, as the
forwarder must for a new pod.

    python -m bench.remote_floor [--n 200] [--concurrency 20] [--quick]

``await measure_remote_floor(n, concurrency)`` returns the figures for a benchmark in the same
run (:mod:`bench.remote_setup`). The hand-built nodes are :class:`bench.common.Fabric`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import random
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.common import (
    IFNAME,
    NODE_IF,
    TUNNEL_MTU,
    Fabric,
    HandNode,
    Scratch,
    fmt,
    machine,
    rates,
    say,
    summarize,
    sweep_stale,
)
from nsm.endpoint.kernel import ifname_for
from nsm.forwarder.kernel import alias_for
from nsm.forwarder.vxlan import GATEWAY_V4, RULE_PRIORITY, VNI_MAX, VNI_MIN, TablePool, mac_for, names_for
from nsm.kernel.netlink import Netlink
from nsm.mechanisms import VXLAN_PORT

NAME = "remote_floor"
DEFAULT_N = 200
DEFAULT_CONCURRENCY = 20
QUICK_N = 20
QUICK_CONCURRENCY = 5
FLOOR_CIDR = ipaddress.IPv4Network("172.31.0.0/16")


# ------------------------------------------------------------------------------ one half


@dataclass(frozen=True)
class Half:
    """What one forwarder builds for one IP-payload connection (``vxlan._Half`` plus where)."""

    conn_id: str  # this hop's connection id (names and MACs derive from it)
    node_ns: str
    local: str
    pod_ns: str
    pod_if: str
    vni: int
    remote: str
    remote_mac: str
    table: int
    pod_addrs: tuple[str, ...]
    pod_routes: tuple[tuple[str, str | None], ...]
    peer_addrs: tuple[str, ...]
    mtu: int = TUNNEL_MTU

    @property
    def veth(self) -> str:
        return names_for(self.conn_id)[0]

    @property
    def vxlan(self) -> str:
        return names_for(self.conn_id)[1]


@dataclass
class Steps:
    """Time (ms) of each step of building halves, summed per connection."""

    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, step: str, ms: float) -> None:
        self.values.setdefault(step, []).append(ms)

    def summary(self) -> dict[str, dict[str, float]]:
        return {k: summarize(v) for k, v in self.values.items()}


async def build_half(nl: Netlink, h: Half, steps: Steps | None = None, role: str = "") -> None:
    """Exactly what ``vxlan._Datapath.build`` does for an IP payload (node = ``h.node_ns``);
    each step's time goes to ``steps`` (keys prefixed with ``role``)."""
    node = h.node_ns
    pod_mac, veth_mac, vx_mac = (mac_for("pod", h.conn_id), mac_for("veth", h.conn_id),
                                 mac_for("vxlan", h.conn_id))
    t = time.perf_counter()

    def lap(step: str) -> None:
        nonlocal t
        now = time.perf_counter()
        if steps is not None:
            steps.add(f"{role}{step}", (now - t) * 1e3)
        t = now

    await nl.create_veth(h.pod_if, h.pod_ns, h.veth, node, mtu=h.mtu, mac=pod_mac,
                         peer_mac=veth_mac, alias=alias_for("pod", h.conn_id),
                         peer_alias=alias_for("node", h.conn_id))
    lap("create_veth (+aliases)")
    try:
        await nl.create_vxlan(h.vxlan, node, vni=h.vni, local=h.local, remote=h.remote,
                              port=VXLAN_PORT, underlay=NODE_IF, mtu=h.mtu, mac=vx_mac,
                              learning=False)
        lap("create_vxlan")
        await nl.setup_interface(h.pod_ns, h.pod_if, addresses=list(h.pod_addrs),
                                 routes=list(h.pod_routes), mtu=h.mtu)
        lap("pod end: mtu+up+addr+route")
        # _Datapath._route, IPv4 only (the addresses are IPv4)
        await asyncio.gather(nl.set_up(node, h.veth), nl.set_up(node, h.vxlan))
        lap("node devices up")
        for addr in h.pod_addrs:
            ip = str(ipaddress.ip_interface(addr).ip)
            await nl.add_route(node, f"{ip}/32", h.veth, table=h.table)
            await nl.neigh_replace(node, h.veth, ip, pod_mac)
        await nl.neigh_replace(node, h.vxlan, GATEWAY_V4, h.remote_mac)
        await nl.add_route(node, "0.0.0.0/0", h.vxlan, gateway=GATEWAY_V4, onlink=True,
                           table=h.table)
        for dev in (h.veth, h.vxlan):
            await nl.add_rule(node, iif=dev, table=h.table, priority=RULE_PRIORITY, family=4)
        for addr in h.peer_addrs:
            await nl.neigh_replace(h.pod_ns, h.pod_if, str(ipaddress.ip_interface(addr).ip),
                                   veth_mac)
        lap("table, neighbours, rules")
        ready = await asyncio.gather(nl.wait_ready(h.pod_ns, h.pod_if),
                                     nl.wait_ready(node, h.veth), nl.wait_ready(node, h.vxlan))
        lap("wait operstate up (x3)")
        if not all(ready):
            raise RuntimeError(f"{h.pod_if}/{h.veth}/{h.vxlan} not up after 1 s")
    except BaseException:
        await asyncio.shield(remove_half(nl, h))
        raise


async def remove_half(nl: Netlink, h: Half) -> None:
    """Exactly what ``vxlan._Datapath.remove`` does (rules of both families, then the links)."""
    for dev in (h.veth, h.vxlan):
        for version in (4, 6):
            await nl.del_rule(h.node_ns, iif=dev, table=h.table, priority=RULE_PRIORITY,
                              family=version)
    await asyncio.gather(nl.delete_link(h.node_ns, h.veth), nl.delete_link(h.node_ns, h.vxlan))


def connection_halves(i: int, node1: HandNode, node2: HandNode, client_ns: str, nse_ns: str,
                      vni: int, table1: int, table2: int,
                      cidr: ipaddress.IPv4Network = FLOOR_CIDR) -> tuple[Half, Half]:
    """The (server, client) halves of connection ``i``: what IPAM, the endpoint and the two
    forwarders would decide (each hop its own connection id)."""
    nse_ip, nsc_ip = cidr[2 * i + 1], cidr[2 * i + 2]
    id1, id2 = str(uuid.uuid4()), str(uuid.uuid4())
    server = Half(conn_id=id2, node_ns=node2.netns, local=node2.ip, pod_ns=nse_ns,
                  pod_if=ifname_for(str(uuid.uuid4())), vni=vni, remote=node1.ip,
                  remote_mac=mac_for("vxlan", id1), table=table2, pod_addrs=(f"{nse_ip}/32",),
                  pod_routes=((f"{nsc_ip}/32", None),), peer_addrs=(f"{nsc_ip}/32",))
    client = Half(conn_id=id1, node_ns=node1.netns, local=node1.ip, pod_ns=client_ns,
                  pod_if=IFNAME, vni=vni, remote=node2.ip, remote_mac=mac_for("vxlan", id2),
                  table=table1, pod_addrs=(f"{nsc_ip}/32",), pod_routes=((f"{nse_ip}/32", None),),
                  peer_addrs=(f"{nse_ip}/32",))
    return server, client


# ------------------------------------------------------------------------------ the floor


async def measure_remote_floor(n: int, concurrency: int, *, settle: float = 0.5) -> dict[str, Any]:
    """Set up ``n`` remote connections (server half, then client half), ``concurrency`` at a
    time, then remove them the same way (both halves concurrently). Latencies per connection
    (ms), rates, and the time of each build step."""
    if n < 1 or concurrency < 1:
        raise ValueError("n and concurrency must be positive")
    scratch = Scratch(f"rfloor{random.randrange(1 << 16):04x}")
    # One Netlink per node, as each node has its own forwarder (and its own deletion threads).
    nl = Netlink()
    nl1, nl2 = Netlink(), Netlink()
    setup_ms: list[float] = []
    server_ms: list[float] = []
    client_ms: list[float] = []
    close_ms: list[float] = []
    steps = Steps()
    failures: list[str] = []
    try:
        node1, node2 = await Fabric(scratch, nl).build(2)
        nse_ns = scratch.netns("nse")
        clients = scratch.netns_many("c", n)
        # Long-lived sockets, as the forwarders' own (opening a new pod's is timed).
        await asyncio.gather(nl1.index(node1.netns, "lo"), nl2.index(node2.netns, "lo"),
                             nl2.index(nse_ns, "lo"))
        tables1, tables2 = TablePool(), TablePool()
        vnis = random.sample(range(VNI_MIN, VNI_MAX), n)
        halves: list[tuple[Half, Half] | None] = [None] * n
        sem = asyncio.Semaphore(concurrency)

        async def setup(i: int) -> None:
            async with sem:
                server, client = connection_halves(i, node1, node2, clients[i], nse_ns, vnis[i],
                                                   tables1.allocate(), tables2.allocate())
                t0 = time.perf_counter()
                try:
                    await build_half(nl2, server, steps, "server: ")
                    t1 = time.perf_counter()
                    await build_half(nl1, client, steps, "client: ")
                except Exception as exc:
                    failures.append(f"setup {i}: {exc!r}"[:300])
                    return
                t2 = time.perf_counter()
                halves[i] = (server, client)
                setup_ms.append((t2 - t0) * 1e3)
                server_ms.append((t1 - t0) * 1e3)
                client_ms.append((t2 - t1) * 1e3)

        async def close(i: int) -> None:
            pair = halves[i]
            if pair is None:
                return
            async with sem:
                t0 = time.perf_counter()
                try:
                    await asyncio.gather(remove_half(nl1, pair[1]), remove_half(nl2, pair[0]))
                except Exception as exc:
                    failures.append(f"close {i}: {exc!r}"[:300])
                    return
                close_ms.append((time.perf_counter() - t0) * 1e3)
                halves[i] = None
                nl1.forget(clients[i])

        t0 = time.perf_counter()
        await asyncio.gather(*(setup(i) for i in range(n)))
        setup_wall = time.perf_counter() - t0
        await asyncio.sleep(settle)
        t0 = time.perf_counter()
        await asyncio.gather(*(close(i) for i in range(n)))
        close_wall = time.perf_counter() - t0
    finally:
        for each in (nl, nl1, nl2):
            await each.close()
        await scratch.aclose()
    return {
        **rates(n, concurrency, setup_wall, close_wall),
        "setup_ms": summarize(setup_ms),
        "server_half_ms": summarize(server_ms),
        "client_half_ms": summarize(client_ms),
        "close_ms": summarize(close_ms),
        "steps_ms_per_half": steps.summary(),
        "failures": len(failures),
        "failure_examples": failures[:5],
    }


def table(results: Sequence[dict[str, Any]]) -> str:
    """Floor results as a human table."""
    head = (f"{'n':>4} {'conc':>4} | {'setup p50':>9} {'p95':>7} | {'server½':>7} {'client½':>7} "
            f"| {'close p50':>9} {'p95':>7} | {'setups/s':>8} {'closes/s':>8}")
    rows = [head, "-" * len(head)]
    for r in results:
        rows.append(f"{r['n']:>4} {r['concurrency']:>4} | {fmt(r['setup_ms'].get('p50'), 9)} "
                    f"{fmt(r['setup_ms'].get('p95'), 7)} | {fmt(r['server_half_ms'].get('p50'), 7)} "
                    f"{fmt(r['client_half_ms'].get('p50'), 7)} | {fmt(r['close_ms'].get('p50'), 9)} "
                    f"{fmt(r['close_ms'].get('p95'), 7)} | {fmt(r['setups_per_s'], 8, 1)} "
                    f"{fmt(r['closes_per_s'], 8, 1)}")
    for r in results:
        parts = ", ".join(f"{k} {fmt(v.get('p50'), 0)}" for k, v in r["steps_ms_per_half"].items())
        rows.append(f"steps per half, p50 ms ({r['concurrency']} at a time): {parts}")
    return "\n".join(rows) + "\n(ms per connection; one connection = both halves)"


async def run(quick: bool = False, *, n: int | None = None,
              concurrency: int | None = None) -> dict[str, Any]:
    """The floor alone, one at a time and ``concurrency`` at a time."""
    n = n or (QUICK_N if quick else DEFAULT_N)
    concurrency = concurrency or (QUICK_CONCURRENCY if quick else DEFAULT_CONCURRENCY)
    if os.geteuid() != 0:
        raise PermissionError("remote_floor needs root (network namespaces)")
    sweep_stale()
    seq = await measure_remote_floor(n, 1)
    conc = await measure_remote_floor(n, concurrency)
    return {"name": NAME, "machine": machine(), "n": n, "concurrency": concurrency,
            "sequential": seq, "concurrent": conc,
            "failures": seq["failures"] + conc["failures"], "bars": []}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--concurrency", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        say("needs root (network namespaces)")
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        result = asyncio.run(run(args.quick, n=args.n, concurrency=args.concurrency))
        print(json.dumps(result, indent=2))
        say(table([result["sequential"], result["concurrent"]]))
        return 1 if result["failures"] else 0
    say("interrupted; everything was removed")
    return 130


if __name__ == "__main__":
    sys.exit(main())

"""Remote (cross-node, VXLAN, IP payload) connection setup through the real daemons, against
the raw netlink floor for the same kernel work, measured in the same run.

The cluster is the demo's (:class:`nsm.lab.Lab`): a fabric namespace with a bridge, two node
namespaces each running a manager and a forwarder as real processes (the registry on node1), and
an endpoint (NSE) on node2 with its own pod. Clients use the SDK
(:class:`nsm.client.sdk.Client`) from this process, each in its own pod namespace on node1,
created with the lab (not timed); every client is a new ``Client`` (its Request also connects
its gRPC channel to node1's manager, as a new pod would). The path has 6 segments: client →
manager1 → forwarder1 → manager2 → forwarder2 → NSE.

Per connection:

- **request**: ``await client.request()``; when it returns both forwarders have built their
  half (veth, VXLAN, policy table, rules, neighbours) and seen the devices up: "ready";
- **request+verified**: the same, plus a check from here (timed after, so "request" is not
  inflated) that ``nsm-1`` exists in the client pod, is up, has MTU 1450 and the connection's
  address;
- **close**: ``await client.close()``; checked (untimed) that ``nsm-1`` is gone.

Phases: warm-up (3 connections, not counted), ``n`` connections one at a time (all set up, then
all closed), the floor (:func:`bench.remote_floor.measure_remote_floor`) for the same, ``n`` more
``concurrency`` at a time, the floor for the same. Ratio p50(ours)/p50(floor) against the bar
(3x). At the end: nothing of ours may be left on either node (no ``nsv``/``nsx`` link, no rule
toward a connection table).

    python -m bench.remote_setup [--quick] [--n 200] [--concurrency 20] [--no-floor] [--json F]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Sequence
from typing import Any

from bench.common import (
    IFNAME,
    MODES,
    TUNNEL_MTU,
    Bench,
    BenchLab,
    Failures,
    Options,
    begin,
    cli,
    fmt,
    new_clients,
    outcome_lines,
    phase,
    say,
    setup_headline,
    setup_ratios,
    setup_table,
    size_options,
    start_identities,
    summary,
    warm_one,
)
from bench.remote_floor import measure_remote_floor
from nsm.client.sdk import Client
from nsm.kernel.netlink import Netlink
from nsm.lab import EndpointSpec, NodeSpec, PodSpec, ServiceSpec, Topology

NAME = "remote_setup"
DEFAULT_N = 200
DEFAULT_CONCURRENCY = 20
QUICK_N = 30
QUICK_CONCURRENCY = 5
#: The bar: our request p50 within this factor of the floor's p50, same run.
BAR = 3.0
SERVICE = "bench-remote"
NSE_CIDR = "172.20.0.0/16"
WARMUP = 3


async def warmup(lab: BenchLab, nl: Netlink, pods: Sequence[str], service: str,
                 failures: Failures) -> list[float]:
    """First requests (channels connect, caches fill; not counted)."""
    node1 = lab.node("node1")
    out = []
    for i, pod in enumerate(pods):
        ns = lab.pod(pod).netns

        def make(i: int = i, ns: str = ns) -> Client:
            return Client(heal=None, manager_url=node1.manager_url, service=service, netns=ns,
                          ifname=IFNAME, name=f"bench-warm-{i}", security=lab.pod_identity(ns))

        out.append(await warm_one(make, nl, ns, failures, f"warm-up request {i}", mtu=TUNNEL_MTU))
    return out


def topology(n: int, *, pod_prefixes: Sequence[str] = ("s", "c"), warm: int = WARMUP,
             service: ServiceSpec | None = None) -> Topology:
    """Two nodes; ``warm`` + ``n`` per prefix client pods on node1; one NSE on node2."""
    pods = [PodSpec(f"warm{i}", "node1") for i in range(warm)]
    pods += [PodSpec(f"{p}{i}", "node1") for p in pod_prefixes for i in range(n)]
    svc = service or ServiceSpec(SERVICE, payload="IP")
    return Topology(nodes=(NodeSpec("node1"), NodeSpec("node2")), pods=tuple(pods),
                    endpoints=(EndpointSpec("rs-nse", "node2", (svc.name,), NSE_CIDR),),
                    services=(svc,))


async def run(quick: bool = False, *, n: int | None = None, concurrency: int | None = None,
              floor: bool = True, settle: float = 1.0) -> dict[str, Any]:
    """The whole benchmark (see the module docstring); one JSON-able dict."""
    n = n or (QUICK_N if quick else DEFAULT_N)
    concurrency = concurrency or (QUICK_CONCURRENCY if quick else DEFAULT_CONCURRENCY)
    failures, result, started = begin(NAME, "network namespaces, veth, vxlan", n=n,
                                      concurrency=concurrency, bar=BAR)
    with failures.recording(result, started):
        async with BenchLab(topology(n)) as lab, Netlink() as nl:
            say(f"remote_setup: lab with {2 * n + WARMUP} client pods up in "
                f"{lab.build_seconds:.1f} s")
            result["pids"] = lab.pids()
            result["warmup_ms"] = await warmup(lab, nl, [f"warm{i}" for i in range(WARMUP)],
                                               SERVICE, failures)
            say(f"  warm-up requests (ms): {result['warmup_ms']}")
            say(f"  ours: {n} remote connections, one at a time")
            manager_url, pids = lab.node("node1").manager_url, lab.pids()
            seq_ns = [lab.pod(f"s{i}").netns for i in range(n)]
            conc_ns = [lab.pod(f"c{i}").netns for i in range(n)]
            await start_identities(lab.pod_identity, seq_ns + conc_ns)
            result["sequential"] = await phase(
                nl, new_clients(manager_url, SERVICE, seq_ns, "seq", lab.pod_identity,
                            lab.manager_id("node1")), seq_ns, 1,
                failures, "seq", pids, mtu=TUNNEL_MTU)
            await asyncio.sleep(settle)
            if floor:
                say(f"  floor: {n} remote connections, one at a time")
                result["floor_sequential"] = await measure_remote_floor(n, 1)
                await asyncio.sleep(settle)
            say(f"  ours: {n} remote connections, {concurrency} at a time")
            result["concurrent"] = await phase(
                nl, new_clients(manager_url, SERVICE, conc_ns, "conc", lab.pod_identity,
                            lab.manager_id("node1")), conc_ns,
                concurrency, failures, "conc", pids, mtu=TUNNEL_MTU)
            await asyncio.sleep(settle)
            if floor:
                say(f"  floor: {n} remote connections, {concurrency} at a time")
                result["floor_concurrent"] = await measure_remote_floor(n, concurrency)
            result["leftovers"] = await lab.check_leftovers(nl, failures, "leftovers")
            result["memory_kb"] = lab.memory()
            result["daemon_log_problems"] = lab.log_problems()
    for mode, _ in MODES:
        f = result.get(f"floor_{mode}")
        if f and f["failures"]:
            result["failures"] += f["failures"]
            result["failure_examples"] += f["failure_examples"]
    result["ratios"], bars = setup_ratios(result, BAR, "remote ")
    result["bars"] = [b.as_dict() for b in bars]
    return result


def table(result: dict[str, Any]) -> str:
    """The result as a human table."""
    n, c = result.get("n"), result.get("concurrency")
    lines = [f"remote_setup: {n} cross-node connections (IP over VXLAN), one at a time and {c} "
             f"at a time (ms per connection)"]
    lines += setup_table(result)
    for mode, _ in MODES:
        floor = result.get(f"floor_{mode}")
        if floor:
            parts = ", ".join(f"{k} {fmt(v.get('p50'), 0)}"
                              for k, v in floor["steps_ms_per_half"].items())
            lines.append(f"floor steps, p50 ms ({mode}): {parts}")
    if result.get("warmup_ms"):
        lines.append(f"warm-up (not counted): {result['warmup_ms']} ms")
    if result.get("leftovers") is not None:
        lines.append(f"left on the nodes after close: {result['leftovers']}")
    lines += outcome_lines(result)
    return "\n".join(lines)


def headline(result: dict[str, Any]) -> dict[str, float | None]:
    """The figures compared across repeated runs."""
    return setup_headline(result, BAR)


async def run_options(options: Options) -> dict[str, Any]:
    """:func:`run` for ``bench.run`` (``--set floor=0`` skips the floor)."""
    return await run(options.quick, n=options.n, concurrency=options.concurrency,
                     floor=options.flag("floor"),
                     settle=options.settle)


BENCH = Bench(name=NAME, doc=summary(__doc__), run=run_options,
              table=table, headline=headline)


def main(argv: list[str] | None = None) -> int:
    def extra(p: argparse.ArgumentParser) -> None:
        size_options(p, DEFAULT_N, DEFAULT_CONCURRENCY)
        p.add_argument("--no-floor", dest="floor", action="store_false", help="skip the floor")

    return cli(__doc__, run, table, argv, extra)


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())

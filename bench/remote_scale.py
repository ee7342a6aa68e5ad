"""Many cross-node connections at once: 500 set up 20 at a time across two nodes, with the total
time, the failures, the kernel state and the memory of every daemon before, at the peak and after.

The cluster is the demo's (:class:`nsm.lab.Lab`, real daemons): two nodes, each with a manager
and a forwarder (the registry on node1) and an endpoint (NSE) of its own. Half of the client pods
live on node1 and request the service of node2's endpoint; the other half live on node2 and
request node1's, so both forwarders build client halves and server halves at the same time. Every
client is a new SDK ``Client`` in its own pod namespace (created with the lab, not timed), sending
its Request to its own node's manager: a 6-segment path, veth + VXLAN + policy table on each node.

Phases:

1. warm-up (2 connections each way, not counted), then memory "before";
2. ``n`` connections, ``concurrency`` in flight: each Request must return, and the client's
   interface must be up with the tunnel MTU and its address (checked after, not timed);
3. at the peak (all ``n`` open): memory of every daemon, our links and rules on each node, the
   connections each manager monitors, and a ping through a sample of the connections;
4. close them all the same way; the interface must be gone; memory "after"; nothing of ours
   may be left on either node;
5. the same cycle (2-4) again (``--no-again`` skips it): the daemons' RSS after the second cycle
   minus after the first tells a leak (it grows with every cycle) from memory Python's
   allocator keeps for reuse (it does not).

Reported: the wall time of the setup and close phases, setups/s, per-connection latencies
(p50/p95/max), failures (any Request, check, ping or Close that went wrong in either cycle: the
target is zero) and VmRSS/VmHWM of each daemon with the growth per open connection.

    python -m bench.remote_scale [--quick] [--n 500] [--concurrency 20] [--sample 20] [--json F]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import sys
from collections.abc import Sequence
from typing import Any

import grpc

from bench.common import (
    IFNAME,
    TUNNEL_MTU,
    Bench,
    BenchLab,
    CheckFailed,
    Failures,
    Options,
    begin,
    cli,
    fmt,
    outcome_lines,
    phase,
    say,
    size_options,
    start_identities,
    summarize,
    summary,
    warm_one,
)
from nsm.api.connection_pb2 import Connection, MonitorScopeSelector
from nsm.api.connection_pb2_grpc import MonitorConnectionStub
from nsm.client.sdk import Client
from nsm.kernel.netlink import Netlink
from nsm.kernel.ping import ping
from nsm.lab import EndpointSpec, Lab, NodeSpec, PodSpec, ServiceSpec, Topology
from nsm.transport import dial

NAME = "remote_scale"
DEFAULT_N, QUICK_N = 500, 40
DEFAULT_CONCURRENCY, QUICK_CONCURRENCY = 20, 10
DEFAULT_SAMPLE, QUICK_SAMPLE = 20, 5
WARMUP = 2
#: Node → (its endpoint, the service it offers, that endpoint's CIDR).
ENDPOINTS = {"node1": ("sc-nse1", "scale-1", "172.22.0.0/16"),
             "node2": ("sc-nse2", "scale-2", "172.23.0.0/16")}
#: Clients on one node request the other node's service.
OTHER = {"node1": "node2", "node2": "node1"}


def topology(n: int, warm: int = WARMUP) -> Topology:
    pods = []
    for node in ("node1", "node2"):
        pods += [PodSpec(f"w{node[-1]}x{i}", node) for i in range(warm)]
    for i in range(n):
        node = "node1" if i % 2 == 0 else "node2"
        pods.append(PodSpec(f"p{i}", node))
    return Topology(
        nodes=(NodeSpec("node1"), NodeSpec("node2")),
        pods=tuple(pods),
        endpoints=tuple(EndpointSpec(name, node, (svc,), cidr)
                        for node, (name, svc, cidr) in ENDPOINTS.items()),
        services=tuple(ServiceSpec(svc, payload="IP") for _, svc, _ in ENDPOINTS.values()),
    )


def _client(lab: Lab, pod: str, name: str) -> Client:
    p = lab.pod(pod)
    service = ENDPOINTS[OTHER[p.node]][1]
    return Client(heal=None, manager_url=lab.node(p.node).manager_url, service=service, netns=p.netns,
                  ifname=IFNAME, name=name, security=lab.pod_identity(p.netns))


async def warmup(lab: Lab, nl: Netlink, failures: Failures) -> list[float]:
    """Connections one at a time from each warm-up pod (channels connect, caches fill)."""
    out = []
    for node in ("node1", "node2"):
        for i in range(WARMUP):
            pod = f"w{node[-1]}x{i}"

            def make(pod: str = pod, name: str = f"scale-warm-{node}-{i}") -> Client:
                return _client(lab, pod, name)

            out.append(await warm_one(make, nl, lab.pod(pod).netns, failures, f"warm-up {pod}",
                                      mtu=TUNNEL_MTU))
    return out


async def monitored(lab: Lab) -> dict[str, int]:
    """How many connections each manager's MonitorConnections reports right now."""
    out: dict[str, int] = {}
    for name, node in lab.nodes.items():
        channel = dial(node.manager_url, lab.security)
        try:
            stream = MonitorConnectionStub(channel).MonitorConnections(MonitorScopeSelector(),
                                                                       timeout=10)
            try:
                first = await stream.read()
            finally:
                stream.cancel()
            out[name] = -1 if first is grpc.aio.EOF else len(first.connections)
        finally:
            await channel.close()
    return out


async def ping_sample(lab: Lab, pods: Sequence[str], conns: dict[str, Connection],
                      failures: Failures) -> dict[str, Any]:
    """2 echo requests through each sampled connection, from the client pod to its endpoint."""
    ok, rtts = 0, []
    for pod in pods:
        dst = conns[pod].context.ip_context.dst_ip_addrs[0].split("/")[0]
        result = await asyncio.to_thread(ping, lab.pod(pod).netns, dst, count=2, timeout=1.0)
        if result.received == result.sent:
            ok += 1
            rtts += result.rtts_ms
        else:
            failures.add(f"ping {pod} -> {dst}",
                         CheckFailed(f"{result.received}/{result.sent} replies {result.errors}"))
    return {"pinged": len(pods), "ok": ok, "rtt_ms": summarize(rtts)}


async def run(quick: bool = False, *, n: int | None = None, concurrency: int | None = None,
              sample: int | None = None, settle: float = 1.0, again: bool = True
              ) -> dict[str, Any]:
    """The whole benchmark (see the module docstring); one JSON-able dict."""
    n = n or (QUICK_N if quick else DEFAULT_N)
    concurrency = concurrency or (QUICK_CONCURRENCY if quick else DEFAULT_CONCURRENCY)
    sample = min(n, sample or (QUICK_SAMPLE if quick else DEFAULT_SAMPLE))
    failures, result, started = begin(NAME, "network namespaces, veth, vxlan", n=n,
                                      concurrency=concurrency, sample=sample, bars=[])
    with failures.recording(result, started):
        async with BenchLab(topology(n)) as lab, Netlink() as nl:
            say(f"remote_scale: lab with {n + 2 * WARMUP} client pods up in "
                f"{lab.build_seconds:.1f} s")
            pids = lab.pids()
            result["pids"] = pids
            result["warmup_ms"] = await warmup(lab, nl, failures)
            await asyncio.sleep(settle)
            result["memory_before_kb"] = lab.memory()
            pods = [f"p{i}" for i in range(n)]
            namespaces = [lab.pod(pod).netns for pod in pods]

            async def cycle(tag: str) -> dict[str, Any]:
                """Set up ``n`` connections, look at the peak, close them all."""
                peak: dict[str, Any] = {}

                async def at_peak(conns: dict[int, Connection]) -> None:
                    say(f"  [{tag}] {len(conns)} set up and verified; the peak")
                    peak["open"] = len(conns)
                    peak["memory_kb"] = lab.memory()
                    peak["nodes"] = await lab.leftovers(nl)
                    peak["monitored"] = await monitored(lab)
                    by_pod = {pods[i]: conn for i, conn in conns.items()}
                    picked = random.Random(n).sample(sorted(by_pod), min(sample, len(by_pod)))
                    peak["ping"] = await ping_sample(lab, picked, by_pod, failures)
                    for node, state in peak["nodes"].items():  # every connection has a half on each
                        if state.get("nsx") != len(conns):
                            failures.add(f"{tag} peak {node}", CheckFailed(
                                f"{state.get('nsx')} VXLAN devices for {len(conns)} connections"))
                    say(f"  [{tag}] closing {n}, {concurrency} at a time")

                say(f"  [{tag}] {n} cross-node connections (half each way), {concurrency} at a time")
                await start_identities(lab.pod_identity, namespaces)
                out = await phase(nl, lambda i: _client(lab, pods[i], f"scale-nsc-{tag}-{i}"),
                                  namespaces, concurrency, failures, tag, pids, mtu=TUNNEL_MTU,
                                  at_peak=at_peak)
                await asyncio.sleep(settle)
                left = await lab.check_leftovers(nl, failures, f"{tag} leftovers")
                return {**out, "peak": peak, "memory_after_kb": lab.memory(), "leftovers": left}

            first = await cycle("1")
            result.update(first)
            before, peak = result["memory_before_kb"], first["peak"]["memory_kb"]
            result["memory_growth_kb_per_conn"] = {
                key: (round((peak[key]["rss_kb"] - b["rss_kb"]) / max(1, first["verified"]), 2)
                      if b.get("rss_kb") and peak[key].get("rss_kb") else None)
                for key, b in before.items()}
            if again:
                # The same again: memory that stays after the first cycle is the allocator's
                # high-water mark, not a leak, if the second cycle does not add to it.
                second = await cycle("2")
                result["again"] = second
                after1, after2 = first["memory_after_kb"], second["memory_after_kb"]
                result["retained_kb_second_cycle"] = {
                    key: (after2[key]["rss_kb"] - a["rss_kb"]
                          if a.get("rss_kb") and after2[key].get("rss_kb") else None)
                    for key, a in after1.items()}
            result["daemon_log_problems"] = lab.log_problems()
    result["bars"] = [{"name": f"failures among {n} connections (x{2 if again else 1})",
                       "value": result["failures"],
                       "limit": 0, "unit": "", "op": "<=", "ok": result["failures"] == 0}]
    return result


def table(result: dict[str, Any]) -> str:
    """The result as a human table."""
    n, c = result.get("n"), result.get("concurrency")
    lines = [f"remote_scale: {n} cross-node connections (IP over VXLAN, half each way), {c} at a "
             f"time; {result.get('verified')} verified"]
    lines.append(f"setup: {result.get('setup_wall_s')} s in all, {result.get('setups_per_s')}/s; "
                 f"request ms p50 {fmt(result['request_ms'].get('p50'), 0)} "
                 f"p95 {fmt(result['request_ms'].get('p95'), 0)} "
                 f"max {fmt(result['request_ms'].get('max'), 0)}")
    lines.append(f"close: {result.get('close_wall_s')} s in all, {result.get('closes_per_s')}/s; "
                 f"close ms p50 {fmt(result['close_ms'].get('p50'), 0)} "
                 f"p95 {fmt(result['close_ms'].get('p95'), 0)} "
                 f"max {fmt(result['close_ms'].get('max'), 0)}")
    peak = result.get("peak") or {}
    lines.append(f"at the peak: {peak.get('open')} open; per node {peak.get('nodes')}; "
                 f"monitored by the managers {peak.get('monitored')}")
    p = peak.get("ping") or {}
    lines.append(f"ping through {p.get('pinged')} sampled connections: {p.get('ok')} ok, rtt p50 "
                 f"{fmt((p.get('rtt_ms') or {}).get('p50'), 0, 3)} ms")
    head = f"{'daemon':<18} {'RSS before':>11} {'at peak':>9} {'after':>9} {'peak HWM':>9} {'KiB/conn':>9}"
    lines += ["memory (KiB):", head, "-" * len(head)]
    before, after = result.get("memory_before_kb") or {}, result.get("memory_after_kb") or {}
    at_peak = peak.get("memory_kb") or {}
    growth = result.get("memory_growth_kb_per_conn") or {}
    for key in before:
        lines.append(f"{key:<18} {fmt(before[key].get('rss_kb'), 11, 0)} "
                     f"{fmt(at_peak.get(key, {}).get('rss_kb'), 9, 0)} "
                     f"{fmt(after.get(key, {}).get('rss_kb'), 9, 0)} "
                     f"{fmt(after.get(key, {}).get('hwm_kb'), 9, 0)} {fmt(growth.get(key), 9, 1)}")
    retained = result.get("retained_kb_second_cycle")
    if retained is not None:
        again = result.get("again") or {}
        lines.append(f"the same again: {again.get('verified')} verified, set up in "
                     f"{again.get('setup_wall_s')} s, closed in {again.get('close_wall_s')} s; "
                     f"RSS after it minus RSS after the first (KiB; ~0 = no leak): {retained}")
    cpu = ", ".join(f"{k} {v['total']:.2f}" for k, v in (result.get("cpu_ms_per_setup") or {}).items())
    lines.append(f"CPU ms per setup: {cpu}")
    lines.append(f"left on the nodes after close: {result.get('leftovers')}")
    lines += outcome_lines(result)
    return "\n".join(lines)


def headline(result: dict[str, Any]) -> dict[str, float | None]:
    out: dict[str, float | None] = {
        "setup wall s": result.get("setup_wall_s"),
        "setups/s": result.get("setups_per_s"),
        "request p50 ms": (result.get("request_ms") or {}).get("p50"),
        "request p95 ms": (result.get("request_ms") or {}).get("p95"),
        "close wall s": result.get("close_wall_s"),
        "failures": result.get("failures"),
    }
    for key, v in (result.get("memory_growth_kb_per_conn") or {}).items():
        out[f"{key} KiB/conn"] = v
    for key, v in (result.get("retained_kb_second_cycle") or {}).items():
        out[f"{key} KiB retained by cycle 2"] = v
    return out


async def run_options(options: Options) -> dict[str, Any]:
    """:func:`run` for ``bench.run`` (``--set sample=K`` pings K connections at the peak)."""
    sample = options.extra.get("sample")
    return await run(options.quick, n=options.n, concurrency=options.concurrency,
                     sample=int(sample) if sample else None, settle=options.settle,
                     again=options.flag("again"))


BENCH = Bench(name=NAME, doc=summary(__doc__), run=run_options,
              table=table, headline=headline)


def main(argv: list[str] | None = None) -> int:
    def extra(p: argparse.ArgumentParser) -> None:
        size_options(p, DEFAULT_N, DEFAULT_CONCURRENCY)
        p.add_argument("--sample", type=int, default=None,
                       help=f"connections pinged at the peak ({DEFAULT_SAMPLE})")
        p.add_argument("--no-again", dest="again", action="store_false",
                       help="one cycle only (default: a second one, to tell leaks from reuse)")

    return cli(__doc__, run, table, argv, extra)


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())

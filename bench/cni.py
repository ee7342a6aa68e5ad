"""CNI ADD: nsm-cni's own time (plugin + agent) beside the bridge plugin's ADD, one at a time
and in a burst.

The cluster is one emulated node (:class:`nsm.lab.harness.LabHarness`: registry, manager,
forwarder and an endpoint as real processes) with an ``nsm cni-agent``
(:func:`nsm.lab.cni.start_agent`). Each pod is a fresh namespace; its ADD runs the conflist
Debian's ``bridge`` + ``host-local`` → ``nsm-cni`` (1.0.0) plugin by plugin as a runtime does
(:class:`nsm.lab.cni.Runtime`: each plugin a process started through ``nsenter`` into the
node's namespace, its config on stdin).

Per pod: **bridge** — the bridge plugin's ADD (its process, start to exit: veth, bridge port,
IPAM, addresses, routes); **nsm-cni** — nsm-cni's ADD the same way; **setup** — the connection
setup the agent waited for (the mesh's Request, from the agent's ``attached`` log line);
**overhead** = nsm-cni - setup: the plugin's start, the unix-socket exchange, the agent's
parsing, kernel checks and state file. Also the plugin's start alone (VERSION, answered without
the agent).

Phases: 2 warm-up pods; ``n`` pods one at a time (30; ``--quick`` 5), then their DELs; then
``concurrency`` pods at once (50; ``--quick`` 8), then their DELs at once. Checked: every ADD
succeeds and its pod has ``nsm-1``; after the DELs the agent holds no attachment and no daemon
a connection. Bar (the issue's): overhead p50 ≤ the bridge plugin's ADD p50, sequential, same
run.

    python -m bench.cni [--n 30] [--concurrency 50] [--quick] [--json F]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import sys
import time
import uuid
from typing import Any

from bench import common
from bench.common import Bar, Bench, CheckFailed, Failures, Options
from nsm.kernel import netns as nsns
from nsm.lab import EndpointSpec, NodeSpec, ServiceSpec, Topology
from nsm.lab.cni import CniNode, Runtime, start_agent
from nsm.lab.harness import LabHarness

NAME = "cni"
DEFAULT_N, QUICK_N = 30, 5
DEFAULT_CONCURRENCY, QUICK_CONCURRENCY = 50, 8
WARMUP = 2
SERVICE = "bench-cni"
PRIMARY = "10.124.0.0/16"
AGENT = "cni-agent"
TOPOLOGY = Topology(nodes=(NodeSpec("node1"),),
                    endpoints=(EndpointSpec("nse", "node1", (SERVICE,), "172.31.0.0/23"),),
                    services=(ServiceSpec(SERVICE),), subnet="10.253.0.0/24")
_ATTACHED = re.compile(r"'attached' container=(\S+) .*?setup_ms=([\d.]+) agent_ms=([\d.]+)")


def _agent_log(h: LabHarness, offset: int) -> tuple[str, int]:
    path = h.lab.daemon(AGENT).log_path
    assert path is not None
    with path.open("rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    return text, offset + len(text.encode())


async def _phase(h: LabHarness, agent: CniNode, rt: Runtime, count: int, at_once: int,
                 failures: Failures, what: str) -> dict[str, Any]:
    """``count`` pods, ``at_once`` at a time: ADD all, check, DEL all, check."""
    pods = [(uuid.uuid4().hex, nsns.create_netns(h.lab.ns_name(f"b{i}{uuid.uuid4().hex[:4]}")))
            for i in range(count)]
    _, offset = _agent_log(h, 0)
    gate = asyncio.Semaphore(at_once)
    adds: dict[str, tuple[float, float]] = {}
    dels: list[tuple[float, float]] = []

    async def add(c: str, ns: str) -> None:
        async with gate:
            run = await rt.add(c, ns)
        try:
            run.ok()
            if await h.netlink.index(ns, "nsm-1") is None:
                raise CheckFailed(f"no nsm-1 in {ns} after ADD")
            adds[c] = (run.runs[0].seconds * 1e3, run.runs[1].seconds * 1e3)
        except AssertionError as exc:
            failures.add(f"{what} ADD", exc)

    async def delete(c: str, ns: str) -> None:
        async with gate:
            run = await rt.delete(c, ns)
        try:
            run.ok()
            dels.append((run.runs[1].seconds * 1e3, run.runs[0].seconds * 1e3))  # reversed
        except AssertionError as exc:
            failures.add(f"{what} DEL", exc)

    try:
        t0 = time.perf_counter()
        await asyncio.gather(*(add(c, ns) for c, ns in pods))
        add_wall = time.perf_counter() - t0
        t0 = time.perf_counter()
        await asyncio.gather(*(delete(c, ns) for c, ns in pods))
        del_wall = time.perf_counter() - t0
    finally:
        for _, ns in pods:
            with contextlib.suppress(Exception):
                nsns.delete_netns(os.path.basename(ns))
    text, _ = _agent_log(h, offset)
    agent_side = {m[1]: (float(m[2]), float(m[3])) for m in _ATTACHED.finditer(text)}
    missing = [c for c in adds if c not in agent_side]
    if missing:
        failures.add(f"{what} timing", CheckFailed(f"no 'attached' log line for {len(missing)} pods"))
    timed = [c for c in adds if c in agent_side]
    status = await h.daemon_status(AGENT)
    if status["attachments"] or status["connections"]:
        failures.add(f"{what} cleanup", CheckFailed(f"the agent still holds {status}"))
    left = await h.leftovers()
    if left:
        failures.add(f"{what} cleanup", CheckFailed(f"left in the lab: {left[:5]}"))
    return {
        "pods": count, "at_once": at_once, "ok": len(adds),
        "add_wall_s": round(add_wall, 3), "adds/s": round(len(adds) / add_wall, 1) if add_wall else None,
        "del_wall_s": round(del_wall, 3),
        "bridge_add_ms": common.summarize([adds[c][0] for c in adds]),
        "nsm_cni_add_ms": common.summarize([adds[c][1] for c in adds]),
        "setup_ms": common.summarize([agent_side[c][0] for c in timed]),
        "agent_ms": common.summarize([agent_side[c][1] for c in timed]),
        "overhead_ms": common.summarize([adds[c][1] - agent_side[c][0] for c in timed]),
        "nsm_cni_del_ms": common.summarize([d[0] for d in dels]),
        "bridge_del_ms": common.summarize([d[1] for d in dels]),
    }


async def _plugin_start(rt: Runtime, count: int) -> dict[str, float]:
    times = []
    for _ in range(count):
        run = await rt.exec("nsm-cni", "VERSION", {"cniVersion": "1.0.0"}, {})
        times.append(run.seconds * 1e3)
    return common.summarize(times)


async def run(quick: bool = False, *, n: int | None = None, concurrency: int | None = None,
              settle_s: float = 1.0) -> dict[str, Any]:
    """The whole benchmark (see the module docstring); one JSON-able dict."""
    n = n or (QUICK_N if quick else DEFAULT_N)
    concurrency = concurrency or (QUICK_CONCURRENCY if quick else DEFAULT_CONCURRENCY)
    failures, result, started = common.begin(NAME, "network namespaces, veth", quick=quick, n=n,
                                      concurrency=concurrency, version="1.0.0")
    with failures.recording(result, started):
        async with LabHarness.running(TOPOLOGY, prefix=f"{common.NS_PREFIX}{os.getpid()}",
                                      start_timeout=60.0) as h:
            agent = await start_agent(h.lab, "node1", key=AGENT, name="cni-bench")
            rt = agent.runtime("1.0.0", [f"kernel://{SERVICE}/nsm-1"], primary=PRIMARY)
            result["plugin_start_ms"] = await _plugin_start(rt, 5 if quick else 20)
            result["warmup"] = await _phase(h, agent, rt, WARMUP, 1, failures, "warm-up")
            await common.settle(settle_s)
            result["sequential"] = await _phase(h, agent, rt, n, 1, failures, "sequential")
            await common.settle(settle_s)
            result["concurrent"] = await _phase(h, agent, rt, concurrency, concurrency, failures,
                                                "concurrent")
    seq = result.get("sequential", {})
    result["bars"] = [Bar("nsm-cni overhead p50 / bridge ADD p50 (sequential)",
                          common.ratio(seq.get("overhead_ms", {}).get("p50"),
                                seq.get("bridge_add_ms", {}).get("p50")), 1.0).as_dict()]
    return result


def table(result: dict[str, Any]) -> str:
    start = result.get("plugin_start_ms", {}).get("p50")
    lines = [f"cni: conflist bridge + host-local -> nsm-cni ({result.get('version')}); "
             f"nsm-cni's start alone (VERSION) p50 {common.fmt(start, 0, 1)} ms",
             f"{'phase':12} {'pods':>5} {'figure':16} {'p50':>8} {'p95':>8} {'max':>8}  (ms)"]
    for phase in ("sequential", "concurrent"):
        p = result.get(phase)
        if not p:
            continue
        for fig in ("bridge_add_ms", "nsm_cni_add_ms", "setup_ms", "overhead_ms", "agent_ms",
                    "nsm_cni_del_ms", "bridge_del_ms"):
            s = p.get(fig, {})
            lines.append(f"{phase:12} {p['pods']:>5} {fig[:-3]:16} {common.fmt(s.get('p50'))} "
                         f"{common.fmt(s.get('p95'))} {common.fmt(s.get('max'))}")
        lines.append(f"{phase:12} {p['pods']:>5} ADD wall {p['add_wall_s']} s ({p['adds/s']} pods/s), "
                     f"DEL wall {p['del_wall_s']} s")
    return "\n".join(lines + common.outcome_lines(result))


def headline(result: dict[str, Any]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for phase, short in (("sequential", "seq"), ("concurrent", "conc")):
        p = result.get(phase, {})
        out[f"{short} overhead p50 ms"] = p.get("overhead_ms", {}).get("p50")
        out[f"{short} bridge ADD p50 ms"] = p.get("bridge_add_ms", {}).get("p50")
    out["conc adds/s"] = result.get("concurrent", {}).get("adds/s")
    return out


async def run_options(options: Options) -> dict[str, Any]:
    """:func:`run` for ``bench.run``."""
    return await run(options.quick, n=options.n, concurrency=options.concurrency,
                     settle_s=options.settle)


BENCH = Bench(name=NAME, doc=common.summary(__doc__), run=run_options, table=table, headline=headline)


def main(argv: list[str] | None = None) -> int:
    def extra(p: argparse.ArgumentParser) -> None:
        common.size_options(p, DEFAULT_N, DEFAULT_CONCURRENCY)

    return common.cli(__doc__, run, table, argv, extra)


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())

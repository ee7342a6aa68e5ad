"""Chaos soak: a 3-node cluster with many connections carrying traffic while daemons and endpoints
are killed and restarted at random; at the end every connection must carry traffic and nothing
may be left behind.

The cluster is the emulated one (:class:`nsm.lab.harness.LabHarness`, real daemons, real VXLAN):
three nodes, each with a manager, a forwarder and an endpoint (``nsm nse``) offering the service
``chaos`` (the registry on node1). ``connections`` client pods are spread over the three nodes,
each with an SDK ``Client`` of its node's manager (default settings: heal on) and a steady ICMP
stream (:mod:`bench.echoes`, ``rate`` echoes/s) to its connection's destination, following it
when the connection heals onto another endpoint. Most connections cross nodes (VXLAN), a third
stay on their node (a veth).

Then, for ``duration`` seconds, one fault after another (seeded: ``--seed``): a daemon picked at
random among the forwarders, managers, the registry and the endpoints (``--targets`` narrows
the kinds) is killed (SIGKILL) and started again after 0.5-3 s; once every connection carries
traffic again (or after ``--heal-timeout`` s: not recovered, a failure), a pause of 1-3 s, then
the next fault. Each fault is printed with:

- **heal** (s): from the kill to the moment the last connection had traffic back for good (the
  first reply to an echo sent after its last lost one; 0 when it lost nothing);
- **lost**: echoes without a reply, over all connections, from the kill to the next fault; how
  many connections lost any, the worst one's count, the longest gap of any;
- how many connections the clients healed by reselecting another path.

At the end: every connection must carry traffic; then all are closed and nothing may be left:
no per-connection link, rule or route on any node, no interface in any endpoint's or client's
pod, no connection in any daemon's monitor, exactly one registration per forwarder and endpoint
(nothing stale, nothing missing), every daemon running, no other process in the lab's
namespaces. Exit status 1 when a connection did not recover or anything leaked.

    python -m bench.chaos [--quick] [--duration 10m] [--connections 50] [--rate 10] [--seed 1]
                          [--targets forwarder manager registry endpoint] [--json F]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.common import Bar, Bench, Failures, Options, fmt, machine, rss_kb, say, summarize
from bench.echoes import Echoes
from bench.heal import (
    Tracked,
    daemon_errors,
    dst_of,
    lab_harness,
    prepare,
    request_retrying,
    wait_for,
)
from nsm.client.notify import State
from nsm.client.sdk import Client
from nsm.config import duration as parse_duration
from nsm.lab import EndpointSpec, NodeSpec, ServiceSpec, Topology
from nsm.lab.harness import LabHarness
from nsm.lab.processes import pids_in_netns

NAME = "chaos"
SERVICE = "chaos"
NODES = ("node1", "node2", "node3")
DEFAULT_DURATION, QUICK_DURATION = 600.0, 60.0
DEFAULT_CONNECTIONS = 50
DEFAULT_RATE = 10.0
#: A fault after which a connection has not recovered this long is a failure.
HEAL_TIMEOUT = 30.0
#: How long a killed daemon stays down, and the pause after recovery (s, uniform).
DOWN = (0.5, 3.0)
PAUSE = (1.0, 3.0)
#: Connections set up at once.
CONCURRENCY = 10
#: The kinds of daemon a fault may hit.
KINDS = ("forwarder", "manager", "registry", "endpoint")
#: Seconds given to the hops to remove everything after the last Close; when something is still
#: there, it is looked at again after a restarted forwarder's grace for unclaimed leftovers
#: (``--adopt-grace``, 60 s) has passed: what is there then is leaked for good (until expiry).
CLEAN_GRACE = 20.0
LATE_GRACE = 70.0


def topology() -> Topology:
    return Topology(
        nodes=tuple(NodeSpec(n) for n in NODES),
        endpoints=tuple(EndpointSpec(f"cx-nse{i}", n, (SERVICE,), f"172.{23 + i}.0.0/16")
                        for i, n in enumerate(NODES, 1)),
        services=(ServiceSpec(SERVICE),),
    )


def kind_of(key: str) -> str:
    """``forwarder.node1`` → forwarder, ``nse.cx-nse2`` → endpoint."""
    head = key.split(".", 1)[0]
    return "endpoint" if head == "nse" else head


@dataclass(eq=False)
class Conn:
    """One connection of the soak."""

    index: int
    node: str
    pod: str
    client: Client
    track: Tracked = field(default_factory=Tracked)


@dataclass
class Fault:
    index: int
    target: str
    down: float
    at: float
    #: When every connection carried traffic again (None: not within the heal timeout).
    recovered: float | None = None
    #: Connections that were healing or without traffic when the fault came (not judged by it).
    sick: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)


def _figures(fault: Fault, conns: Sequence[Conn], end: float) -> dict[str, Any]:
    """What the fault cost, from the kill to ``end`` (the next fault, or the end), to the
    connections that carried traffic when it came."""
    t0 = fault.at
    conns = [c for c in conns if c.index not in fault.sick]
    lost, restored, gaps, reselected = [], [], [], 0
    for c in conns:
        flow = c.track.flow
        assert flow is not None
        lost.append(flow.lost(t0, end))
        back = flow.restored(t0, end)
        restored.append(None if back is None else back - t0)
        gaps.append(flow.longest_gap(t0, end))
        reselected += any(ch.state is State.HEALED and "reselect" in ch.reason
                          for ch in c.track.since(t0, end))
    heal = None if None in restored else max((r for r in restored if r is not None), default=0.0)
    slowest = max(range(len(conns)), key=lambda i: float("inf") if restored[i] is None
                  else restored[i], default=None)
    return {
        "heal_s": None if heal is None else round(heal, 3),
        "lost": sum(lost),
        "connections_losing": sum(1 for n in lost if n),
        "worst_lost": max(lost, default=0),
        "longest_gap_s": round(max(gaps, default=0.0), 3),
        "reselected": reselected,
        "not_restored": sum(1 for r in restored if r is None),
        "slowest": None if slowest is None else {
            "connection": conns[slowest].index, "node": conns[slowest].node,
            "restored_s": restored[slowest], "lost": lost[slowest],
            "changes": [f"+{at - t0:.2f} s {ch.state.value}: {ch.reason}"[:200]
                        for at, ch in conns[slowest].track.changes if t0 <= at < end][:6]},
    }


def _line(f: Fault, started: float, heal_timeout: float) -> str:
    g = f.figures
    head = f"[{f.at - started:6.1f} s] #{f.index} {f.target} down {f.down:.1f} s: "
    if f.sick:
        head += f"({len(f.sick)} connections still healing from before) "
    if f.recovered is None:
        head += f"NOT RECOVERED within {heal_timeout:g} s ({g.get('not_restored')} without traffic)"
    else:
        head += f"recovered in {fmt(g.get('heal_s'), 0, 2)} s"
    return (head + f", {g.get('lost')} lost ({g.get('connections_losing')} connections, worst "
            f"{g.get('worst_lost')}), longest gap {fmt(g.get('longest_gap_s'), 0, 2)} s, "
            f"{g.get('reselected')} reselected" + (f"; {'; '.join(f.errors)}" if f.errors else ""))


async def _restart(h: LabHarness, fault: Fault) -> None:
    await h.lab.kill(fault.target)
    await asyncio.sleep(fault.down)
    for attempt in range(3):
        try:
            await h.lab.start_daemon(fault.target)
            return
        except Exception as exc:
            fault.errors.append(f"start {attempt + 1} failed: {exc!r}"[:200])
            await asyncio.sleep(1.0)


async def _connect(h: LabHarness, n: int, echoes: Echoes, rate: float,
                   failures: Failures) -> list[Conn]:
    conns: list[Conn] = []
    for i in range(n):
        node = NODES[i % len(NODES)]
        pod = await h.pod("c")
        track = Tracked()
        client = Client(manager_url=h.lab.node(node).manager_url, service=SERVICE, netns=pod,
                        name=h.name("chaos"), on_change=track.on_change, security=h.pod_identity(pod))
        conns.append(Conn(i, node, pod, client, track))
    slots = asyncio.Semaphore(CONCURRENCY)

    async def one(c: Conn) -> None:
        async with slots:
            try:
                conn = await request_retrying(c.client, 30.0)
            except Exception as exc:
                failures.add(f"connection {c.index} ({c.node})", exc)
                await c.client.close()
                return
            c.track.flow = echoes.add(f"c{c.index}", c.pod, dst_of(conn), rate)

    await asyncio.gather(*(one(c) for c in conns))
    return [c for c in conns if c.track.flow is not None]


def _carries(c: Conn, since: float) -> bool:
    """No heal in flight since ``since`` and traffic through the connection."""
    return c.track.up(since) and c.track.carries(c.client)


def _all_carry(conns: Sequence[Conn], since: float) -> bool:
    return all(_carries(c, since) for c in conns)


async def _leaks(h: LabHarness, conns: Sequence[Conn]) -> dict[str, list[str]]:
    """Everything the soak left after every connection was closed (see the module)."""
    out: dict[str, list[str]] = {}
    closed = time.monotonic()
    while True:
        left = await h.leftovers()
        waited = time.monotonic() - closed
        if not left or waited > LATE_GRACE:
            break
        if waited > CLEAN_GRACE and "early" not in out:
            out["early"] = [f"after {CLEAN_GRACE:g} s: {item}" for item in left]
            say(f"chaos: {len(left)} things left {CLEAN_GRACE:g} s after the last Close; "
                f"looking again {LATE_GRACE:g} s after it (a restarted forwarder's grace)")
        await asyncio.sleep(0.5)
    out["kernel and monitors"] = left
    out["client pods"] = [f"pod {os.path.basename(c.pod)}: {name}" for c in conns
                          for name in await h.link_names(c.pod)]
    registered = [nse.name for nse in await h.registry_client().find_nse()]
    want = {n.forwarder_name for n in h.lab.nodes.values()} | set(h.lab.endpoints)
    out["registrations"] = ([f"stale or unknown: {n}" for n in sorted(set(registered) - want)]
                            + [f"registered {registered.count(n)} times: {n}"
                               for n in sorted(set(registered)) if registered.count(n) > 1]
                            + [f"missing: {n}" for n in sorted(want - set(registered))])
    daemons = h.lab.daemons
    pids = {d.pid for d in daemons.values() if d.pid}
    namespaces = [node.netns for node in h.lab.nodes.values()] + [c.pod for c in conns] + [
        ep.netns for ep in h.lab.endpoints.values()]
    out["processes"] = ([f"daemon {key} is not running" for key, d in daemons.items()
                         if not d.running]
                        + [f"stray process {pid} in the lab's namespaces"
                           for pid in sorted(set(pids_in_netns(namespaces)) - pids)])
    return out


def _fds(pid: int | None) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd")) if pid else None
    except OSError:
        return None


def _daemon_state(h: LabHarness) -> dict[str, dict[str, Any]]:
    return {key: {"pid": d.pid, "fds": _fds(d.pid), **rss_kb(d.pid)}
            for key, d in h.lab.daemons.items()}


async def run(quick: bool = False, *, duration: float | None = None,
              connections: int = DEFAULT_CONNECTIONS, rate: float = DEFAULT_RATE, seed: int = 1,
              targets: Sequence[str] = KINDS, heal_timeout: float = HEAL_TIMEOUT,
              logs: str | None = None) -> dict[str, Any]:
    """The whole soak (see the module docstring); one JSON-able dict. ``logs``: a directory to
    copy the daemons' logs to."""
    duration = duration or (QUICK_DURATION if quick else DEFAULT_DURATION)
    prepare(NAME)
    rng = random.Random(seed)
    failures = Failures()
    result: dict[str, Any] = {"name": NAME, "duration_s": duration, "connections": connections,
                              "rate": rate, "seed": seed, "targets": list(targets),
                              "heal_timeout_s": heal_timeout, "machine": machine(), "faults": []}
    started_wall = time.perf_counter()
    faults: list[Fault] = []
    conns: list[Conn] = []
    echoes = Echoes().start()
    try:
        async with lab_harness(topology(), logs, NAME) as h:
            say(f"chaos: 3 nodes up in {h.lab.build_seconds:.1f} s; {connections} connections")
            conns = await _connect(h, connections, echoes, rate, failures)
            t_up = time.monotonic()
            if not await wait_for(lambda: _all_carry(conns, t_up), 30.0):
                failures.add("before the faults", AssertionError(
                    f"{sum(not c.track.carries(c.client) for c in conns)} connections carry no "
                    f"traffic"))
            result["connected"] = len(conns)
            result["cross_node"] = sum(1 for c in conns if c.client.connection is not None
                                       and len(c.client.connection.path.path_segments) > 4)
            result["daemons_before"] = _daemon_state(h)
            keys = [k for k in h.lab.daemons if kind_of(k) in targets]
            say(f"chaos: {len(conns)} connections carry traffic ({result['cross_node']} across "
                f"nodes); faults for {duration:g} s among {len(keys)} daemons, seed {seed}")
            started = time.monotonic()
            while keys and time.monotonic() - started < duration:
                if faults:
                    prev = faults[-1]
                    prev.figures = _figures(prev, conns, time.monotonic() - 0.5)
                    say("  " + _line(prev, started, heal_timeout))
                fault = Fault(len(faults) + 1, rng.choice(keys), round(rng.uniform(*DOWN), 2),
                              time.monotonic())
                fault.sick = [c.index for c in conns if not _carries(c, 0.0)]
                judged = [c for c in conns if c.index not in fault.sick]
                faults.append(fault)
                await _restart(h, fault)
                if await wait_for(lambda f=fault, j=judged: _all_carry(j, f.at), heal_timeout):
                    fault.recovered = time.monotonic()
                else:
                    fault.errors += [f"connection {c.index}: {_why(c, fault.at)}" for c in judged
                                     if not _carries(c, fault.at)]
                await asyncio.sleep(rng.uniform(*PAUSE))
            if faults:
                faults[-1].figures = _figures(faults[-1], conns, time.monotonic() - 0.5)
                say("  " + _line(faults[-1], started, heal_timeout))
            result["chaos_s"] = round(time.monotonic() - started, 1)
            # The end: every connection carries traffic.
            t_end = time.monotonic()
            await wait_for(lambda: _all_carry(conns, t_end), heal_timeout)
            dead = [c for c in conns if not c.track.carries(c.client, 1.0)]
            result["final_not_carrying"] = [f"connection {c.index} ({c.node}): "
                                            f"{_why(c)}" for c in dead]
            result["daemons_after"] = _daemon_state(h)
            await asyncio.to_thread(echoes.stop, 0.5)
            say(f"chaos: {len(conns) - len(dead)} of {len(conns)} connections carry traffic; "
                f"closing them all")
            slots = asyncio.Semaphore(CONCURRENCY)

            async def close(c: Conn) -> None:
                async with slots:
                    try:
                        await c.client.close(raise_errors=True)
                    except Exception as exc:
                        failures.add(f"close connection {c.index}", exc)

            await asyncio.gather(*(close(c) for c in conns))
            result["leaks"] = await _leaks(h, conns)
            # Removed late (within a restarted forwarder's grace) is reported, not judged.
            result["left_after_clean_grace"] = result["leaks"].pop("early", [])
            result["daemon_errors"] = daemon_errors(h.lab)[:20]
    except BaseException as exc:
        failures.add("soak aborted", exc)
        raise
    finally:
        await asyncio.to_thread(echoes.stop, 0.0)
        for c in conns:
            with contextlib.suppress(Exception):
                await asyncio.shield(c.client.close())
        result["faults"] = [{"index": f.index, "target": f.target, "down_s": f.down,
                             "recovered": f.recovered is not None, "errors": f.errors,
                             "still_healing_before": f.sick,
                             **f.figures} for f in faults]
        not_recovered = [f for f in faults if f.recovered is None]
        for f in not_recovered:
            failures.add(f"fault #{f.index} {f.target}", AssertionError(
                f"{f.figures.get('not_restored')} connections without traffic after "
                f"{heal_timeout:g} s"))
        leaks = [f"{what}: {item}" for what, items in (result.get("leaks") or {}).items()
                 for item in items]
        for item in result.get("final_not_carrying", []) + leaks:
            failures.add("at the end", AssertionError(item))
        result["summary"] = _summary(faults, conns, leaks, result)
        result["failures"] = failures.count
        result["failure_examples"] = failures.first
        result["wall_s"] = round(time.perf_counter() - started_wall, 1)
    s = result["summary"]
    result["bars"] = [
        Bar("faults after which a connection did not recover", s["faults_not_recovered"], 0,
            "").as_dict(),
        Bar("connections not carrying traffic at the end", s["final_not_carrying"], 0,
            "").as_dict(),
        Bar("things left after closing every connection", s["leaked"], 0, "").as_dict(),
    ]
    return result


def _why(c: Conn, since: float = 0.0) -> str:
    conn = c.client.connection
    flow = c.track.flow
    changes = [f"{ch.state.value}: {ch.reason}"[:160]
               + (f" ({ch.error.code.name}: {ch.error.message})"[:200] if ch.error else "")
               for ch in c.track.since(since)[-3:]]
    return (f"endpoint {conn.network_service_endpoint_name if conn else None}, "
            f"dst {dst_of(conn) if conn else None}, echoes to {flow.dst if flow else None}, "
            f"healthy {flow.healthy() if flow else None}, changes {changes}")


def _summary(faults: Sequence[Fault], conns: Sequence[Conn], leaks: list[str],
             result: dict[str, Any]) -> dict[str, Any]:
    by_kind: dict[str, dict[str, Any]] = {}
    for kind in KINDS:
        mine = [f for f in faults if kind_of(f.target) == kind]
        if not mine:
            continue
        heals = [f.figures["heal_s"] for f in mine if f.figures.get("heal_s") is not None]
        by_kind[kind] = {"faults": len(mine), "heal_s": summarize(heals),
                         "lost": sum(f.figures.get("lost", 0) for f in mine),
                         "lost_per_fault": summarize([f.figures.get("lost", 0) for f in mine], 1),
                         "not_recovered": sum(1 for f in mine if f.recovered is None)}
    heals = [f.figures["heal_s"] for f in faults if f.figures.get("heal_s") is not None]
    return {
        "faults": len(faults),
        "by_kind": by_kind,
        "heal_s": summarize(heals),
        "lost": sum(f.figures.get("lost", 0) for f in faults),
        "echoes": sum(len(c.track.flow.echoes) for c in conns if c.track.flow is not None),
        "faults_not_recovered": sum(1 for f in faults if f.recovered is None),
        "final_not_carrying": len(result.get("final_not_carrying", [])),
        "leaked": len(leaks),
    }


def table(result: dict[str, Any]) -> str:
    """The summary as a human table (each fault was printed as it happened)."""
    s = result["summary"]
    lines = [f"chaos: {result.get('connected')} connections ({result.get('cross_node')} across "
             f"nodes) at {result['rate']:g} echoes/s, {s['faults']} faults in "
             f"{result.get('chaos_s')} s (seed {result['seed']}); {s['lost']} of {s['echoes']} "
             f"echoes lost"]
    head = f"{'daemon killed':<14} {'faults':>6} {'heal p50':>8} {'p95':>6} {'max':>6} " \
           f"{'lost':>6} {'lost/fault p50':>14} {'not recovered':>13}"
    lines += [head, "-" * len(head)]
    total = {**s, "lost_per_fault": {}, "not_recovered": s["faults_not_recovered"]}
    rows = [*s["by_kind"].items(), ("all", total)]
    for kind, k in rows:
        lines.append(f"{kind:<14} {k['faults']:>6} {fmt(k['heal_s'].get('p50'), 8)} "
                     f"{fmt(k['heal_s'].get('p95'), 6)} {fmt(k['heal_s'].get('max'), 6)} "
                     f"{k['lost']:>6} {fmt(k['lost_per_fault'].get('p50'), 14, 0)} "
                     f"{k['not_recovered']:>13}")
    late = result.get("left_after_clean_grace") or []
    lines.append(f"at the end: {s['final_not_carrying']} connections without traffic; after "
                 f"closing all: {s['leaked']} things left"
                 + (f" ({len(late)} were still there {CLEAN_GRACE:g} s after the last Close)"
                    if late else ""))
    for what, items in (result.get("leaks") or {}).items():
        lines.append(f"  {what}: {len(items)}" + (f" ({'; '.join(items[:5])})" if items else ""))
    lines += [f"  {t}" for t in result.get("final_not_carrying", [])[:10]]
    lines.append(f"failures: {result['failures']}")
    lines += [f"  {t}" for t in result.get("failure_examples", [])]
    errors = result.get("daemon_errors") or []
    lines.append(f"errors and tracebacks in the daemons' logs: {len(errors)}")
    lines += [f"  {t}" for t in errors[:5]]
    return "\n".join(lines)


def headline(result: dict[str, Any]) -> dict[str, float | None]:
    s = result.get("summary") or {}
    return {"faults": s.get("faults"), "heal p50 s": (s.get("heal_s") or {}).get("p50"),
            "heal max s": (s.get("heal_s") or {}).get("max"), "lost": s.get("lost"),
            "not recovered": s.get("faults_not_recovered"), "leaked": s.get("leaked")}


def _targets(text: str) -> list[str]:
    names = [n for n in text.replace(",", " ").split() if n]
    bad = [n for n in names if n not in KINDS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"targets are some of {', '.join(KINDS)}, not {text!r}")
    return names


async def run_options(options: Options) -> dict[str, Any]:
    """:func:`run` for ``bench.run``: ``--n`` connections, ``--set duration=10m``,
    ``--set seed=1``, ``--set rate=10``, ``--set targets=endpoint,manager``."""
    extra = options.extra
    return await run(options.quick,
                     duration=parse_duration(extra["duration"]) if extra.get("duration") else None,
                     connections=options.n or DEFAULT_CONNECTIONS,
                     rate=float(extra.get("rate", DEFAULT_RATE)), seed=int(extra.get("seed", 1)),
                     targets=_targets(extra["targets"]) if extra.get("targets") else KINDS)


BENCH = Bench(name=NAME, doc=__doc__.split("\n\n")[0].replace("\n", " "), run=run_options,
              table=table, headline=headline)


def main(argv: list[str] | None = None) -> int:
    from bench.remote_setup import cli

    def extra(p: argparse.ArgumentParser) -> None:
        p.add_argument("--duration", type=parse_duration, default=None,
                       help="how long faults are injected (10m; --quick 1m), e.g. 90s, 10m")
        p.add_argument("--connections", type=int, default=DEFAULT_CONNECTIONS,
                       help=f"connections carrying traffic ({DEFAULT_CONNECTIONS})")
        p.add_argument("--rate", type=float, default=DEFAULT_RATE,
                       help=f"echoes per second per connection ({DEFAULT_RATE:g})")
        p.add_argument("--seed", type=int, default=1, help="seed of the fault sequence (1)")
        p.add_argument("--targets", nargs="+", type=_targets, default=None,
                       help=f"kinds of daemon to kill (default all): {', '.join(KINDS)}")
        p.add_argument("--heal-timeout", type=float, default=HEAL_TIMEOUT,
                       help=f"seconds a connection has to recover after a fault ({HEAL_TIMEOUT:g})")
        p.add_argument("--logs", metavar="DIR", help="copy the daemons' logs into DIR")

    def runner(*, targets: list[list[str]] | None = None, **kwargs: Any) -> Any:
        return run(targets=[n for group in targets for n in group] if targets else KINDS, **kwargs)

    return cli(__doc__, runner, table, argv, extra)


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())

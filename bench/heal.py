"""Heal time per fault: the time from a fault to traffic restored, and the echoes lost at 50/s,
for every fault the reference's heal suites inject, ``runs`` times each (median and p95).

The cluster is the emulated one (:class:`nsm.lab.harness.LabHarness`, real daemons, real VXLAN):
three nodes, the registry on node1. A fresh lab per fault (per run for ``node-lost``, which
destroys a node), and per run, inside a harness scope: fresh endpoints (``nsm nse``) for a
service of the run's own, a client pod on node1 with an SDK ``Client`` (default settings: heal
on, data-plane check every 200 ms) connected to the endpoint on node2 (the *victim*: started
first, so the client gets it), then, where the fault needs one, another endpoint for the same
service (same node or node3). A steady ICMP stream (:mod:`bench.echoes`, 50 echoes/s) runs from
the client pod to the connection's destination, and follows it to the new address when the
connection heals onto another endpoint. Then the fault, and:

- **heal** (s): from the fault to the first reply to an echo sent after the last lost one
  (traffic back for good; 0 when nothing was lost); for the faults where the connection must move
  to the other endpoint, at least until the first reply through it;
- **lost**: echoes that got no reply, from 0.5 s before the fault to the end of the run;
- **gap** (s): the longest time between two answered echoes (by send time) in that window;
- **detected** (s): when the client reported the connection DOWN (if it did); **healed** (s):
  when it reported it HEALED; the heal's reason.

A run ends 1 s after the client's connection is up and traffic has flowed for 0.5 s since the
fault (or after ``--heal-timeout`` s: not healed, a failure). Then the connection must refresh,
the interface in the pod must be the same one after restarts (same ifindex), a new client must
get the service after a registry restart, and Close must leave nothing behind on any node (the
scope's leak check: links, rules, routes, endpoint pods' interfaces, monitors).

Faults (``--faults``; default all): see :data:`FAULTS`. Bars (issue 7): endpoint death (process
or pod) → traffic through another endpoint, p50 ≤ 1 s; datapath interrupted → healed p50 ≤
1.5 s; node lost → reselected p50 ≤ 3 s; forwarder, manager or registry restart → 0 echoes lost
(in every run). The reference (deployments-k8s ``examples/heal``) retries each step for up to
60 s: its heal budget.

    python -m bench.heal [--quick] [--runs 5] [--faults NAME ...] [--rate 50] [--down 3] [--json F]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import NS_PREFIX, Bar, Bench, Failures, Options, fmt, machine, say, summarize
from bench.common import sweep_stale as sweep
from bench.echoes import Echoes, Flow
from nsm.api.connection_pb2 import Connection
from nsm.client.notify import State, StateChange
from nsm.client.sdk import Client
from nsm.errors import NotFound, Unavailable
from nsm.kernel import netns as nsns
from nsm.lab import Lab, NodeSpec, Topology
from nsm.lab.harness import LabHarness, Nse

NAME = "heal"
RATE = 50.0
DEFAULT_RUNS, QUICK_RUNS = 5, 2
#: Seconds a restarted daemon stays down (the issue's forwarder case: restarted 3 s later).
DOWN = 3.0
#: A run that has not healed this long after the fault failed.
HEAL_TIMEOUT = 30.0
#: The reference's budget per heal step (its heal suites retry each step for 60 s).
REFERENCE_BUDGET = 60.0
#: Traffic observed before the fault and after the heal.
BEFORE, AFTER = 0.5, 1.0
#: Seconds an echo has for its reply.
LINGER = 1.0
TOPOLOGY = Topology(nodes=(NodeSpec("node1"), NodeSpec("node2"), NodeSpec("node3")))
CLIENT_NODE, VICTIM_NODE, OTHER_NODE = "node1", "node2", "node3"


def dst_of(conn: Connection) -> str:
    return conn.context.ip_context.dst_ip_addrs[0].split("/")[0]


@dataclass(eq=False)
class Tracked:
    """A client's state changes, with when each came (monotonic), and the echo flow through
    its connection, which follows the connection to its new destination when it changes."""

    flow: Flow | None = None
    changes: list[tuple[float, StateChange]] = field(default_factory=list)

    def on_change(self, change: StateChange) -> None:
        self.changes.append((time.monotonic(), change))
        if change.connection is not None and self.flow is not None and change.state in (
                State.ESTABLISHED, State.REFRESHED, State.HEALED):
            self.flow.dst = dst_of(change.connection)

    def since(self, t0: float, t1: float | None = None) -> list[StateChange]:
        return [c for at, c in self.changes if at >= t0 and (t1 is None or at < t1)]

    def first(self, state: State, t: float) -> float | None:
        return next((at for at, c in self.changes if at >= t and c.state is state), None)

    def last(self, state: State, t: float) -> float | None:
        found = [at for at, c in self.changes if at >= t and c.state is state]
        return found[-1] if found else None

    def up(self, t: float) -> bool:
        """No heal pending: no DOWN or FAILED since ``t`` without a HEALED or REFRESHED (a
        refresh that failed once and then worked) after it."""
        pending = False
        for c in self.since(t):
            if c.state in (State.DOWN, State.FAILED):
                pending = True
            elif c.state in (State.HEALED, State.REFRESHED):
                pending = False
        return not pending

    def carries(self, client: Client, window: float = 0.5) -> bool:
        """The connection is up, the flow goes to its destination, and every echo of the last
        ``window`` s was answered."""
        conn = client.connection
        return (conn is not None and self.flow is not None and self.flow.dst == dst_of(conn)
                and self.flow.healthy(window))


@dataclass(eq=False)
class Run:
    """One run of one fault: the lab, the endpoints, the client and its traffic."""

    h: LabHarness
    fault: Fault
    index: int
    down: float
    victim: Nse
    pod: str = ""
    other: Nse | None = None
    client: Client | None = None
    track: Tracked = field(default_factory=Tracked)

    @property
    def flow(self) -> Flow:
        assert self.track.flow is not None
        return self.track.flow


# -- faults -----------------------------------------------------------------------------------


async def _kill_endpoint(run: Run) -> None:
    await run.victim.daemon.kill()


async def _endpoint_pod_gone(run: Run) -> None:
    await run.victim.daemon.kill()
    nsns.delete_netns(os.path.basename(run.victim.netns))


async def _nsm1_down(run: Run) -> None:
    await run.h.netlink.set_down(run.pod, "nsm-1")


async def _endpoint_if_deleted(run: Run) -> None:
    (name,) = await run.h.link_names(run.victim.netns)
    await run.h.netlink.delete_link(run.victim.netns, name)


async def _vxlan_deleted(run: Run) -> None:
    (name,) = [n for n in await run.h.tunnel_links(CLIENT_NODE) if n.startswith("nsx")]
    await run.h.netlink.delete_link(run.h.lab.node(CLIENT_NODE).netns, name)


def _restart(key: str) -> Callable[[Run], Awaitable[None]]:
    async def restart(run: Run) -> None:
        await run.h.lab.kill(key)
        await asyncio.sleep(run.down)
        await run.h.lab.start_daemon(key)
    return restart


async def _node_lost(run: Run) -> None:
    """Every process of the node killed at once, then its pods' and its own namespace deleted
    (its fabric port goes with it)."""
    lab, node = run.h.lab, run.victim.node
    await asyncio.gather(run.victim.daemon.kill(), lab.kill(f"manager.{node}"),
                         lab.kill(f"forwarder.{node}"))
    nsns.delete_netns(os.path.basename(run.victim.netns))
    nsns.delete_netns(lab.ns_name(node))


async def _node_cut(run: Run) -> None:
    """The node lost without a word (power gone): its fabric port removed first, so that no
    TCP reset or FIN of its processes reaches anyone, then as :func:`_node_lost`."""
    lab, node = run.h.lab, run.victim.node
    await run.h.netlink.delete_link(lab.fabric_netns, node)  # the port is named after the node
    await _node_lost(run)


@dataclass(frozen=True)
class Fault:
    name: str
    doc: str
    #: ``endpoint``, ``datapath``, ``node`` or ``restart``: which bar applies.
    group: str
    inject: Callable[[Run], Awaitable[None]]
    #: Where the other endpoint for the service runs (None: there is none).
    other: str | None = None
    #: A restart: the client's interface must stay the same one.
    restart: bool = False


FAULTS: dict[str, Fault] = {f.name: f for f in (
    Fault("endpoint-kill", "endpoint process killed (kill -9), another endpoint on its node",
          "endpoint", _kill_endpoint, other=VICTIM_NODE),
    Fault("endpoint-kill-remote", "endpoint process killed, another endpoint on another node",
          "endpoint", _kill_endpoint, other=OTHER_NODE),
    Fault("endpoint-pod-gone", "endpoint process killed and its pod (namespace) deleted, another "
          "endpoint on its node", "endpoint", _endpoint_pod_gone, other=VICTIM_NODE),
    Fault("nsm1-down", "nsm-1 set down in the client pod", "datapath", _nsm1_down),
    Fault("endpoint-if-deleted", "the endpoint's interface deleted in its pod", "datapath",
          _endpoint_if_deleted),
    Fault("vxlan-deleted", "the connection's VXLAN device deleted on the client's node",
          "datapath", _vxlan_deleted),
    Fault("forwarder-restart-client", "forwarder of the client's node killed, started again",
          "restart", _restart(f"forwarder.{CLIENT_NODE}"), restart=True),
    Fault("forwarder-restart-endpoint", "forwarder of the endpoint's node killed, started again",
          "restart", _restart(f"forwarder.{VICTIM_NODE}"), restart=True),
    Fault("manager-restart-client", "manager of the client's node killed, started again",
          "restart", _restart(f"manager.{CLIENT_NODE}"), restart=True),
    Fault("manager-restart-endpoint", "manager of the endpoint's node killed, started again",
          "restart", _restart(f"manager.{VICTIM_NODE}"), restart=True),
    Fault("registry-restart", "registry killed, started again (in-memory: empty)", "restart",
          _restart("registry"), restart=True),
    Fault("node-lost", "the endpoint's node lost (its daemons killed, its namespaces deleted), "
          "another endpoint on another node", "node", _node_lost, other=OTHER_NODE),
    Fault("node-cut", "the same, its network cut first (no TCP reset from its processes "
          "reaches anyone, as when power is lost)", "node", _node_cut, other=OTHER_NODE),
)}

#: Per group: what the bar judges, its limit and unit.
BARS: dict[str, tuple[str, float, str]] = {
    "endpoint": ("heal p50 (s)", 1.0, "s"),
    "datapath": ("heal p50 (s)", 1.5, "s"),
    "node": ("heal p50 (s)", 3.0, "s"),
    "restart": ("echoes lost, worst run", 0.0, ""),
}


# -- one run ----------------------------------------------------------------------------------


async def wait_for(check: Callable[[], bool], timeout: float) -> bool:
    """Whether ``check()`` became true within ``timeout`` s (polled every 20 ms)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def request_retrying(client: Client, wait: float) -> Connection:
    """A first Request, retried while the service's endpoints reach the client's manager."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return await client.request()
        except (NotFound, Unavailable):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def _setup(run: Run, service: str, echoes: Echoes) -> None:
    """The client's connection to the victim, the other endpoint, traffic flowing."""
    h, i = run.h, run.index
    run.pod = await h.pod("c")
    run.client = h.open_client(CLIENT_NODE, service, run.pod, name=h.name("nsc"),
                               on_change=run.track.on_change)
    conn = await request_retrying(run.client, 15.0)
    if conn.network_service_endpoint_name != run.victim.name:
        raise AssertionError(f"connected to {conn.network_service_endpoint_name}, not "
                             f"{run.victim.name}")
    if run.fault.other is not None:
        run.other = await h.start_nse("alt", services=[service], cidr=f"10.91.{i % 250}.0/24",
                                      node=run.fault.other)
    flow = run.track.flow = echoes.add(f"run{i}", run.pod, dst_of(conn), RATE)
    started = time.monotonic()
    if not await wait_for(lambda: flow.replies(started) >= 10, 10.0):
        raise AssertionError("no traffic through the connection before the fault")


async def one_run(h: LabHarness, fault: Fault, index: int, *, down: float,
                  heal_timeout: float, failures: Failures) -> dict[str, Any]:
    """Set up, inject the fault, measure; the run's figures (``healed`` False: it did not)."""
    echoes = Echoes().start()
    out: dict[str, Any] = {"run": index, "healed": False}
    what = f"{fault.name} run {index}"
    try:
        async with h.scope(check=fault.group != "node", grace=10.0):
            service = h.name("svc")
            victim = await h.start_nse("ep", services=[service], cidr=f"10.90.{index % 250}.0/24",
                                       node=VICTIM_NODE)
            run = Run(h, fault, index, down, victim)
            await _setup(run, service, echoes)
            assert run.client is not None
            flow, client, track = run.flow, run.client, run.track
            ifindex = await h.netlink.index(run.pod, "nsm-1")
            t_window = time.monotonic()
            await asyncio.sleep(BEFORE)
            t_fault = time.monotonic()
            await fault.inject(run)
            t_injected = time.monotonic()
            out["inject_s"] = round(t_injected - t_fault, 3)

            def healed() -> bool:
                conn = client.connection
                if conn is None or not track.up(t_fault) or not track.carries(client):
                    return False
                if run.other is not None and conn.network_service_endpoint_name != run.other.name:
                    return False
                return time.monotonic() - t_injected > 0.5

            ok = await wait_for(healed, heal_timeout)
            await asyncio.sleep(AFTER)
            t_end = flow.pause()
            await asyncio.sleep(LINGER)  # the last echoes' replies
            conn = client.connection
            restored = flow.restored(t_fault, t_end)
            if run.other is not None and conn is not None:
                through = flow.first_reply(t_fault, dst_of(conn))
                restored = None if through is None or restored is None else max(restored, through)
            out.update(_figures(run, t_window, t_fault, t_end, restored))
            out["healed"] = ok
            echoes.remove(flow)
            if not ok:
                failures.add(what, AssertionError(
                    f"not healed within {heal_timeout:g} s: changes {_states(run, t_fault)}"))
                return out
            await _after(run, fault, ifindex, out, failures, what)
            await client.close(raise_errors=True)
            if fault.group == "node":
                out["clean_after_s"] = round(
                    await h.eventually_clean(10.0, nodes=[CLIENT_NODE, OTHER_NODE]), 3)
    except Exception as exc:
        failures.add(what, exc)
        out["error"] = repr(exc)[:400]
    finally:
        await asyncio.to_thread(echoes.stop, 0.0)
    return out


def _states(run: Run, t: float) -> list[str]:
    return [f"{c.state.value}: {c.reason}"[:160] for c in run.track.since(t)]


def _figures(run: Run, t_window: float, t_fault: float, t_end: float,
             restored: float | None) -> dict[str, Any]:
    flow, track = run.flow, run.track
    down, healed = track.first(State.DOWN, t_fault), track.last(State.HEALED, t_fault)
    reasons = [c.reason for c in track.since(t_fault) if c.state in (State.DOWN, State.HEALED)]
    conn = run.client.connection if run.client is not None else None

    def rel(t: float | None) -> float | None:
        return None if t is None else round(t - t_fault, 3)

    return {
        "heal_s": rel(restored),
        "lost": flow.lost(t_window, t_end),
        "sent": sum(1 for _ in flow.between(t_window, t_end)),
        "gap_s": round(flow.longest_gap(t_window, t_end), 3),
        "detected_s": rel(down),
        "client_healed_s": rel(healed),
        "failed_tries": sum(1 for c in track.since(t_fault) if c.state is State.FAILED),
        "reasons": [r[:200] for r in reasons[:4]],
        "endpoint_after": conn.network_service_endpoint_name if conn is not None else None,
        "send_errors": len([e for e in flow.errors if e[0] >= t_window]),
    }


async def _after(run: Run, fault: Fault, ifindex: int | None, out: dict[str, Any],
                 failures: Failures, what: str) -> None:
    """What must hold once healed: the refresh works, a restart kept the interface, a new
    client gets the service after a registry restart."""
    assert run.client is not None
    h = run.h
    try:
        await run.client.request()
        out["refresh_after"] = True
    except Exception as exc:
        out["refresh_after"] = False
        failures.add(f"{what}: refresh after the heal", exc)
    if fault.restart:
        now = await h.netlink.index(run.pod, "nsm-1")
        out["same_interface"] = now == ifindex
        if now != ifindex:
            failures.add(what, AssertionError(f"nsm-1 re-created (ifindex {ifindex} -> {now})"))
    if fault.name == "registry-restart":
        pod = await h.pod("n")
        fresh = h.open_client(CLIENT_NODE, run.client.service, pod, name=h.name("nscn"))
        t0 = time.monotonic()
        try:
            await request_retrying(fresh, 15.0)
            out["new_request_s"] = round(time.monotonic() - t0, 3)
            await fresh.close(raise_errors=True)
        except Exception as exc:
            failures.add(f"{what}: a new Request after the registry restart", exc)


#: A log line at level error or critical, or the start of a traceback.
_ERROR_LINE = re.compile(r"^(?:\S+ (?:error|critical) .*|Traceback .*)$", re.MULTILINE)


def daemon_errors(lab: Lab, limit: int = 5) -> list[str]:
    """Errors and tracebacks in the lab's daemons' logs (warnings are expected while faults
    are healed: a hop that lost its next one says so), the first ``limit`` of each daemon."""
    return [f"{key}: {line[:240]}" for key, text in lab.logs().items()
            for line in _ERROR_LINE.findall(text)[:limit]]


def prepare(what: str) -> None:
    """Before a benchmark with in-process clients: root, the namespaces a killed benchmark left
    removed, and those clients quiet (they log through ``nsm``'s loggers: without a handler
    every DOWN would reach stderr through :data:`logging.lastResort`)."""
    if os.geteuid() != 0:
        raise PermissionError(f"{what} needs root (network namespaces, veth, vxlan)")
    if removed := sweep():
        say(f"removed {len(removed)} namespaces left by a killed benchmark")
    if not logging.getLogger("nsm").handlers:
        logging.getLogger("nsm").addHandler(logging.NullHandler())


# -- the benchmark ----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def lab_harness(topology: Topology, logs: str | None, tag: str) -> Any:
    """A running lab harness; with ``logs``, the daemons' logs are copied to ``<logs>/<tag>``
    before the lab is torn down (its work directory goes with it)."""
    async with LabHarness.running(topology, prefix=f"{NS_PREFIX}{os.getpid()}", start_timeout=60.0,
                                  print_logs_on_error=False) as h:
        try:
            yield h
        finally:
            if logs:
                target = Path(logs) / tag
                with contextlib.suppress(OSError):
                    shutil.copytree(h.lab.log_dir, target, dirs_exist_ok=True)
                    say(f"  daemons' logs copied to {target}")


def _summary(fault: Fault, runs: list[dict[str, Any]]) -> dict[str, Any]:
    def values(key: str) -> list[float]:
        return [r[key] for r in runs if r.get(key) is not None]

    healed = [r for r in runs if r.get("healed")]
    out: dict[str, Any] = {
        "doc": fault.doc, "group": fault.group, "runs": runs,
        "healed": f"{len(healed)}/{len(runs)}",
        "heal_s": summarize([r["heal_s"] for r in healed if r.get("heal_s") is not None]),
        "lost": summarize(values("lost"), 1),
        "gap_s": summarize(values("gap_s")),
        "detected_s": summarize(values("detected_s")),
        "client_healed_s": summarize(values("client_healed_s")),
    }
    what, limit, unit = BARS[fault.group]
    if fault.group == "restart":
        value: float | None = max(values("lost")) if values("lost") else None
    else:
        value = out["heal_s"].get("p50")
    if len(healed) < len(runs):
        value = None  # a run that did not heal misses the bar whatever the others did
    out["bar"] = Bar(f"{fault.name}: {what}", value, limit, unit).as_dict()
    out["within_reference_budget"] = (len(healed) == len(runs) and all(
        r["heal_s"] is not None and r["heal_s"] <= REFERENCE_BUDGET for r in healed))
    return out


async def run(quick: bool = False, *, runs: int | None = None,
              faults: Sequence[str] | None = None, down: float = DOWN,
              heal_timeout: float = HEAL_TIMEOUT, logs: str | None = None) -> dict[str, Any]:
    """The whole benchmark (see the module docstring); one JSON-able dict. ``logs``: a
    directory to copy each lab's daemon logs to."""
    runs = runs or (QUICK_RUNS if quick else DEFAULT_RUNS)
    chosen = [FAULTS[name] for name in (faults or FAULTS)]
    prepare(NAME)
    failures = Failures()
    result: dict[str, Any] = {"name": NAME, "runs_per_fault": runs, "rate": RATE, "down_s": down,
                              "heal_timeout_s": heal_timeout,
                              "reference_budget_s": REFERENCE_BUDGET, "machine": machine(),
                              "faults": {}}
    started = time.perf_counter()
    problems: list[str] = []
    try:
        for fault in chosen:
            say(f"  {fault.name}: {fault.doc}")
            done: list[dict[str, Any]] = []
            per_run_lab = fault.group == "node"
            h: LabHarness | None = None
            stack = contextlib.AsyncExitStack()
            try:
                for i in range(runs):
                    if h is None or per_run_lab:
                        await stack.aclose()
                        tag = f"{fault.name}-{i + 1}" if per_run_lab else fault.name
                        h = await stack.enter_async_context(lab_harness(TOPOLOGY, logs, tag))
                    r = await one_run(h, fault, i, down=down, heal_timeout=heal_timeout,
                                      failures=failures)
                    done.append(r)
                    say(f"    run {i + 1}/{runs}: " + _run_line(r))
                    if per_run_lab or i == runs - 1:
                        problems += [f"{fault.name}: {line}" for line in daemon_errors(h.lab)]
            finally:
                await stack.aclose()
            result["faults"][fault.name] = _summary(fault, done)
    finally:
        result["failures"] = failures.count
        result["failure_examples"] = failures.first
        result["daemon_errors"] = {"count": len(problems), "first": problems[:10]}
        result["wall_s"] = round(time.perf_counter() - started, 1)
    result["bars"] = [f["bar"] for f in result["faults"].values()]
    return result


def _run_line(r: dict[str, Any]) -> str:
    if "heal_s" not in r:
        return f"ERROR {r.get('error')}"
    return (f"{'healed' if r['healed'] else 'NOT HEALED'} in {fmt(r['heal_s'], 0, 3)} s, "
            f"{r['lost']}/{r['sent']} lost, longest gap {fmt(r['gap_s'], 0, 3)} s, client DOWN at "
            f"{fmt(r['detected_s'], 0, 3)} s, HEALED at {fmt(r['client_healed_s'], 0, 3)} s"
            f"{'' if 'error' not in r else '; ERROR ' + r['error']}")


def table(result: dict[str, Any]) -> str:
    """The result as a human table."""
    lines = [f"heal: {result['runs_per_fault']} runs per fault, {result['rate']:g} echoes/s from "
             f"the client pod, restarted daemons down {result['down_s']:g} s; the reference's "
             f"budget: {result['reference_budget_s']:g} s per heal step"]
    head = (f"{'fault':<27} {'healed':>6} {'heal p50':>8} {'p95':>6} {'max':>6} | {'lost p50':>8} "
            f"{'max':>4} | {'gap p50':>7} {'max':>6} | {'DOWN p50':>8} | {'bar':<24} | ref 60 s")
    lines += [head, "-" * len(head)]
    for name, f in result["faults"].items():
        heal, lost, gap, det = f["heal_s"], f["lost"], f["gap_s"], f["detected_s"]
        bar = f["bar"]
        limit = f"{bar['limit']:g}{bar['unit'] or ''}"
        verdict = f"{'lost' if f['group'] == 'restart' else 'p50'} <= {limit}: " \
                  f"{'ok' if bar['ok'] else 'MISSED'}"
        lines.append(
            f"{name:<27} {f['healed']:>6} {fmt(heal.get('p50'), 8)} {fmt(heal.get('p95'), 6)} "
            f"{fmt(heal.get('max'), 6)} | {fmt(lost.get('p50'), 8, 0)} {fmt(lost.get('max'), 4, 0)} | "
            f"{fmt(gap.get('p50'), 7)} {fmt(gap.get('max'), 6)} | {fmt(det.get('p50'), 8)} | "
            f"{verdict:<24} | {'within' if f['within_reference_budget'] else 'NOT within'}")
    lines.append("heal/gap/DOWN in s from the fault; lost = echoes without a reply (of ~"
                 f"{result['rate']:g}/s) from {BEFORE:g} s before the fault to {AFTER:g} s "
                 "after the heal")
    lines.append(f"failures: {result['failures']}")
    lines += [f"  {t}" for t in result.get("failure_examples", [])]
    errors = result.get("daemon_errors") or {}
    lines.append(f"errors and tracebacks in the daemons' logs: {errors.get('count', '-')}")
    lines += [f"  {t}" for t in errors.get("first", [])]
    return "\n".join(lines)


def headline(result: dict[str, Any]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for name, f in result.get("faults", {}).items():
        out[f"{name} heal p50 s"] = f["heal_s"].get("p50")
        out[f"{name} lost max"] = f["lost"].get("max")
    return out


def _faults_arg(text: str) -> list[str]:
    names = [n for n in text.replace(",", " ").split() if n]
    bad = [n for n in names if n not in FAULTS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown fault(s) {bad}; one of {', '.join(FAULTS)}")
    return names


async def run_options(options: Options) -> dict[str, Any]:
    """:func:`run` for ``bench.run``: ``--n`` runs per fault, ``--set faults=a,b``,
    ``--set down=3``."""
    extra = options.extra
    return await run(options.quick, runs=options.n,
                     faults=_faults_arg(extra["faults"]) if extra.get("faults") else None,
                     down=float(extra.get("down", DOWN)),
                     heal_timeout=float(extra.get("heal_timeout", HEAL_TIMEOUT)))


BENCH = Bench(name=NAME, doc=__doc__.split("\n\n")[0].replace("\n", " "), run=run_options,
              table=table, headline=headline)


def main(argv: list[str] | None = None) -> int:
    from bench.remote_setup import cli

    def extra(p: argparse.ArgumentParser) -> None:
        p.add_argument("--runs", type=int, default=None,
                       help=f"runs per fault ({DEFAULT_RUNS}; --quick {QUICK_RUNS})")
        p.add_argument("--faults", nargs="+", type=_faults_arg, default=None,
                       help=f"faults to inject (default all): {', '.join(FAULTS)}")
        p.add_argument("--down", type=float, default=DOWN,
                       help=f"seconds a restarted daemon stays down ({DOWN:g})")
        p.add_argument("--heal-timeout", type=float, default=HEAL_TIMEOUT,
                       help=f"seconds after which a run counts as not healed ({HEAL_TIMEOUT:g})")
        p.add_argument("--logs", metavar="DIR", help="copy each lab's daemon logs into DIR")

    def runner(*, faults: list[list[str]] | None = None, **kwargs: Any) -> Awaitable[dict[str, Any]]:
        return run(faults=[n for group in faults for n in group] if faults else None, **kwargs)

    return cli(__doc__, runner, table, argv, extra)


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())

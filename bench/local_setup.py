"""Local connection setup through the real daemons, against the raw netlink floor.

The mesh is the demo's: registry, manager, forwarder and endpoint (NSE) run as real processes
(``nsm <role>``, unix sockets in a scratch directory); the endpoint's interfaces go to one
namespace. Clients use the SDK (:class:`nsm.client.sdk.Client`) in this process, each in its own
namespace created beforehand (namespace creation is not timed). Each client is a fresh
``Client``, so its Request also connects its gRPC channel to the manager, as a new pod would.

Per connection:

- **request**: ``await client.request()`` (NSC → manager → forwarder → NSE and back, the veth
  programmed by the forwarder before the answer returns);
- **request+verified**: the same, plus checking from here that the interface exists in the
  client namespace, is up and has every address of the connection (``Netlink.link`` and
  ``Netlink.addresses``); the check is timed after the request, so "request" is not inflated;
- **close**: ``await client.close()`` (the forwarder deletes the veth before answering), then
  checked (untimed) that the interface is gone.

Phases: ``n`` connections one at a time, then ``n`` more ``concurrency`` at a time (all set up,
then all closed, like the floor). In the same run, :func:`bench.netlink_floor.measure_floor`
does the same kernel work with the same ``n`` and concurrency, and the ratio
p50(ours) / p50(floor) is compared with the bar (3x). A short **breakdown** then times the
hops separately over warm channels: an empty gRPC call (health check), a Request straight to
the NSE, straight to the forwarder (with the next-hop header the manager would send), and
through the manager. Last, a **timeline**: a fresh mesh whose daemons timestamp each hop (an
instrumentation loaded as ``sitecustomize`` into that mesh only, see :data:`_TIMELINE_SITE`)
splits one Request into its gRPC legs, chains and netlink work.

    python -m bench.local_setup [--n 200] [--concurrency 20] [--quick] [--repeat K]
                                [--no-floor] [--no-breakdown] [--no-timeline] [--json F]

(``python -m bench.run --only local_setup --set floor=0 ...`` is the same.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.common import (
    Bar,
    Bench,
    CpuMeter,
    Options,
    Scratch,
    fmt,
    machine,
    outcome_lines,
    ratio,
    say,
    settle,
    summarize,
    sweep_stale,
)
from bench.netlink_floor import measure_floor
from nsm.api.connection_pb2 import Connection
from nsm.client.sdk import Client, close_once, new_request, request_once
from nsm.errors import NotFound, NsmError, Unavailable
from nsm.kernel.netlink import Netlink
from nsm.mechanisms import kernel, netns_url
from nsm.transport import dial
from nsm.wellknown import NEXT_HOP_HEADER

NAME = "local_setup"
DEFAULT_N = 200
DEFAULT_CONCURRENCY = 20
QUICK_N = 20
QUICK_CONCURRENCY = 5
#: The bar: our p50 within this factor of the floor's p50, measured in the same run.
BAR = 3.0
SERVICE = "bench-ip"
CIDR = "172.30.0.0/16"
IFNAME = "nsm-1"
WARMUP = 3
#: Connections per breakdown measurement (at most ``n``).
BREAKDOWN_N = 100


class CheckFailed(Exception):
    """The interface is not what the connection says (missing, down, addresses missing)."""


@dataclass
class _Mesh:
    scratch: Scratch
    registry_url: str
    manager_url: str
    forwarder_url: str
    nse_url: str
    nse_netns: str
    pids: dict[str, int | None]


@dataclass
class _Failures:
    count: int = 0
    first: list[str] = field(default_factory=list)

    def add(self, what: str, exc: BaseException) -> None:
        self.count += 1
        if len(self.first) < 10:
            text = exc.message if isinstance(exc, NsmError) else repr(exc)
            self.first.append(f"{what}: {text}"[:400])


def _ms(t0: float, t1: float) -> float:
    return (t1 - t0) * 1e3


async def _start_mesh(scratch: Scratch, env: dict[str, str] | None = None) -> _Mesh:
    nse_ns = scratch.netns("nse")
    reg, mgr, fwd, nse = (scratch.url(n) for n in ("registry", "manager", "forwarder", "nse"))
    await scratch.daemon("registry", ["registry", "--listen", reg], reg, env)
    await scratch.daemon("manager", ["manager", "--name", "bench-node", "--listen", mgr,
                                     "--registry", reg], mgr, env)
    await scratch.daemon("forwarder", ["forwarder", "--name", "bench-fwd", "--node", "bench-node",
                                       "--listen", fwd, "--manager", mgr, "--registry", reg], fwd, env)
    await scratch.daemon("nse", ["nse", "--name", "bench-nse", "--service", SERVICE, "--cidr", CIDR,
                                 "--netns", nse_ns, "--listen", nse, "--registry", reg], nse, env)
    pids = {d.name: d.pid for d in scratch.daemons}
    return _Mesh(scratch, reg, mgr, fwd, nse, nse_ns, pids)


async def verify_up(nl: Netlink, netns: str, conn: Connection, ifname: str = IFNAME) -> None:
    """The client's interface exists, is up and has every address of the connection."""
    link = await nl.link(netns, ifname)
    if link is None:
        raise CheckFailed(f"{ifname} does not exist in {netns}")
    if not link.admin_up:
        raise CheckFailed(f"{ifname} in {netns} is down")
    want = list(conn.context.ip_context.src_ip_addrs)
    if not want:
        raise CheckFailed("the connection has no client address")
    have = set(await nl.addresses(netns, ifname))
    missing = [a for a in want if a not in have]
    if missing:
        raise CheckFailed(f"{ifname} in {netns} lacks {', '.join(missing)} (has {sorted(have)})")


async def verify_gone(nl: Netlink, netns: str, ifname: str = IFNAME) -> None:
    if await nl.link(netns, ifname) is not None:
        raise CheckFailed(f"{ifname} is still in {netns} after Close")


async def _for_each(n: int, concurrency: int, fn: Callable[[int], Awaitable[None]]) -> float:
    """Run ``fn(0..n-1)``, ``concurrency`` at a time (in order when 1); wall time in s."""
    t0 = time.perf_counter()
    if concurrency <= 1:
        for i in range(n):
            await fn(i)
    else:
        sem = asyncio.Semaphore(concurrency)

        async def bounded(i: int) -> None:
            async with sem:
                await fn(i)

        await asyncio.gather(*(bounded(i) for i in range(n)))
    return time.perf_counter() - t0


async def _phase(mesh: _Mesh, nl: Netlink, namespaces: Sequence[str], concurrency: int,
                 failures: _Failures, label: str) -> dict[str, Any]:
    """Set up one connection per namespace, then close them all; timings and CPU."""
    n = len(namespaces)
    clients: list[Client | None] = [None] * n
    request_ms: list[float] = []
    verified_ms: list[float] = []
    verify_ms: list[float] = []
    close_ms: list[float] = []
    cpu = CpuMeter({**mesh.pids, "bench (client SDK + checks)": None})

    async def setup(i: int) -> None:
        client = Client(manager_url=mesh.manager_url, service=SERVICE, netns=namespaces[i],
                        ifname=IFNAME, name=f"bench-nsc-{label}-{i}")
        clients[i] = client
        t0 = time.perf_counter()
        try:
            conn = await client.request()
        except Exception as exc:
            failures.add(f"{label} request {i}", exc)
            return
        t1 = time.perf_counter()
        try:
            await verify_up(nl, namespaces[i], conn)
        except Exception as exc:
            failures.add(f"{label} verify {i}", exc)
            return
        t2 = time.perf_counter()
        request_ms.append(_ms(t0, t1))
        verified_ms.append(_ms(t0, t2))
        verify_ms.append(_ms(t1, t2))

    async def close(i: int) -> None:
        client = clients[i]
        if client is None or client.connection is None:
            return
        t0 = time.perf_counter()
        try:
            await client.close(raise_errors=True)
        except Exception as exc:
            failures.add(f"{label} close {i}", exc)
            return
        t1 = time.perf_counter()
        close_ms.append(_ms(t0, t1))
        try:
            await verify_gone(nl, namespaces[i])
        except Exception as exc:
            failures.add(f"{label} verify close {i}", exc)

    try:
        cpu.start()
        setup_wall = await _for_each(n, concurrency, setup)
        cpu_setup = cpu.stop(n)
        cpu.start()
        close_wall = await _for_each(n, concurrency, close)
        cpu_close = cpu.stop(n)
    finally:
        for c in clients:  # whatever is still open (failure, Ctrl-C)
            if c is not None:
                await asyncio.shield(c.close())
        for ns in namespaces:
            nl.forget(ns)
    return {
        "n": n,
        "concurrency": concurrency,
        "request_ms": summarize(request_ms),
        "request_verified_ms": summarize(verified_ms),
        "verify_ms": summarize(verify_ms),
        "close_ms": summarize(close_ms),
        "setup_wall_s": round(setup_wall, 3),
        "setups_per_s": round(n / setup_wall, 1),
        "close_wall_s": round(close_wall, 3),
        "closes_per_s": round(n / close_wall, 1),
        "cpu_ms_per_setup": cpu_setup,
        "cpu_ms_per_close": cpu_close,
    }


async def _warmup(mesh: _Mesh, nl: Netlink, count: int, failures: _Failures) -> list[float]:
    """First requests (channels between the daemons connect, caches fill); not counted. The
    very first waits (up to 15 s) until the endpoint's registration has reached the manager."""
    namespaces = mesh.scratch.netns_many("warm", count)
    out = []
    for i, ns in enumerate(namespaces):
        deadline = time.monotonic() + 15.0
        while True:
            client = Client(manager_url=mesh.manager_url, service=SERVICE, netns=ns,
                            ifname=IFNAME, name=f"bench-warm-{i}")
            t0 = time.perf_counter()
            try:
                conn = await client.request()
            except (NotFound, Unavailable) as exc:
                await client.close()
                if time.monotonic() > deadline:
                    failures.add(f"warm-up request {i}", exc)
                    raise
                await asyncio.sleep(0.1)
                continue
            out.append(_ms(t0, time.perf_counter()))
            try:
                await verify_up(nl, ns, conn)
            finally:
                await client.close(raise_errors=True)
            break
    return out


async def _timed(count: int, fn: Callable[[int], Awaitable[None]]) -> dict[str, float]:
    values = []
    for i in range(count):
        t0 = time.perf_counter()
        await fn(i)
        values.append(_ms(t0, time.perf_counter()))
    return summarize(values)


async def _breakdown(mesh: _Mesh, nl: Netlink, count: int, failures: _Failures) -> dict[str, Any]:
    """Sequential p50s of each hop over warm channels (see the module docstring)."""
    nse_ch, fwd_ch, mgr_ch = dial(mesh.nse_url), dial(mesh.forwarder_url), dial(mesh.manager_url)
    out: dict[str, Any] = {"n": count}
    try:
        for ch in (nse_ch, fwd_ch, mgr_ch):
            await asyncio.wait_for(ch.channel_ready(), 10)
        health = health_pb2_grpc.HealthStub(nse_ch)

        async def empty(i: int) -> None:
            await health.Check(health_pb2.HealthCheckRequest(), timeout=5)

        out["grpc_empty_call_ms"] = await _timed(count, empty)

        def request_for(ns: str) -> Any:
            return new_request(service=SERVICE, name="bench-direct",
                               mechanisms=[kernel(IFNAME, netns_url(ns))], conn_id=str(uuid.uuid4()))

        async def direct(channel: grpc.aio.Channel, namespaces: Sequence[str] | None,
                         metadata: Sequence[tuple[str, str]] | None, what: str
                         ) -> tuple[dict[str, float], dict[str, float]]:
            own = mesh.scratch.netns_many(f"bd{what}", count) if namespaces is None else namespaces
            conns: list[Connection] = []

            async def req(i: int) -> None:
                try:
                    conns.append(await request_once(channel, request_for(own[i]),
                                                    metadata=metadata))
                except NsmError as exc:
                    failures.add(f"breakdown {what} request {i}", exc)

            async def close(i: int) -> None:
                if i < len(conns):
                    try:
                        await close_once(channel, conns[i], metadata=metadata)
                    except NsmError as exc:
                        failures.add(f"breakdown {what} close {i}", exc)

            try:
                return await _timed(count, req), await _timed(count, close)
            finally:
                for ns in own:
                    nl.forget(ns)

        # The NSE programs nothing: any existing namespace will do for its mechanism.
        same = [mesh.nse_netns] * count
        out["nse_request_ms"], out["nse_close_ms"] = await direct(nse_ch, same, None, "nse")
        out["forwarder_request_ms"], out["forwarder_close_ms"] = await direct(
            fwd_ch, None, [(NEXT_HOP_HEADER, mesh.nse_url)], "fwd")
        out["manager_request_ms"], out["manager_close_ms"] = await direct(
            mgr_ch, None, None, "mgr")
    finally:
        for ch in (nse_ch, fwd_ch, mgr_ch):
            await ch.close()
    return out


#: Loaded by the daemons of the timeline phase only (``sitecustomize`` on their PYTHONPATH):
#: records, with the system-wide monotonic clock, when each Request enters and leaves a daemon's
#: servicer and when its Connect element sends to / hears from the next hop, keyed by the
#: client's connection id (path segment 0), and dumps them at exit. Product files are not
#: touched; if the product's names change, the timeline is reported as unavailable.
_TIMELINE_SITE = """
import os
if os.environ.get("NSM_BENCH_TIMELINE_DIR"):
    try:
        import atexit, json, sys, time
        import nsm.elements.connect as _cn
        import nsm.servicer as _sv

        _events = []
        _clock = time.perf_counter

        def _key(request):
            segments = request.connection.path.path_segments
            return segments[0].id if segments else ""

        _request = _sv.NetworkServiceServicer.Request

        async def _timed_request(self, request, context):
            key = _key(request)
            _events.append((key, self.chain.name + ".in", _clock()))
            try:
                return await _request(self, request, context)
            finally:
                _events.append((key, self.chain.name + ".out", _clock()))

        _sv.NetworkServiceServicer.Request = _timed_request
        _connect = _cn.Connect.request

        async def _timed_connect(self, ctx, request, next):
            key = _key(request)
            _events.append((key, ctx.chain.name + ".send", _clock()))
            try:
                return await _connect(self, ctx, request, next)
            finally:
                _events.append((key, ctx.chain.name + ".recv", _clock()))

        _cn.Connect.request = _timed_connect

        def _dump():
            path = os.path.join(os.environ["NSM_BENCH_TIMELINE_DIR"], str(os.getpid()) + ".json")
            with open(path, "w") as f:
                json.dump({"argv": sys.argv, "events": _events}, f)

        atexit.register(_dump)
    except Exception as exc:  # never break a daemon for a measurement
        print("bench timeline disabled:", repr(exc), file=sys.stderr)
"""

#: The legs of one Request, in order (``client.*`` are taken in this process).
_LEGS = [
    ("client.t0", "manager.in", "gRPC client -> manager (incl. the new channel)"),
    ("manager.in", "manager.send", "manager chain, before forwarding"),
    ("manager.send", "forwarder.in", "gRPC manager -> forwarder"),
    ("forwarder.in", "forwarder.send", "forwarder chain, before the NSE (interface check)"),
    ("forwarder.send", "endpoint.in", "gRPC forwarder -> NSE"),
    ("endpoint.in", "endpoint.out", "NSE chain (mechanism, IPAM)"),
    ("endpoint.out", "forwarder.recv", "gRPC reply NSE -> forwarder"),
    ("forwarder.recv", "forwarder.out", "forwarder after the NSE (netlink: veth, addresses)"),
    ("forwarder.out", "manager.recv", "gRPC reply forwarder -> manager"),
    ("manager.recv", "manager.out", "manager chain, after"),
    ("manager.out", "client.t1", "gRPC reply manager -> client"),
]


async def _timeline(count: int, failures: _Failures, keep_logs: bool) -> dict[str, Any]:
    """A fresh mesh whose daemons timestamp each hop (see :data:`_TIMELINE_SITE`); ``count``
    sequential requests; the p50 of each leg. Its own mesh, so the instrumentation never
    touches the main measurements."""
    scratch = Scratch("timeline", keep_logs=keep_logs)
    nl = Netlink()
    stamps: list[tuple[str, float, float]] = []
    try:
        site = scratch.work / "site"
        events_dir = scratch.work / "events"
        site.mkdir()
        events_dir.mkdir()
        (site / "sitecustomize.py").write_text(_TIMELINE_SITE)
        path = os.environ.get("PYTHONPATH")
        env = {"NSM_BENCH_TIMELINE_DIR": str(events_dir),
               "PYTHONPATH": f"{site}:{path}" if path else str(site)}
        namespaces = scratch.netns_many("t", count)
        mesh = await _start_mesh(scratch, env)
        await _warmup(mesh, nl, WARMUP, failures)
        clients = []
        try:
            for i, ns in enumerate(namespaces):
                client = Client(manager_url=mesh.manager_url, service=SERVICE, netns=ns,
                                ifname=IFNAME, name=f"bench-tl-{i}")
                clients.append(client)
                t0 = time.perf_counter()
                try:
                    await client.request()
                except NsmError as exc:
                    failures.add(f"timeline request {i}", exc)
                    continue
                stamps.append((client.conn_id, t0, time.perf_counter()))
        finally:
            await asyncio.shield(asyncio.gather(*(c.close() for c in clients)))
        await scratch.stop_daemons()  # they write their events at exit
        problems = scratch.log_problems()
        events: dict[str, dict[str, float]] = {}
        for f in events_dir.glob("*.json"):
            for key, what, t in json.loads(f.read_text())["events"]:
                events.setdefault(key, {})[what] = t
    finally:
        await nl.close()
        await scratch.aclose()
    legs: dict[str, list[float]] = {name: [] for _, _, name in _LEGS}
    total: list[float] = []
    for conn_id, t0, t1 in stamps:
        e = {**events.get(conn_id, {}), "client.t0": t0, "client.t1": t1}
        if not all(a in e and b in e for a, b, _ in _LEGS):
            continue
        for a, b, name in _LEGS:
            legs[name].append(_ms(e[a], e[b]))
        total.append(_ms(t0, t1))
    if not total:
        return {"n": count, "error": "no timeline events (instrumentation out of date?)",
                "daemon_log_problems": problems}
    p50 = {name: round(statistics.median(v), 3) for name, v in legs.items()}
    grpc_legs = sum(v for k, v in p50.items() if k.startswith("gRPC"))
    netlink = p50["forwarder after the NSE (netlink: veth, addresses)"]
    chains = sum(v for k, v in p50.items() if not k.startswith("gRPC")) - netlink
    return {"n": len(total), "total_ms": summarize(total), "legs_p50_ms": p50,
            "groups_p50_ms": {"gRPC (6 one-way legs)": round(grpc_legs, 3),
                              "netlink programming (forwarder)": round(netlink, 3),
                              "chains (3 daemons)": round(chains, 3)},
            "daemon_log_problems": problems}


async def run(options: Options) -> dict[str, Any]:
    """The whole benchmark (see the module docstring); one result dict."""
    n = options.n or (QUICK_N if options.quick else DEFAULT_N)
    concurrency = options.concurrency or (QUICK_CONCURRENCY if options.quick else DEFAULT_CONCURRENCY)
    with_floor = options.extra.get("floor", "1") not in ("0", "false", "no")
    with_breakdown = options.extra.get("breakdown", "1") not in ("0", "false", "no")
    with_timeline = options.extra.get("timeline", "1") not in ("0", "false", "no")
    if os.geteuid() != 0:
        raise PermissionError("local_setup needs root (network namespaces, veth)")
    stale = sweep_stale()
    if stale:
        say(f"removed {len(stale)} namespaces left by a killed benchmark")
    failures = _Failures()
    result: dict[str, Any] = {"name": NAME, "n": n, "concurrency": concurrency,
                              "machine": machine()}
    started = time.perf_counter()
    scratch = Scratch("local", keep_logs=options.keep_logs)
    nl = Netlink()
    try:
        t0 = time.perf_counter()
        seq_ns = scratch.netns_many("s", n)
        conc_ns = scratch.netns_many("c", n)
        say(f"local_setup: {2 * n} client namespaces in {time.perf_counter() - t0:.1f} s; "
            "starting registry, manager, forwarder, nse")
        mesh = await _start_mesh(scratch)
        result["pids"] = mesh.pids
        result["warmup_ms"] = [round(v, 2) for v in await _warmup(mesh, nl, WARMUP, failures)]
        say(f"  warm-up requests (ms): {result['warmup_ms']}")

        say(f"  ours: {n} connections, one at a time")
        result["sequential"] = await _phase(mesh, nl, seq_ns, 1, failures, "seq")
        await settle(options.settle)
        if with_floor:
            say(f"  floor: {n} connections, one at a time")
            result["floor_sequential"] = await measure_floor(n, 1)
            await settle(options.settle)
        say(f"  ours: {n} connections, {concurrency} at a time")
        result["concurrent"] = await _phase(mesh, nl, conc_ns, concurrency, failures, "conc")
        await settle(options.settle)
        if with_floor:
            say(f"  floor: {n} connections, {concurrency} at a time")
            result["floor_concurrent"] = await measure_floor(n, concurrency)
            await settle(options.settle)
        if with_breakdown:
            count = min(n, BREAKDOWN_N)
            say(f"  breakdown: {count} sequential requests per hop, warm channels")
            result["breakdown"] = await _breakdown(mesh, nl, count, failures)
        await scratch.stop_daemons()
        result["daemon_log_problems"] = scratch.log_problems()
        await scratch.aclose()
        if with_timeline:
            count = min(n, BREAKDOWN_N)
            say(f"  timeline: {count} sequential requests, daemons timestamping each hop")
            result["timeline"] = await _timeline(count, failures, options.keep_logs)
    except BaseException as exc:
        failures.add("benchmark aborted", exc)
        raise
    finally:
        await nl.close()
        await scratch.aclose()
        result["failures"] = failures.count
        result["failure_examples"] = failures.first
        result["wall_s"] = round(time.perf_counter() - started, 1)
    _ratios(result)
    return result


def _ratios(result: dict[str, Any]) -> None:
    ratios: dict[str, Any] = {}
    bars: list[Bar] = []
    for mode in ("sequential", "concurrent"):
        ours, floor = result.get(mode), result.get(f"floor_{mode}")
        if not ours or not floor:
            continue
        fp50 = floor["setup_ms"]["p50"]
        r = {
            "request_p50": ratio(ours["request_ms"].get("p50"), fp50),
            "request_verified_p50": ratio(ours["request_verified_ms"].get("p50"), fp50),
            "close_p50": ratio(ours["close_ms"].get("p50"), floor["delete_ms"]["p50"]),
            "throughput": ratio(floor["setups_per_s"], ours["setups_per_s"]),
        }
        ratios[mode] = r
        bars.append(Bar(f"{mode} request p50 / floor p50", r["request_p50"], BAR))
    result["ratios"] = ratios
    result["bars"] = [b.as_dict() for b in bars]


def table(result: dict[str, Any]) -> str:
    """The result as a human table."""
    n, c = result.get("n"), result.get("concurrency")
    lines = [f"local_setup: {n} local connections, one at a time and {c} at a time "
             f"(latency per connection, ms)"]
    head = (f"{'phase':<11} {'metric':<17} {'p50':>8} {'p95':>8} {'p99':>8} {'max':>8} "
            f"| {'floor p50':>9} {'ratio':>6}")
    lines += [head, "-" * len(head)]
    for mode in ("sequential", "concurrent"):
        ours = result.get(mode)
        if not ours:
            continue
        floor = result.get(f"floor_{mode}") or {}
        r = (result.get("ratios") or {}).get(mode) or {}
        rows = [("request", ours["request_ms"], floor.get("setup_ms"), r.get("request_p50")),
                ("request+verified", ours["request_verified_ms"], floor.get("setup_ms"),
                 r.get("request_verified_p50")),
                ("close", ours["close_ms"], floor.get("delete_ms"), r.get("close_p50"))]
        for metric, s, f, rr in rows:
            lines.append(f"{mode:<11} {metric:<17} {fmt(s.get('p50'))} {fmt(s.get('p95'))} "
                         f"{fmt(s.get('p99'))} {fmt(s.get('max'))} | "
                         f"{fmt((f or {}).get('p50'), 9)} {fmt(rr, 6)}")
        lines.append(f"{'':<11} {'setups/s':<17} {fmt(ours['setups_per_s'])}"
                     f"{'':>27} | {fmt(floor.get('setups_per_s'), 9, 1)}")
    for mode in ("sequential", "concurrent"):
        ours = result.get(mode)
        if ours:
            cpu = ", ".join(f"{k} {v['total']:.2f}" for k, v in ours["cpu_ms_per_setup"].items())
            lines.append(f"CPU ms per setup ({mode}): {cpu}")
    bd = result.get("breakdown")
    if bd:
        p = {k: v.get("p50") for k, v in bd.items() if isinstance(v, dict)}
        lines.append(
            "breakdown, sequential p50 over warm channels (ms): "
            f"empty gRPC call {fmt(p.get('grpc_empty_call_ms'), 0)}, "
            f"Request to NSE {fmt(p.get('nse_request_ms'), 0)}, "
            f"to forwarder (+NSE, netlink) {fmt(p.get('forwarder_request_ms'), 0)}, "
            f"to manager (+all) {fmt(p.get('manager_request_ms'), 0)}; "
            f"Close: NSE {fmt(p.get('nse_close_ms'), 0)}, "
            f"forwarder {fmt(p.get('forwarder_close_ms'), 0)}, "
            f"manager {fmt(p.get('manager_close_ms'), 0)}")
    tl = result.get("timeline")
    if tl and "legs_p50_ms" in tl:
        lines.append(f"timeline of one Request, sequential, p50 per leg (ms; {tl['n']} requests, "
                     f"total p50 {fmt(tl['total_ms'].get('p50'), 0)}):")
        for leg, value in tl["legs_p50_ms"].items():
            lines.append(f"  {leg:<52} {fmt(value, 7, 3)}")
        lines.append("  = " + ", ".join(f"{k} {fmt(v, 0)}" for k, v in tl["groups_p50_ms"].items()))
    elif tl:
        lines.append(f"timeline: {tl.get('error')}")
    if result.get("warmup_ms"):
        lines.append(f"warm-up (first requests, not counted): {result['warmup_ms']} ms")
    lines += outcome_lines(result)
    return "\n".join(lines)


def headline(result: dict[str, Any]) -> dict[str, float | None]:
    """The figures compared across repeated runs (see :class:`bench.common.Bench`)."""
    out: dict[str, float | None] = {}
    for mode, short in (("sequential", "seq"), ("concurrent", "conc")):
        ours, floor = result.get(mode), result.get(f"floor_{mode}")
        r = (result.get("ratios") or {}).get(mode) or {}
        if ours:
            out[f"{short} request p50 ms"] = ours["request_ms"].get("p50")
            out[f"{short} request+verified p50 ms"] = ours["request_verified_ms"].get("p50")
            out[f"{short} close p50 ms"] = ours["close_ms"].get("p50")
            out[f"{short} setups/s"] = ours["setups_per_s"]
        if floor:
            out[f"{short} floor setup p50 ms"] = floor["setup_ms"]["p50"]
            out[f"{short} floor setups/s"] = floor["setups_per_s"]
        if r:
            out[f"{short} ratio request p50 (bar {BAR:g})"] = r.get("request_p50")
    for group, value in ((result.get("timeline") or {}).get("groups_p50_ms") or {}).items():
        out[f"timeline {group} ms"] = value
    return out


BENCH = Bench(name=NAME, doc=__doc__.split("\n\n")[0], run=run, table=table, headline=headline)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=None, help=f"connections per phase ({DEFAULT_N})")
    parser.add_argument("--concurrency", type=int, default=None,
                        help=f"in flight in the concurrent phase ({DEFAULT_CONCURRENCY})")
    parser.add_argument("--quick", action="store_true", help=f"n={QUICK_N}, concurrency={QUICK_CONCURRENCY}")
    parser.add_argument("--no-floor", action="store_true", help="skip the raw netlink floor")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the per-hop breakdown")
    parser.add_argument("--no-timeline", action="store_true", help="skip the per-leg timeline")
    parser.add_argument("--keep-logs", action="store_true", help="keep the daemons' logs")
    parser.add_argument("--json", metavar="FILE", help="also write the result to FILE")
    parser.add_argument("--repeat", type=int, default=1, metavar="K", help="runs (best-of, spread)")
    args = parser.parse_args(argv)
    extra = {"floor": "0" if args.no_floor else "1", "breakdown": "0" if args.no_breakdown else "1",
             "timeline": "0" if args.no_timeline else "1"}
    options = Options(quick=args.quick, n=args.n, concurrency=args.concurrency,
                      keep_logs=args.keep_logs, extra=extra)
    from bench.run import run_benches  # the same signal handling and output as bench.run

    return run_benches([BENCH], options, json_path=args.json, repeat=max(1, args.repeat))


if __name__ == "__main__":
    sys.exit(main())

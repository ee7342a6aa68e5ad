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

Phases: the **first requests** of the freshly started mesh, one at a time (``WARMUP``, not
counted in the phases after; the first waits until the endpoint's registration is in the
registry, so that it is one Request and not a retry); ``n`` connections one at a time, then
``n`` more ``concurrency`` at a time (all set up, then all closed, like the floor). In the same
run, :func:`bench.netlink_floor.measure_floor` does the same kernel work with the same ``n`` and
concurrency. Then ``fresh`` more **freshly started single nodes** (registry, manager, forwarder,
NSE started anew), each timing its first Request only (the main mesh's namespaces are deleted
only at the end, so the kernel's destroying them in the background does not fall on these).
Bars, against the floor's sequential p50 of the same run: request p50 ≤ 3x (sequential and
concurrent); the first Request of a freshly started single node (the slowest of the main mesh's
and the fresh ones') ≤ 5x; the slowest of the ``n`` sequential requests ≤ 10x. A short
**breakdown** then times the hops separately over warm channels: an empty gRPC call (health
check), a Request straight to the NSE, straight to the forwarder (as its manager would send it,
the endpoint named in the connection), and through the manager. Last, a
**timeline**: a fresh mesh whose daemons timestamp each hop (an instrumentation loaded as
``sitecustomize`` into that mesh only, see :data:`_TIMELINE_SITE`) splits one Request into its
gRPC legs, chains and netlink work; its first Request is reported, not judged.

    python -m bench.local_setup [--n 200] [--concurrency 20] [--quick] [--repeat K] [--fresh K]
                                [--no-floor] [--no-breakdown] [--no-timeline] [--json F]

(``python -m bench.run --only local_setup --set floor=0 ...`` is the same.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from grpc_health.v1 import health_pb2, health_pb2_grpc

import nsm
from bench.common import (
    IFNAME,
    Bar,
    Bench,
    Failures,
    Options,
    Scratch,
    begin,
    fmt,
    ms,
    new_clients,
    outcome_lines,
    phase,
    ratio,
    say,
    settle,
    setup_headline,
    setup_ratios,
    setup_table,
    start_identities,
    summarize,
    summary,
    timed,
    warm_one,
)
from bench.netlink_floor import measure_floor
from nsm.api.connection_pb2 import Connection
from nsm.api.registry_pb2 import NetworkServiceEndpoint
from nsm.client.sdk import Client, close_once, new_request, request_once
from nsm.elements.tokens import HopTokens
from nsm.errors import NsmError
from nsm.kernel.netlink import Netlink
from nsm.mechanisms import kernel, netns_url
from nsm.registry.client import RegistryClient
from nsm.security.ids import FORWARDER, MANAGER
from nsm.security.netns import NetnsProof
from nsm.security.policy import Policies
from nsm.transport import Channels, dial

NAME = "local_setup"
DEFAULT_N = 200
DEFAULT_CONCURRENCY = 20
QUICK_N = 20
QUICK_CONCURRENCY = 5
#: The bars, against the floor's sequential p50 measured in the same run: our request p50
#: (sequential and concurrent); the first Request of a freshly started single node; the slowest
#: of the ``n`` sequential requests.
BAR = 3.0
BAR_FIRST = 5.0
BAR_MAX = 10.0
SERVICE = "bench-ip"
NSE_NAME = "bench-nse"
#: The node the single-node mesh's manager, forwarder and NSE say they are on.
NODE = "bench-node"
CIDR = "172.30.0.0/16"
WARMUP = 3
#: Freshly started single nodes timed for their first Request (besides the main mesh and the
#: timeline's).
DEFAULT_FRESH, QUICK_FRESH = 3, 1
#: Connections per breakdown measurement (at most ``n``).
BREAKDOWN_N = 100


@dataclass
class Mesh:
    scratch: Scratch
    registry_url: str
    manager_url: str
    forwarder_url: str
    nse_url: str
    nse_netns: str
    pids: dict[str, int | None]


async def start_mesh(scratch: Scratch, env: dict[str, str] | None = None) -> Mesh:
    nse_ns = scratch.netns("nse")
    reg, mgr, fwd, nse = (scratch.url(n) for n in ("registry", "manager", "forwarder", "nse"))
    await scratch.daemon("registry", ["registry", "--listen", reg], reg, env)
    await scratch.daemon("manager", ["manager", "--name", NODE, "--listen", mgr,
                                     "--registry", reg], mgr, env)
    await scratch.daemon("forwarder", ["forwarder", "--name", "bench-fwd", "--node", NODE,
                                       "--listen", fwd, "--manager", mgr, "--registry", reg], fwd, env)
    await scratch.daemon("nse", ["nse", "--name", NSE_NAME, "--service", SERVICE, "--cidr", CIDR,
                                 "--netns", nse_ns, "--listen", nse, "--registry", reg,
                                 "--node", NODE], nse, env)
    pids = {d.name: d.pid for d in scratch.daemons}
    return Mesh(scratch, reg, mgr, fwd, nse, nse_ns, pids)


async def registered(mesh: Mesh, wait: float = 15.0) -> None:
    """Wait until the registry has the endpoint (asked from here, on a channel of our own), and
    a little more for the manager's registry watch to bring it, so that the mesh's first Request
    is one Request, not a retry after NOT_FOUND."""
    channel = dial(mesh.registry_url, mesh.scratch.security)
    try:
        registry = RegistryClient(channel, timeout=5.0)
        deadline = time.monotonic() + wait
        while not await registry.find_nse(NetworkServiceEndpoint(name=NSE_NAME)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{NSE_NAME} not registered after {wait} s")
            await asyncio.sleep(0.05)
    finally:
        await channel.close()
    await asyncio.sleep(0.1)


async def first_requests(mesh: Mesh, nl: Netlink, count: int, failures: Failures,
                          label: str) -> list[float]:
    """The mesh's first ``count`` Requests (ms), one at a time, each from a new namespace and a
    new ``Client``, verified and closed; they warm the mesh up for what follows."""
    await registered(mesh)
    out = []
    namespaces = mesh.scratch.netns_many(f"{label}w", count)
    await start_identities(mesh.scratch.pod_identity, namespaces)
    for i, ns in enumerate(namespaces):

        def make(i: int = i, ns: str = ns) -> Client:
            return Client(heal=None, manager_url=mesh.manager_url, service=SERVICE, netns=ns, ifname=IFNAME,
                          name=f"bench-{label}-first-{i}", security=mesh.scratch.pod_identity(ns),
                          manager_id=mesh.scratch.manager_id(NODE))

        out.append(await warm_one(make, nl, ns, failures, f"{label} first request {i}", wait=15.0))
    return out


async def _fresh_node(k: int, failures: Failures, keep_logs: bool, secure: bool = True) -> float:
    """Start a single node anew (registry, manager, forwarder, NSE) and time its first Request."""
    scratch = Scratch(f"fresh{k}", keep_logs=keep_logs, secure=secure)
    nl = Netlink()
    try:
        mesh = await start_mesh(scratch)
        (first,) = await first_requests(mesh, nl, 1, failures, f"fresh{k}")
        await scratch.stop_daemons()
        problems = scratch.log_problems()
        if problems["count"]:
            failures.add(f"fresh node {k}", RuntimeError(f"daemon log problems: {problems}"))
        return first
    finally:
        await nl.close()
        await scratch.aclose()


async def _breakdown(mesh: Mesh, nl: Netlink, count: int, failures: Failures) -> dict[str, Any]:
    """Sequential p50s of each hop over warm channels (see the module docstring). When secure,
    each hop is called as its real caller would (the NSE by the node's forwarder, the forwarder
    by its manager, the manager by a pod), its token signed for the hop and the namespaces it
    names proven by a listener of the identity the path names (set up before the timing)."""
    scratch = mesh.scratch
    callers = {"nse": scratch.role_identity(NODE, FORWARDER), "fwd": scratch.role_identity(NODE, MANAGER)}
    channels = {what: Channels(security=security) for what, security in callers.items()}
    urls = {"nse": mesh.nse_url, "fwd": mesh.forwarder_url, "mgr": mesh.manager_url}
    out: dict[str, Any] = {"n": count}
    try:
        for security in callers.values():
            await security.start()
        health = health_pb2_grpc.HealthStub(channels["nse"].get(mesh.nse_url))
        await asyncio.wait_for(channels["nse"].get(mesh.nse_url).channel_ready(), 10)

        async def empty(i: int) -> None:
            await health.Check(health_pb2.HealthCheckRequest(), timeout=5)

        out["grpc_empty_call_ms"] = await timed(count, empty)

        def request_for(ns: str) -> Any:
            return new_request(service=SERVICE, name="bench-direct",
                               mechanisms=[kernel(IFNAME, netns_url(ns))], conn_id=str(uuid.uuid4()))

        async def direct(namespaces: Sequence[str] | None, endpoint: str,
                         what: str) -> tuple[dict[str, float], dict[str, float]]:
            own = scratch.netns_many(f"bd{what}", count) if namespaces is None else namespaces
            conns: list[Connection] = []
            async with contextlib.AsyncExitStack() as stack:
                hop = channels.get(what)
                if hop is None:  # the manager: each request from a pod of its own
                    hop = channels[what] = Channels(security=scratch.pod_identity(own[0]))
                await hop.security.start()
                channel = hop.get(urls[what])
                await asyncio.wait_for(channel.channel_ready(), 10)
                tokens = HopTokens(hop, Policies())
                if what != "nse":  # the forwarder proves the client's namespace for segment 0
                    for ns in dict.fromkeys(own):
                        await stack.enter_async_context(NetnsProof.listen(hop.security, ns))

                async def req(i: int) -> None:
                    try:
                        request = request_for(own[i])
                        # A forwarder serves the endpoint its manager chose: named in the connection.
                        request.connection.network_service_endpoint_name = endpoint
                        metadata = await tokens.sign(urls[what], request.connection)
                        conn = await request_once(channel, request, metadata=metadata)
                        await tokens.check(urls[what], conn, 0)
                        conns.append(conn)
                    except NsmError as exc:
                        failures.add(f"breakdown {what} request {i}", exc)

                async def close(i: int) -> None:
                    if i < len(conns):
                        try:
                            metadata = await tokens.sign(urls[what], conns[i])
                            await close_once(channel, conns[i], metadata=metadata)
                        except NsmError as exc:
                            failures.add(f"breakdown {what} close {i}", exc)

                try:
                    return await timed(count, req), await timed(count, close)
                finally:
                    for ns in own:
                        nl.forget(ns)

        # The NSE programs nothing: any existing namespace will do for its mechanism.
        same = [mesh.nse_netns] * count
        out["nse_request_ms"], out["nse_close_ms"] = await direct(same, "", "nse")
        out["forwarder_request_ms"], out["forwarder_close_ms"] = await direct(None, NSE_NAME, "fwd")
        out["manager_request_ms"], out["manager_close_ms"] = await direct(None, "", "mgr")
    finally:
        for hop in channels.values():
            await hop.close()
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

#: Where the nsm this benchmark runs lives: the timeline's daemons import it from there, since
#: their ``sitecustomize`` imports it before ``-m`` puts the working directory on the path (and
#: an installed copy may be another checkout's).
_NSM_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(nsm.__file__)))

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


async def _timeline(count: int, failures: Failures, keep_logs: bool, secure: bool = True
                    ) -> dict[str, Any]:
    """A fresh mesh whose daemons timestamp each hop (see :data:`_TIMELINE_SITE`); ``count``
    sequential requests; the p50 of each leg. Its own mesh, so the instrumentation never
    touches the main measurements. Its first requests are reported too (a fresh node's)."""
    scratch = Scratch("timeline", keep_logs=keep_logs, secure=secure)
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
               "PYTHONPATH": ":".join(p for p in (str(site), _NSM_ROOT, path) if p)}
        namespaces = scratch.netns_many("t", count)
        mesh = await start_mesh(scratch, env)
        first = await first_requests(mesh, nl, WARMUP, failures, "timeline")
        await start_identities(scratch.pod_identity, namespaces)
        clients = []
        try:
            for i, ns in enumerate(namespaces):
                client = Client(heal=None, manager_url=mesh.manager_url, service=SERVICE, netns=ns,
                                ifname=IFNAME, name=f"bench-tl-{i}", security=scratch.pod_identity(ns),
                                manager_id=scratch.manager_id(NODE))
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
            legs[name].append(ms(e[a], e[b]))
        total.append(ms(t0, t1))
    if not total:
        return {"n": count, "error": "no timeline events (instrumentation out of date?)",
                "first_requests_ms": first, "daemon_log_problems": problems}
    p50 = {name: round(statistics.median(v), 3) for name, v in legs.items()}
    grpc_legs = sum(v for k, v in p50.items() if k.startswith("gRPC"))
    netlink = p50["forwarder after the NSE (netlink: veth, addresses)"]
    chains = sum(v for k, v in p50.items() if not k.startswith("gRPC")) - netlink
    return {"n": len(total), "first_requests_ms": first, "total_ms": summarize(total),
            "legs_p50_ms": p50,
            "groups_p50_ms": {"gRPC (6 one-way legs)": round(grpc_legs, 3),
                              "netlink programming (forwarder)": round(netlink, 3),
                              "chains (3 daemons)": round(chains, 3)},
            "daemon_log_problems": problems}


async def run(options: Options) -> dict[str, Any]:
    """The whole benchmark (see the module docstring); one result dict."""
    n = options.n or (QUICK_N if options.quick else DEFAULT_N)
    concurrency = options.concurrency or (QUICK_CONCURRENCY if options.quick else DEFAULT_CONCURRENCY)
    with_floor, with_breakdown, with_timeline = (options.flag(k) for k in ("floor", "breakdown",
                                                                            "timeline"))
    fresh = int(options.extra.get("fresh") or (QUICK_FRESH if options.quick else DEFAULT_FRESH))
    secure = options.flag("secure")
    failures, result, started = begin(NAME, "network namespaces, veth", n=n,
                                      concurrency=concurrency, secure=secure)
    scratch = Scratch("local", keep_logs=options.keep_logs, secure=secure)
    nl = Netlink()
    with failures.recording(result, started):
        try:
            t0 = time.perf_counter()
            seq_ns = scratch.netns_many("s", n)
            conc_ns = scratch.netns_many("c", n)
            say(f"local_setup: {2 * n} client namespaces in {time.perf_counter() - t0:.1f} s; "
                "starting registry, manager, forwarder, nse")
            mesh = await start_mesh(scratch)
            result["pids"] = mesh.pids
            result["warmup_ms"] = [round(v, 2) for v in
                                   await first_requests(mesh, nl, WARMUP, failures, "main")]
            say(f"  first requests of the mesh (ms): {result['warmup_ms']}")

            await start_identities(scratch.pod_identity, seq_ns + conc_ns)
            say(f"  ours: {n} connections, one at a time")
            result["sequential"] = await phase(nl, new_clients(mesh.manager_url, SERVICE, seq_ns, "seq",
                                                               scratch.pod_identity,
                                                               scratch.manager_id(NODE)),
                                               seq_ns, 1, failures, "seq", mesh.pids)
            await settle(options.settle)
            if with_floor:
                say(f"  floor: {n} connections, one at a time")
                result["floor_sequential"] = await measure_floor(n, 1)
                await settle(options.settle)
            say(f"  ours: {n} connections, {concurrency} at a time")
            result["concurrent"] = await phase(nl, new_clients(mesh.manager_url, SERVICE, conc_ns, "conc",
                                                               scratch.pod_identity,
                                                               scratch.manager_id(NODE)),
                                               conc_ns, concurrency, failures, "conc", mesh.pids)
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
            # The main mesh's namespaces are deleted at the end, not here: the kernel destroys
            # namespaces in the background for seconds after, which the fresh nodes' first
            # Requests would pay (27 against 32 ms median, secure) and no floor pays.
            say(f"  {fresh} freshly started single nodes, the first Request of each")
            result["fresh_nodes_first_ms"] = [
                round(await _fresh_node(k, failures, options.keep_logs, secure), 2) for k in range(fresh)]
            if with_timeline:
                count = min(n, BREAKDOWN_N)
                say(f"  timeline: {count} sequential requests, daemons timestamping each hop")
                result["timeline"] = await _timeline(count, failures, options.keep_logs, secure)
        finally:
            await nl.close()
            if scratch.namespaces:
                say(f"  the main mesh's {len(scratch.namespaces)} namespaces deleted")
            await scratch.aclose()
    result["first_requests"] = _first_of_fresh_nodes(result)
    _ratios(result)
    return result


def _first_of_fresh_nodes(result: dict[str, Any]) -> dict[str, Any]:
    """The first Request of every freshly started single node of the run (ms): the main mesh's
    and the ``fresh`` ones'; the slowest is judged. The timeline mesh's is reported beside them,
    not judged (its daemons are instrumented)."""
    each: dict[str, float] = {}
    if result.get("warmup_ms"):
        each["main mesh"] = result["warmup_ms"][0]
    for k, v in enumerate(result.get("fresh_nodes_first_ms") or []):
        each[f"fresh node {k + 1}"] = v
    timeline_first = (result.get("timeline") or {}).get("first_requests_ms")
    return {"each_ms": each, "max_ms": max(each.values(), default=None),
            "timeline_mesh_ms": round(timeline_first[0], 2) if timeline_first else None}


def _ratios(result: dict[str, Any]) -> None:
    ratios, bars = setup_ratios(result, BAR)
    seq, floor = result.get("sequential"), result.get("floor_sequential")
    if seq and floor:
        fp50 = floor["setup_ms"].get("p50")
        r = ratios["sequential"]
        r["request_p99"] = ratio(seq["request_ms"].get("p99"), fp50)
        r["request_max"] = ratio(seq["request_ms"].get("max"), fp50)
        r["first_request_max"] = ratio((result.get("first_requests") or {}).get("max_ms"), fp50)
        bars.append(Bar("first request of a fresh single node (slowest) / floor p50",
                        r["first_request_max"], BAR_FIRST))
        bars.append(Bar(f"sequential request max (of {seq['request_ms'].get('n')}) / floor p50",
                        r["request_max"], BAR_MAX))
    result["ratios"] = ratios
    result["bars"] = [b.as_dict() for b in bars]


def table(result: dict[str, Any]) -> str:
    """The result as a human table."""
    n, c = result.get("n"), result.get("concurrency")
    lines = [f"local_setup: {n} local connections, one at a time and {c} at a time "
             f"(latency per connection, ms)"]
    lines += setup_table(result)
    r = (result.get("ratios") or {}).get("sequential") or {}
    if r:
        lines.append(f"sequential request p99 {fmt(r.get('request_p99'), 0)} x, max "
                     f"{fmt(r.get('request_max'), 0)} x the floor's p50")
    first = result.get("first_requests") or {}
    if first.get("each_ms"):
        each = ", ".join(f"{k} {v:.1f}" for k, v in first["each_ms"].items())
        lines.append(f"first Request of a freshly started single node (ms): {each}; slowest "
                     f"{fmt(first.get('max_ms'), 0, 1)} = {fmt(r.get('first_request_max'), 0)} x "
                     f"the floor's p50 (timeline mesh, instrumented: "
                     f"{fmt(first.get('timeline_mesh_ms'), 0, 1)})")
    if result.get("warmup_ms"):
        lines.append(f"first requests of the main mesh, one by one (ms): {result['warmup_ms']}")
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
    lines += outcome_lines(result)
    return "\n".join(lines)


def headline(result: dict[str, Any]) -> dict[str, float | None]:
    """The figures compared across repeated runs (see :class:`bench.common.Bench`)."""
    out = setup_headline(result, BAR)
    r = (result.get("ratios") or {}).get("sequential") or {}
    out[f"seq ratio request max (bar {BAR_MAX:g})"] = r.get("request_max")
    out["first request of a fresh node, slowest, ms"] = (result.get("first_requests") or {}).get("max_ms")
    out[f"ratio first request of a fresh node (bar {BAR_FIRST:g})"] = r.get("first_request_max")
    for group, value in ((result.get("timeline") or {}).get("groups_p50_ms") or {}).items():
        out[f"timeline {group} ms"] = value
    return out


BENCH = Bench(name=NAME, doc=summary(__doc__), run=run, table=table, headline=headline)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=summary(__doc__))
    parser.add_argument("--n", type=int, default=None, help=f"connections per phase ({DEFAULT_N})")
    parser.add_argument("--concurrency", type=int, default=None,
                        help=f"in flight in the concurrent phase ({DEFAULT_CONCURRENCY})")
    parser.add_argument("--quick", action="store_true", help=f"n={QUICK_N}, concurrency={QUICK_CONCURRENCY}")
    parser.add_argument("--fresh", type=int, default=None, metavar="K",
                        help=f"freshly started single nodes timed for their first Request "
                             f"({DEFAULT_FRESH}; quick {QUICK_FRESH})")
    parser.add_argument("--no-floor", action="store_true", help="skip the raw netlink floor")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the per-hop breakdown")
    parser.add_argument("--no-timeline", action="store_true", help="skip the per-leg timeline")
    parser.add_argument("--keep-logs", action="store_true", help="keep the daemons' logs")
    parser.add_argument("--json", metavar="FILE", help="also write the result to FILE")
    parser.add_argument("--repeat", type=int, default=1, metavar="K", help="runs (best-of, spread)")
    args = parser.parse_args(argv)
    extra = {"floor": "0" if args.no_floor else "1", "breakdown": "0" if args.no_breakdown else "1",
             "timeline": "0" if args.no_timeline else "1"}
    if args.fresh is not None:
        extra["fresh"] = str(args.fresh)
    options = Options(quick=args.quick, n=args.n, concurrency=args.concurrency,
                      keep_logs=args.keep_logs, extra=extra)
    from bench.run import run_benches  # the same signal handling and output as bench.run

    return run_benches([BENCH], options, json_path=args.json, repeat=max(1, args.repeat))


if __name__ == "__main__":
    sys.exit(main())

"""What security costs: local and remote connection setup, secure (the default: mTLS on every
hop, signed path tokens, authorization, namespace proofs) against ``--insecure``, in the same
run, interleaved.

Two meshes of each kind run side by side for the whole benchmark, one secure and one with
every daemon ``--insecure``, built the same way:

- **local**: the single-node mesh of :mod:`bench.local_setup` (registry, manager, forwarder and
  NSE as real processes on unix sockets; clients in namespaces of their own);
- **remote**: the two-node cluster of :mod:`bench.remote_setup` (a lab each; client pods on
  node1, the NSE on node2, IP over VXLAN; 6 path segments).

And on the local meshes, **agent**: one long-lived client holding all its connections, as the
CNI node agent does for the pods of its node (one channel and one identity, the node's
``cni-agent`` SVID; a proof listener of its own in each pod's namespace): its channel's
handshake is paid once (in a warm-up, not counted), so what is left per connection is the
tokens, the authorization and the namespace proofs. Reported beside the bar, not judged.

Clients are SDK ``Client``\\ s in this process, a new one per connection (its Request connects
its channel, as a new pod would); a secure client has its pod's SVID (issued beforehand: a pod
gets its SVID before it runs) and proves its namespace to the forwarder. After a warm-up of
each mesh (not counted), ``n`` connections per mesh one at a time, **interleaved**: secure,
insecure, insecure, secure, ... (the order alternates, so that neither side always runs right
after the other); each is requested (timed), checked from here (not timed), closed (timed).
So both sides see the same machine state, which on a shared machine matters more than
anything else. Reported per side: request and close p50/p90/max (ms), CPU per setup of each
daemon, and the ratio secure / insecure; the noise: the p50 ratio of each quarter of the run.

Bar (issue 9): the local request p50, secure / insecure, ≤ 1.25.

    python -m bench.run --only security [--n N] [--repeat K] [--set local=0|remote=0]
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench import local_setup, remote_setup
from bench.common import (
    IFNAME,
    TUNNEL_MTU,
    Bar,
    Bench,
    BenchLab,
    CpuMeter,
    Failures,
    Options,
    PodIdentity,
    Requester,
    Scratch,
    begin,
    fmt,
    harness_gc_paused,
    new_clients,
    outcome_lines,
    percentile,
    ratio,
    say,
    start_identities,
    summary,
    timed_close,
    timed_request,
)
from nsm.api.connection_pb2 import Connection
from nsm.client.chain import Connections, new_request
from nsm.errors import NsmError
from nsm.kernel.netlink import Netlink
from nsm.mechanisms import kernel, netns_url
from nsm.security.ids import CNI_AGENT
from nsm.security.tls import Security

NAME = "security"
DEFAULT_LOCAL_N, DEFAULT_REMOTE_N = 100, 60
QUICK_LOCAL_N, QUICK_REMOTE_N = 6, 4
#: The bar: secure local request p50 at most this times the insecure one, same run.
BAR = 1.25
SIDES = ("secure", "insecure")
#: The comparisons, in the order reported.
PARTS = ("local", "agent", "remote")
#: The quarters of a run whose p50 ratios show the noise.
BLOCKS = 4


def stats(values: Sequence[float]) -> dict[str, float]:
    """``n``, ``p50``, ``p90``, ``max`` and ``mean`` of latencies (ms)."""
    ordered = sorted(values)
    if not ordered:
        return {"n": 0}
    return {"n": len(ordered), "p50": round(percentile(ordered, 50), 3),
            "p90": round(percentile(ordered, 90), 3), "max": round(ordered[-1], 3),
            "mean": round(sum(ordered) / len(ordered), 3)}


class _AgentLink:
    """One connection of a long-lived client that holds many (:class:`Connections`, as the CNI
    agent does), with the ``request``/``close``/``connection`` of a ``Client`` that the timing
    helpers use."""

    def __init__(self, conns: Connections, netns: str) -> None:
        self.conns = conns
        self.connection: Connection | None = None
        self._request = new_request(service=local_setup.SERVICE, name=conns.name,
                                    mechanisms=[kernel(IFNAME, netns_url(netns))])

    async def request(self) -> Connection:
        self.connection = await self.conns.request(self._request)
        return self.connection

    async def close(self, *, raise_errors: bool = False) -> None:
        if self.connection is None:
            return
        conn_id, self.connection = self.connection.id, None
        try:
            await self.conns.close(conn_id)
        except NsmError:
            if raise_errors:
                raise


@dataclass
class Side:
    """One mesh of the comparison: how to make its clients, its daemons, its timings."""

    name: str
    make: Callable[[int], Requester]
    namespaces: Sequence[str]
    pids: dict[str, int | None]
    request_ms: list[float] = field(default_factory=list)
    close_ms: list[float] = field(default_factory=list)


async def interleaved(sides: Sequence[Side], nl: Netlink, failures: Failures, label: str,
                      mtu: int | None = None) -> dict[str, Any]:
    """``n`` connections per side, one at a time, alternating the sides (the order reversed
    every other round); per side the request and close statistics and CPU per setup."""
    n = min(len(s.namespaces) for s in sides)
    meters = {s.name: CpuMeter(s.pids) for s in sides}
    own = CpuMeter({"bench (both sides' clients and checks)": None})
    for meter in (*meters.values(), own):
        meter.start()
    t0 = time.perf_counter()
    with harness_gc_paused():
        for i in range(n):
            for side in (sides if i % 2 == 0 else list(reversed(sides))):
                client, ns = side.make(i), side.namespaces[i]
                what = f"{label} {side.name} {i}"
                try:
                    await timed_request(client, nl, ns, failures, what, side.request_ms, mtu=mtu)
                    await timed_close(client, nl, ns, failures, what, side.close_ms)
                finally:
                    await asyncio.shield(client.close())
    wall = time.perf_counter() - t0
    out: dict[str, Any] = {"n": n, "wall_s": round(wall, 2)}
    for side in sides:
        out[side.name] = {"request_ms": stats(side.request_ms), "close_ms": stats(side.close_ms),
                          "cpu_ms_per_setup_and_close": meters[side.name].stop(n)}
    out["bench_cpu_ms_per_pair"] = own.stop(n)
    secure, insecure = (out[name] for name in SIDES)
    out["ratio"] = {f"{metric} {q}": ratio(secure[f"{metric}_ms"].get(q), insecure[f"{metric}_ms"].get(q))
                    for metric in ("request", "close") for q in ("p50", "p90", "max")}
    out["ratio_request_p50_by_quarter"] = _block_ratios(*(s.request_ms for s in sides))
    return out


def _block_ratios(secure: Sequence[float], insecure: Sequence[float]) -> list[float | None]:
    """The request p50 ratio in each of :data:`BLOCKS` consecutive parts of the run (both
    sides' samples of the same rounds): how much the ratio moves within one run."""
    size = max(1, min(len(secure), len(insecure)) // BLOCKS)
    out = []
    for b in range(BLOCKS):
        s, i = secure[b * size:(b + 1) * size], insecure[b * size:(b + 1) * size]
        if s and i:
            out.append(ratio(percentile(sorted(s), 50), percentile(sorted(i), 50)))
    return out


async def _local(n: int, nl: Netlink, failures: Failures, keep_logs: bool) -> dict[str, Any]:
    """The local comparison: a secure and an insecure single-node mesh side by side."""
    async with contextlib.AsyncExitStack() as stack:
        sides, scratches, urls = [], [], []
        for name in SIDES:
            scratch = Scratch(f"{name[:3]}", keep_logs=keep_logs, secure=name == "secure")
            stack.push_async_callback(scratch.aclose)
            scratches.append(scratch)
            namespaces = scratch.netns_many("s", n)
            mesh = await local_setup.start_mesh(scratch)
            urls.append(mesh.manager_url)
            warm = await local_setup.first_requests(mesh, nl, local_setup.WARMUP, failures, name[:3])
            say(f"  local {name}: first requests (ms, not counted) {[round(v, 1) for v in warm]}")
            await start_identities(scratch.pod_identity, namespaces)
            sides.append(Side(name, new_clients(mesh.manager_url, local_setup.SERVICE, namespaces,
                                                f"l{name[:3]}", scratch.pod_identity,
                                                scratch.manager_id(local_setup.NODE)),
                              namespaces, mesh.pids))
        say(f"  local: {n} connections per side, one at a time, interleaved")
        out = await interleaved(sides, nl, failures, "local")
        agents = []
        for name, scratch, side, url in zip(SIDES, scratches, sides, urls, strict=True):
            conns = Connections(manager_url=url, name=f"bench-agent-{name[:3]}",
                                heal=None, security=scratch.role_identity(local_setup.NODE, CNI_AGENT),
                                manager_id=scratch.manager_id(local_setup.NODE))
            stack.push_async_callback(conns.shutdown)
            warm = scratch.netns(f"{name[:3]}agentwarm")
            link = _AgentLink(conns, warm)
            await timed_request(link, nl, warm, failures, f"agent {name} warm-up", [])
            await timed_close(link, nl, warm, failures, f"agent {name} warm-up", [])
            agents.append(Side(name, lambda i, c=conns, ns=side.namespaces: _AgentLink(c, ns[i]),
                               side.namespaces, side.pids))
        say(f"  agent: {n} connections per side through one long-lived client, interleaved")
        agent = await interleaved(agents, nl, failures, "agent")
        for name, scratch in zip(SIDES, scratches, strict=True):
            await scratch.stop_daemons()
            out[name]["daemon_log_problems"] = scratch.log_problems()
        return {"local": out, "agent": agent}


def _constant(security: Security) -> PodIdentity:
    return lambda netns: security


async def _remote(n: int, nl: Netlink, failures: Failures) -> dict[str, Any]:
    """The remote comparison: a secure and an insecure two-node lab side by side."""
    async with contextlib.AsyncExitStack() as stack:
        sides, labs = [], []
        for name in SIDES:
            lab = await stack.enter_async_context(
                BenchLab(remote_setup.topology(n, pod_prefixes=("s",)), secure=name == "secure",
                         tag=name[:3]))
            labs.append(lab)
            say(f"  remote {name}: lab with {n + remote_setup.WARMUP} client pods up in "
                f"{lab.build_seconds:.1f} s")
            warm = await remote_setup.warmup(lab, nl, [f"warm{i}" for i in range(remote_setup.WARMUP)],
                                             remote_setup.SERVICE, failures)
            say(f"  remote {name}: warm-up requests (ms, not counted) {[round(v, 1) for v in warm]}")
            namespaces = [lab.pod(f"s{i}").netns for i in range(n)]
            # One insecure identity for every client (it says it is insecure once).
            identity: PodIdentity = lab.pod_identity if lab.secure else _constant(Security.insecure())
            await start_identities(identity, namespaces)
            sides.append(Side(name, new_clients(lab.node("node1").manager_url, remote_setup.SERVICE,
                                                namespaces, f"r{name[:3]}", identity,
                                                lab.manager_id("node1")),
                              namespaces, lab.pids()))
        say(f"  remote: {n} connections per side, one at a time, interleaved")
        out = await interleaved(sides, nl, failures, "remote", mtu=TUNNEL_MTU)
        for name, lab in zip(SIDES, labs, strict=True):
            out[name]["leftovers"] = await lab.check_leftovers(nl, failures, f"remote {name} leftovers")
            out[name]["daemon_log_problems"] = lab.log_problems()
        return out


async def run(options: Options) -> dict[str, Any]:
    """The whole benchmark (see the module docstring); one result dict."""
    local_n = options.n or (QUICK_LOCAL_N if options.quick else DEFAULT_LOCAL_N)
    remote_n = options.n or (QUICK_REMOTE_N if options.quick else DEFAULT_REMOTE_N)
    failures, result, started = begin(NAME, "network namespaces, veth, vxlan", bar=BAR)
    parts: list[tuple[str, Callable[[], Awaitable[dict[str, Any]]]]] = []
    if options.flag("local"):
        parts.append(("local", lambda: _local(local_n, nl, failures, options.keep_logs)))
    if options.flag("remote"):
        parts.append(("remote", lambda: _remote(remote_n, nl, failures)))
    with failures.recording(result, started):
        async with Netlink() as nl:
            for key, part in parts:
                got = await part()
                result.update(got if key == "local" else {key: got})
                await asyncio.sleep(options.settle)
    problems = [p for key, _ in parts for side in SIDES
                if (p := (result.get(key) or {}).get(side, {}).get("daemon_log_problems"))]
    result["daemon_log_problems"] = {"count": sum(p["count"] for p in problems),
                                     "first": [line for p in problems for line in p["first"]][:5]}
    local = (result.get("local") or {}).get("ratio") or {}
    result["bars"] = [Bar("local request p50 secure / insecure", local.get("request p50"), BAR).as_dict()]
    return result


def table(result: dict[str, Any]) -> str:
    """The result as a human table."""
    lines = ["security: connection setup secure (mTLS, tokens, authorization, namespace proofs) vs "
             "--insecure, same run, interleaved (ms)"]
    head = (f"{'setup':<7} {'side':<9} {'n':>4} | {'request p50':>11} {'p90':>8} {'max':>8} "
            f"| {'close p50':>9} {'p90':>8} {'max':>8}")
    lines += [head, "-" * len(head)]
    for key in PARTS:
        part = result.get(key)
        if not part:
            continue
        for side in SIDES:
            r, c = part[side]["request_ms"], part[side]["close_ms"]
            lines.append(f"{key:<7} {side:<9} {r.get('n', 0):>4} | {fmt(r.get('p50'), 11)} "
                         f"{fmt(r.get('p90'))} {fmt(r.get('max'))} | {fmt(c.get('p50'), 9)} "
                         f"{fmt(c.get('p90'))} {fmt(c.get('max'))}")
        q = part["ratio"]
        lines.append(f"{key:<7} {'ratio':<9} {'':>4} | {fmt(q.get('request p50'), 11)} "
                     f"{fmt(q.get('request p90'))} {fmt(q.get('request max'))} | "
                     f"{fmt(q.get('close p50'), 9)} {fmt(q.get('close p90'))} {fmt(q.get('close max'))}")
    for key in PARTS:
        part = result.get(key)
        if not part:
            continue
        quarters = ", ".join(fmt(v, 0) for v in part["ratio_request_p50_by_quarter"])
        lines.append(f"{key}: request p50 ratio by quarter of the run: {quarters}; "
                     f"{part['wall_s']} s for {part['n']} pairs")
        for side in SIDES:
            cpu = ", ".join(f"{k} {v['total']:.2f}"
                            for k, v in part[side]["cpu_ms_per_setup_and_close"].items())
            lines.append(f"  CPU ms per setup+close ({side}): {cpu}")
        bench_cpu = next(iter(part["bench_cpu_ms_per_pair"].values()))["total"]
        lines.append(f"  CPU ms of this process per pair (both sides' clients): {bench_cpu:.2f}")
    lines += outcome_lines(result)
    return "\n".join(lines)


def headline(result: dict[str, Any]) -> dict[str, float | None]:
    """The figures compared across repeated runs."""
    out: dict[str, float | None] = {}
    for key in PARTS:
        part = result.get(key)
        if not part:
            continue
        for side in SIDES:
            out[f"{key} {side} request p50 ms"] = part[side]["request_ms"].get("p50")
        out[f"{key} ratio request p50" + (f" (bar {BAR:g})" if key == "local" else "")] = \
            part["ratio"].get("request p50")
        out[f"{key} ratio request p90"] = part["ratio"].get("request p90")
    return out


BENCH = Bench(name=NAME, doc=summary(__doc__), run=run, table=table, headline=headline)

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
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.common import Bar, Bench, CpuMeter, Options, fmt, machine, outcome_lines, ratio, say, summarize
from bench.remote_floor import TUNNEL_MTU, measure_remote_floor, rss_kb, sweep
from nsm.api.connection_pb2 import Connection
from nsm.client.sdk import Client
from nsm.errors import NotFound, NsmError, Unavailable
from nsm.kernel.netlink import Netlink
from nsm.lab import EndpointSpec, Lab, NodeSpec, PodSpec, ServiceSpec, Topology

NAME = "remote_setup"
DEFAULT_N = 200
DEFAULT_CONCURRENCY = 20
QUICK_N = 30
QUICK_CONCURRENCY = 5
#: The bar: our request p50 within this factor of the floor's p50, same run.
BAR = 3.0
SERVICE = "bench-remote"
NSE_CIDR = "172.20.0.0/16"
IFNAME = "nsm-1"
WARMUP = 3
#: The forwarders' policy tables (``vxlan.TablePool``): rules toward these are ours.
TABLE_FIRST, TABLE_COUNT = 0x4E530000, 1 << 16
#: Our link names on a node (``vxlan.names_for``).
LINK_PREFIXES = ("nsv", "nsx", "nsb")


class CheckFailed(Exception):
    """The kernel state is not what the connection says."""


@dataclass
class Failures:
    """Failed operations: a count and the first few messages."""

    count: int = 0
    first: list[str] = field(default_factory=list)

    def add(self, what: str, exc: BaseException) -> None:
        self.count += 1
        if len(self.first) < 10:
            text = exc.message if isinstance(exc, NsmError) else repr(exc)
            self.first.append(f"{what}: {text}"[:400])


def lab_prefix() -> str:
    """``nsmb<pid>``: the lab's namespaces are ``nsmb<pid>-<name>``, which
    :func:`bench.remote_floor.sweep` recognises after a SIGKILL."""
    return f"nsmb{os.getpid()}"


def ms(t0: float, t1: float) -> float:
    return (t1 - t0) * 1e3


async def for_each(n: int, concurrency: int, fn: Callable[[int], Awaitable[None]]) -> float:
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


async def verify_up(nl: Netlink, netns: str, conn: Connection, ifname: str = IFNAME,
                    mtu: int = TUNNEL_MTU) -> None:
    """The client's interface exists, is up, has the tunnel MTU and the connection's addresses."""
    link = await nl.link(netns, ifname)
    if link is None:
        raise CheckFailed(f"{ifname} does not exist in {netns}")
    if not link.admin_up:
        raise CheckFailed(f"{ifname} in {netns} is down")
    if link.mtu != mtu:
        raise CheckFailed(f"{ifname} in {netns} has MTU {link.mtu}, not {mtu}")
    want = list(conn.context.ip_context.src_ip_addrs)
    have = set(await nl.addresses(netns, ifname))
    missing = [a for a in want if a not in have]
    if not want or missing:
        raise CheckFailed(f"{ifname} in {netns} lacks {missing or 'an address'} (has {sorted(have)})")


async def node_state(nl: Netlink, netns: str) -> dict[str, int]:
    """Our links (``nsv``/``nsx``/``nsb``) and rules toward connection tables on a node."""
    links = [link.name for link in await nl.links(netns)]
    rules = [r for r in await nl.rules(netns) if TABLE_FIRST <= r.table < TABLE_FIRST + TABLE_COUNT]
    out = {p: sum(1 for name in links if name.startswith(p)) for p in LINK_PREFIXES}
    out["rules"] = len(rules)
    return out


async def leftovers(nl: Netlink, lab: Lab) -> dict[str, dict[str, int]]:
    """:func:`node_state` of every node; all zero when every connection was removed."""
    return {name: await node_state(nl, node.netns) for name, node in lab.nodes.items()}


def daemon_pids(lab: Lab) -> dict[str, int | None]:
    return {key: d.pid for key, d in lab.daemons.items()}


def memory(lab: Lab) -> dict[str, dict[str, int | None]]:
    """VmRSS and VmHWM of every daemon (KiB)."""
    return {key: rss_kb(pid) for key, pid in daemon_pids(lab).items()}


def log_problems(lab: Lab, limit: int = 5) -> dict[str, Any]:
    """Warning/error lines and tracebacks in the daemons' logs."""
    count, first = 0, []
    for key, text in lab.logs().items():
        for line in text.splitlines():
            parts = line.split(maxsplit=2)
            if (len(parts) >= 2 and parts[1] in ("warning", "error", "critical")) \
                    or line.startswith("Traceback"):
                count += 1
                if len(first) < limit:
                    first.append(f"{key}: {line[:300]}")
    return {"count": count, "first": first}


async def warm_one(make: Callable[[], Client], nl: Netlink, netns: str, failures: Failures,
                   what: str, wait: float = 20.0) -> float:
    """One connection (not counted) from ``netns``: set up, verified, closed; its request time
    in ms. Retries NOT_FOUND/UNAVAILABLE for up to ``wait`` s (the endpoint's registration on
    its way to the client's manager)."""
    deadline = time.monotonic() + wait
    while True:
        client = make()
        t0 = time.perf_counter()
        try:
            conn = await client.request()
        except (NotFound, Unavailable) as exc:
            await client.close()
            if time.monotonic() > deadline:
                failures.add(what, exc)
                raise
            await asyncio.sleep(0.1)
            continue
        took = round(ms(t0, time.perf_counter()), 2)
        try:
            await verify_up(nl, netns, conn)
        finally:
            await client.close(raise_errors=True)
            nl.forget(netns)
        return took


async def warmup(lab: Lab, nl: Netlink, pods: Sequence[str], service: str,
                 failures: Failures) -> list[float]:
    """First requests (channels connect, caches fill; not counted)."""
    node1 = lab.node("node1")
    out = []
    for i, pod in enumerate(pods):
        ns = lab.pod(pod).netns

        def make(i: int = i, ns: str = ns) -> Client:
            return Client(manager_url=node1.manager_url, service=service, netns=ns,
                          ifname=IFNAME, name=f"bench-warm-{i}")

        out.append(await warm_one(make, nl, ns, failures, f"warm-up request {i}"))
    return out


async def timed_request(client: Client, nl: Netlink, netns: str, failures: Failures, what: str,
                        request_ms: list[float], verified_ms: list[float] | None = None,
                        verify: bool = True) -> Connection | None:
    """Request (timed into ``request_ms``), then check the interface from here (request +
    check timed into ``verified_ms``). The connection, or None after a counted failure."""
    t0 = time.perf_counter()
    try:
        conn = await client.request()
    except Exception as exc:
        failures.add(f"{what} request", exc)
        return None
    request_ms.append(ms(t0, time.perf_counter()))
    if not verify:
        return conn
    try:
        await verify_up(nl, netns, conn)
    except Exception as exc:
        failures.add(f"{what} verify", exc)
        return None
    if verified_ms is not None:
        verified_ms.append(ms(t0, time.perf_counter()))
    return conn


async def timed_close(client: Client | None, nl: Netlink, netns: str, failures: Failures,
                      what: str, close_ms: list[float]) -> None:
    """Close (timed into ``close_ms``) if connected, then check the interface is gone."""
    if client is None or client.connection is None:
        return
    t0 = time.perf_counter()
    try:
        await client.close(raise_errors=True)
    except Exception as exc:
        failures.add(f"{what} close", exc)
        return
    close_ms.append(ms(t0, time.perf_counter()))
    try:
        if await nl.link(netns, IFNAME) is not None:
            raise CheckFailed(f"{IFNAME} is still in {netns} after Close")
    except Exception as exc:
        failures.add(f"{what} verify close", exc)
    finally:
        nl.forget(netns)


async def phase(lab: Lab, nl: Netlink, namespaces: Sequence[str], concurrency: int,
                failures: Failures, label: str, *, service: str = SERVICE,
                verify: bool = True, at_peak: Callable[[], Awaitable[None]] | None = None
                ) -> dict[str, Any]:
    """Set up one connection per namespace (``concurrency`` at a time), call ``at_peak``, then
    close them all the same way; per-connection timings, rates and CPU per daemon."""
    n = len(namespaces)
    node1 = lab.node("node1")
    clients: list[Client | None] = [None] * n
    request_ms: list[float] = []
    verified_ms: list[float] = []
    close_ms: list[float] = []
    cpu = CpuMeter({**daemon_pids(lab), "bench (client SDK + checks)": None})

    async def setup(i: int) -> None:
        client = Client(manager_url=node1.manager_url, service=service, netns=namespaces[i],
                        ifname=IFNAME, name=f"bench-nsc-{label}-{i}")
        clients[i] = client
        await timed_request(client, nl, namespaces[i], failures, f"{label} {i}", request_ms,
                            verified_ms, verify=verify)

    async def close(i: int) -> None:
        await timed_close(clients[i], nl, namespaces[i], failures, f"{label} {i}", close_ms)

    try:
        cpu.start()
        setup_wall = await for_each(n, concurrency, setup)
        cpu_setup = cpu.stop(n)
        if at_peak is not None:
            await at_peak()
        cpu.start()
        close_wall = await for_each(n, concurrency, close)
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
        "close_ms": summarize(close_ms),
        "setup_wall_s": round(setup_wall, 3),
        "setups_per_s": round(n / setup_wall, 1),
        "close_wall_s": round(close_wall, 3),
        "closes_per_s": round(n / close_wall, 1),
        "cpu_ms_per_setup": cpu_setup,
        "cpu_ms_per_close": cpu_close,
    }


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
    if os.geteuid() != 0:
        raise PermissionError("remote_setup needs root (network namespaces, veth, vxlan)")
    stale = sweep()
    if stale:
        say(f"removed {len(stale)} namespaces left by a killed benchmark")
    failures = Failures()
    result: dict[str, Any] = {"name": NAME, "n": n, "concurrency": concurrency,
                              "machine": machine(), "bar": BAR}
    started = time.perf_counter()
    nl = Netlink()
    try:
        lab = Lab(topology(n), prefix=lab_prefix(), start_timeout=60.0)
        async with lab:
            say(f"remote_setup: lab with {2 * n + WARMUP} client pods up in "
                f"{lab.build_seconds:.1f} s")
            result["pids"] = daemon_pids(lab)
            result["warmup_ms"] = await warmup(lab, nl, [f"warm{i}" for i in range(WARMUP)],
                                               SERVICE, failures)
            say(f"  warm-up requests (ms): {result['warmup_ms']}")
            say(f"  ours: {n} remote connections, one at a time")
            result["sequential"] = await phase(
                lab, nl, [lab.pod(f"s{i}").netns for i in range(n)], 1, failures, "seq")
            await asyncio.sleep(settle)
            if floor:
                say(f"  floor: {n} remote connections, one at a time")
                result["floor_sequential"] = await measure_remote_floor(n, 1)
                await asyncio.sleep(settle)
            say(f"  ours: {n} remote connections, {concurrency} at a time")
            result["concurrent"] = await phase(
                lab, nl, [lab.pod(f"c{i}").netns for i in range(n)], concurrency, failures,
                "conc")
            await asyncio.sleep(settle)
            if floor:
                say(f"  floor: {n} remote connections, {concurrency} at a time")
                result["floor_concurrent"] = await measure_remote_floor(n, concurrency)
            result["leftovers"] = await leftovers(nl, lab)
            if any(v for node in result["leftovers"].values() for v in node.values()):
                failures.add("leftovers", CheckFailed(f"left on the nodes: {result['leftovers']}"))
            result["memory_kb"] = memory(lab)
            await nl.close()
            result["daemon_log_problems"] = log_problems(lab)
    except BaseException as exc:
        failures.add("benchmark aborted", exc)
        raise
    finally:
        await nl.close()
        result["failures"] = failures.count
        result["failure_examples"] = failures.first
        result["wall_s"] = round(time.perf_counter() - started, 1)
    for mode in ("sequential", "concurrent"):
        f = result.get(f"floor_{mode}")
        if f and f["failures"]:
            result["failures"] += f["failures"]
            result["failure_examples"] += f["failure_examples"]
    _ratios(result)
    return result


def _ratios(result: dict[str, Any]) -> None:
    ratios: dict[str, Any] = {}
    bars: list[Bar] = []
    for mode in ("sequential", "concurrent"):
        ours, floor = result.get(mode), result.get(f"floor_{mode}")
        if not ours or not floor:
            continue
        r = {
            "request_p50": ratio(ours["request_ms"].get("p50"), floor["setup_ms"].get("p50")),
            "request_p95": ratio(ours["request_ms"].get("p95"), floor["setup_ms"].get("p95")),
            "request_verified_p50": ratio(ours["request_verified_ms"].get("p50"),
                                          floor["setup_ms"].get("p50")),
            "close_p50": ratio(ours["close_ms"].get("p50"), floor["close_ms"].get("p50")),
            "floor_rate_over_ours": ratio(floor["setups_per_s"], ours["setups_per_s"]),
        }
        ratios[mode] = r
        bars.append(Bar(f"remote {mode} request p50 / floor p50", r["request_p50"], BAR))
    result["ratios"] = ratios
    result["bars"] = [b.as_dict() for b in bars]


def table(result: dict[str, Any]) -> str:
    """The result as a human table."""
    n, c = result.get("n"), result.get("concurrency")
    lines = [f"remote_setup: {n} cross-node connections (IP over VXLAN), one at a time and {c} "
             f"at a time (ms per connection)"]
    head = (f"{'phase':<11} {'metric':<17} {'p50':>8} {'p95':>8} {'p99':>8} {'max':>8} "
            f"| {'floor p50':>9} {'fl p95':>8} {'ratio':>6}")
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
                ("close", ours["close_ms"], floor.get("close_ms"), r.get("close_p50"))]
        for metric, s, f, rr in rows:
            f = f or {}
            lines.append(f"{mode:<11} {metric:<17} {fmt(s.get('p50'))} {fmt(s.get('p95'))} "
                         f"{fmt(s.get('p99'))} {fmt(s.get('max'))} | {fmt(f.get('p50'), 9)} "
                         f"{fmt(f.get('p95'))} {fmt(rr, 6)}")
        lines.append(f"{'':<11} {'setups/s':<17} {fmt(ours['setups_per_s'])}{'':>27} | "
                     f"{fmt(floor.get('setups_per_s'), 9, 1)}")
        lines.append(f"{'':<11} {'closes/s':<17} {fmt(ours['closes_per_s'])}{'':>27} | "
                     f"{fmt(floor.get('closes_per_s'), 9, 1)}")
    for mode in ("sequential", "concurrent"):
        ours = result.get(mode)
        if ours:
            cpu = ", ".join(f"{k} {v['total']:.2f}" for k, v in ours["cpu_ms_per_setup"].items())
            lines.append(f"CPU ms per setup ({mode}): {cpu}")
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
    out: dict[str, float | None] = {}
    for mode, short in (("sequential", "seq"), ("concurrent", "conc")):
        ours, floor = result.get(mode), result.get(f"floor_{mode}")
        r = (result.get("ratios") or {}).get(mode) or {}
        if ours:
            out[f"{short} request p50 ms"] = ours["request_ms"].get("p50")
            out[f"{short} request p95 ms"] = ours["request_ms"].get("p95")
            out[f"{short} close p50 ms"] = ours["close_ms"].get("p50")
            out[f"{short} setups/s"] = ours["setups_per_s"]
        if floor:
            out[f"{short} floor setup p50 ms"] = floor["setup_ms"].get("p50")
            out[f"{short} floor close p50 ms"] = floor["close_ms"].get("p50")
        if r:
            out[f"{short} ratio request p50 (bar {BAR:g})"] = r.get("request_p50")
    return out


async def run_options(options: Options) -> dict[str, Any]:
    """:func:`run` for ``bench.run`` (``--set floor=0`` skips the floor)."""
    return await run(options.quick, n=options.n, concurrency=options.concurrency,
                     floor=options.extra.get("floor", "1") not in ("0", "false", "no"),
                     settle=options.settle)


BENCH = Bench(name=NAME, doc=__doc__.split("\n\n")[0].replace("\n", " "), run=run_options,
              table=table, headline=headline)


def cli(module_doc: str, runner: Callable[..., Awaitable[dict[str, Any]]],
        render: Callable[[dict[str, Any]], str], argv: list[str] | None,
        extra: Callable[[argparse.ArgumentParser], None] | None = None) -> int:
    """The common ``main()`` of the cross-node benchmarks: JSON on stdout (and ``--json``),
    the human table on stderr; exit 0, 1 (failures), 2 (not root) or 130 (interrupted)."""
    parser = argparse.ArgumentParser(description=module_doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke)")
    parser.add_argument("--json", metavar="FILE", help="also write the JSON result to FILE")
    if extra is not None:
        extra(parser)
    args = vars(parser.parse_args(argv))
    json_path = args.pop("json")
    if os.geteuid() != 0:
        say("needs root (network namespaces)")
        return 2
    try:
        result = asyncio.run(runner(**args))
    except KeyboardInterrupt:
        say("interrupted; everything it created was removed")
        return 130
    text = json.dumps(result, indent=2, default=str)
    print(text, flush=True)
    if json_path:
        with open(json_path, "w") as f:
            f.write(text + "\n")
    say(render(result))
    return 1 if result.get("failures") else 0


def main(argv: list[str] | None = None) -> int:
    def extra(p: argparse.ArgumentParser) -> None:
        p.add_argument("--n", type=int, default=None, help=f"connections per phase ({DEFAULT_N})")
        p.add_argument("--concurrency", type=int, default=None,
                       help=f"in flight in the concurrent phase ({DEFAULT_CONCURRENCY})")
        p.add_argument("--no-floor", dest="floor", action="store_false", help="skip the floor")

    return cli(__doc__, run, table, argv, extra)


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())

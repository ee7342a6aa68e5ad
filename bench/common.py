"""Shared pieces of the benchmarks: statistics, machine facts, CPU accounting, a scratch area
(namespaces, daemons, a work directory) that is always removed, connections through the SDK
(timed, checked, counted when they fail), lab facts (daemons' pids, memory, log problems),
hand-built nodes, the bench registry types and the command line of a benchmark. Every benchmark
takes its helpers from here; a benchmark module imports another only for its floor (and
``bench.security`` for the meshes it compares).

Every benchmark is a :class:`Bench`: an async function taking :class:`Options` and returning one
JSON-serialisable dict with at least ``name``, ``failures`` (int) and ``bars`` (list of
:class:`Bar` dicts), plus a function rendering that dict as a human table. ``bench.run`` runs
the registered ones and gathers their dicts into one document.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as _dt
import gc
import ipaddress
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import grpc

from nsm.api.connection_pb2 import Connection
from nsm.client.sdk import Client
from nsm.errors import NotFound, NsmError, Unavailable
from nsm.kernel import netns as nsns
from nsm.kernel.netlink import Netlink
from nsm.lab import Lab, Topology, end_processes_in
from nsm.lab.processes import Daemon
from nsm.security.ca import CertificateAuthority
from nsm.security.ids import DEFAULT_TRUST_DOMAIN, MANAGER, node_id, workload_id
from nsm.security.sources import CaSource
from nsm.security.tls import Security

#: Prefix of every namespace a benchmark creates: ``nsmb<pid>-...`` (see :func:`sweep_stale`).
NS_PREFIX = "nsmb"

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def summary(doc: str | None) -> str:
    """The first paragraph of a module's docstring, on one line."""
    return (doc or "").split("\n\n")[0].replace("\n", " ")


def say(text: str = "") -> None:
    """Progress output (stderr, so that stdout stays one JSON document)."""
    print(text, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ statistics


def percentile(ordered: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of sorted values, linearly interpolated between the two
    closest ranks (numpy's default)."""
    if not ordered:
        return math.nan
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(values: Sequence[float], digits: int = 3) -> dict[str, float]:
    """``n``, ``min``, ``p50``, ``p95``, ``p99``, ``max`` and ``mean`` of latencies (ms)."""
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    out = {"n": len(ordered), "min": ordered[0], "p50": percentile(ordered, 50),
           "p95": percentile(ordered, 95), "p99": percentile(ordered, 99), "max": ordered[-1],
           "mean": statistics.fmean(ordered)}
    return {k: (v if k == "n" else round(v, digits)) for k, v in out.items()}


def ratio(ours: float | None, floor: float | None) -> float | None:
    """``ours / floor`` rounded, None when either is missing or the floor is not positive."""
    if ours is None or floor is None or not floor > 0 or math.isnan(ours):
        return None
    return round(ours / floor, 2)


# ------------------------------------------------------------------------------------ machine


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def code_state() -> dict[str, Any]:
    """The commit measured and the product/bench files modified on top of it (read-only git)."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                                  timeout=5, check=False).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    status = git("status", "--porcelain", "--", "nsm", "bench").splitlines()
    return {"commit": git("rev-parse", "--short", "HEAD").strip() or None,
            "modified": [line[3:] for line in status if len(line) > 3]}


def machine() -> dict[str, Any]:
    """Facts about this machine and run, for the JSON document and the docs."""
    load = os.getloadavg()
    return {
        "date_utc": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host": platform.node(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "grpcio": _version("grpcio"),
        "pyroute2": _version("pyroute2"),
        "protobuf": _version("protobuf"),
        "loadavg_1m_at_start": round(load[0], 2),
        "code": code_state(),
        "argv": sys.argv,
    }


# ------------------------------------------------------------------------------------ CPU time


def cpu_split(pid: int | None = None) -> tuple[float, float]:
    """(user, system) CPU seconds of a process (NaN, NaN when it is gone)."""
    path = f"/proc/{pid}/stat" if pid else "/proc/self/stat"
    try:
        with open(path, "rb") as f:
            raw = f.read().decode()
    except OSError:
        return math.nan, math.nan
    fields = raw[raw.rindex(")") + 2:].split()
    return int(fields[11]) / _CLK_TCK, int(fields[12]) / _CLK_TCK


class CpuMeter:
    """CPU time spent by named processes between :meth:`start` and :meth:`stop` (ms per item).

    Resolution is one clock tick (10 ms) per process, so use it over hundreds of items."""

    def __init__(self, pids: Mapping[str, int | None]) -> None:
        self.pids = dict(pids)
        self._start: dict[str, tuple[float, float]] = {}

    def start(self) -> None:
        self._start = {name: cpu_split(pid) for name, pid in self.pids.items()}

    def stop(self, items: int) -> dict[str, dict[str, float]]:
        """Per process: ``{"user": ms/item, "sys": ms/item, "total": ms/item}``."""
        out: dict[str, dict[str, float]] = {}
        for name, pid in self.pids.items():
            u0, s0 = self._start.get(name, (math.nan, math.nan))
            u1, s1 = cpu_split(pid)
            user, sys_ = (u1 - u0) * 1e3 / items, (s1 - s0) * 1e3 / items
            out[name] = {"user": round(user, 2), "sys": round(sys_, 2),
                         "total": round(user + sys_, 2)}
        return out


# ------------------------------------------------------------------------------------ scratch


def sweep_stale() -> list[str]:
    """Remove what a benchmark process that died without cleaning up (killed with SIGKILL)
    left: the processes (daemons, iperf3) inside its namespaces, then the namespaces, named
    ``nsmb<pid>-...`` (or ``nsmb<pid>_<tag>-...``, :class:`BenchLab`) with a ``<pid>`` no
    longer running. Namespaces of running benchmarks and
    everything else are left alone. Returns the names removed."""
    stale = []
    for name in nsns.list_netns():
        if not name.startswith(NS_PREFIX):
            continue
        pid_text = name[len(NS_PREFIX):].split("-", 1)[0].split("_", 1)[0]
        if not pid_text.isdigit() or int(pid_text) == os.getpid():
            continue
        if Path(f"/proc/{pid_text}").exists():
            continue
        stale.append(name)
    if stale:
        end_processes_in([nsns.netns_path(name) for name in stale], timeout=3.0)
    removed = []
    for name in stale:
        with contextlib.suppress(Exception):
            nsns.delete_netns(name)
            removed.append(name)
    return removed


#: Warnings every daemon run ``--insecure`` logs at start, on purpose: not problems of a run.
INSECURE_WARNINGS = ("'running --insecure: ", "'insecure: no path tokens")


def log_problems(logs: Iterable[tuple[str, str]], limit: int = 5) -> dict[str, Any]:
    """Warning and error lines and tracebacks in daemons' logs (``(name, text)`` pairs): a count
    and the first few (not the warnings of :data:`INSECURE_WARNINGS`)."""
    lines: list[str] = []
    count = 0
    for name, text in logs:
        for line in text.splitlines():
            parts = line.split(maxsplit=2)
            if (len(parts) >= 2 and parts[1] in ("warning", "error", "critical")
                    and not any(w in line for w in INSECURE_WARNINGS)) \
                    or line.startswith("Traceback"):
                count += 1
                if len(lines) < limit:
                    lines.append(f"{name}: {line[:300]}")
    return {"count": count, "first": lines}


def begin(name: str, needs: str, **fields: Any) -> tuple[Failures, dict[str, Any], float]:
    """The start of a benchmark run: root or PermissionError (``needs``: what for), leftovers of
    killed runs removed; a new :class:`Failures`, the result (``name``, ``machine`` and
    ``fields``) and the start time (for :meth:`Failures.report`)."""
    if os.geteuid() != 0:
        raise PermissionError(f"{name} needs root ({needs})")
    stale = sweep_stale()
    if stale:
        say(f"removed {len(stale)} namespaces left by a killed benchmark")
    return Failures(), {"name": name, **fields, "machine": machine()}, time.perf_counter()


class Scratch:
    """Namespaces, daemon processes and a work directory of one benchmark, all removed by
    :meth:`aclose` (also on failure and Ctrl-C: use ``async with``).

    Namespace names are ``nsmb<pid>-<label>``; daemons log to ``<work>/<name>.log``.

    Secure unless ``secure=False``, as the lab is: a built-in CA in ``<work>/ca`` issues every
    daemon its role's SVID (:attr:`daemon_env`); :attr:`security` is the benchmark's own
    identity (an observer of every daemon), :meth:`identity` and :meth:`pod_identity` make more
    for in-process clients (started beforehand with :meth:`start_identities`, so that issuing
    an SVID, which a real pod gets before it runs, is not timed). ``secure=False`` runs every
    daemon ``--insecure``.
    """

    def __init__(self, label: str, *, keep_logs: bool = False, secure: bool = True) -> None:
        self.tag = f"{NS_PREFIX}{os.getpid()}-{label}"
        self.work = Path(tempfile.mkdtemp(prefix=f"{self.tag}-"))
        self.keep_logs = keep_logs
        self.namespaces: list[str] = []
        self.daemons: list[Daemon] = []
        self.secure = secure
        self.trust_domain = DEFAULT_TRUST_DOMAIN
        self._identities: dict[str, Security] = {}
        self._insecure = Security.insecure()  # one, so that it says it is insecure once
        if secure:
            CertificateAuthority.open(self.ca_dir, self.trust_domain)
        self.security = self.identity(self.bench_id)

    @property
    def ca_dir(self) -> Path:
        return self.work / "ca"

    @property
    def bench_id(self) -> str:
        """The benchmark's own SPIFFE ID (an observer every daemon lets see all connections)."""
        return f"spiffe://{self.trust_domain}/nsm/bench"

    @property
    def daemon_env(self) -> dict[str, str]:
        """What every daemon gets in its environment: the CA and the trust domain (each daemon's
        SPIFFE ID is its role's default) and the benchmark as an observer; or ``NSM_INSECURE``."""
        if not self.secure:
            return {"NSM_INSECURE": "1"}
        return {"NSM_CA_DIR": str(self.ca_dir), "NSM_TRUST_DOMAIN": self.trust_domain,
                "NSM_OBSERVERS": self.bench_id}

    def identity(self, spiffe_id: str) -> Security:
        """A :class:`Security` with an SVID of the CA for ``spiffe_id`` (one per ID, closed with
        the scratch area); the insecure one when not ``secure``."""
        if not self.secure:
            return self._insecure
        if spiffe_id not in self._identities:
            source = CaSource(self.ca_dir, spiffe_id, trust_domain=self.trust_domain,
                              dns_names=(self.trust_domain,))
            self._identities[spiffe_id] = Security(source, trust_domain=self.trust_domain)
        return self._identities[spiffe_id]

    def pod_identity(self, netns: str) -> Security:
        """The identity of the pod of ``netns`` (``spiffe://<td>/ns/default/pod/<name>``)."""
        return self.identity(workload_id(self.trust_domain, os.path.basename(netns.rstrip("/"))))

    def manager_id(self, node: str) -> str | None:
        """The SPIFFE ID of ``node``'s manager, which its clients expect; None when insecure."""
        return node_id(self.trust_domain, node, MANAGER) if self.secure else None

    def role_identity(self, node: str, role: str) -> Security:
        """The identity of a node's manager or forwarder (to call a hop as its real caller)."""
        return self.identity(node_id(self.trust_domain, node, role))

    def url(self, name: str) -> str:
        """A unix socket URL in the work directory."""
        return f"unix://{self.work}/{name}.sock"

    def netns(self, name: str) -> str:
        """Create ``<tag>-<name>`` and return its path."""
        full = f"{self.tag}-{name}"
        path = nsns.create_netns(full)
        self.namespaces.append(full)
        return path

    def netns_many(self, prefix: str, n: int) -> list[str]:
        """Create ``n`` namespaces ``<tag>-<prefix><i>`` and return their paths."""
        return [self.netns(f"{prefix}{i}") for i in range(n)]

    async def daemon(self, name: str, argv: Sequence[str], url: str,
                     env: Mapping[str, str] | None = None) -> Daemon:
        """Start ``nsm <argv>`` as a process and wait until it serves ``url``."""
        await self.security.start()
        d = Daemon(name, argv, url=url, env={**self.daemon_env, **(env or {})},
                   log_path=self.work / f"{name}.log", security=self.security)
        self.daemons.append(d)
        await d.start()
        return d

    def log_problems(self, limit: int = 5) -> dict[str, Any]:
        """Warning and error lines in the daemons' logs: a count and the first few."""
        return log_problems(((d.name, d.log_path.read_text(errors="replace")) for d in self.daemons
                             if d.log_path is not None and d.log_path.exists()), limit)

    async def stop_daemons(self) -> None:
        """Stop the daemons (SIGTERM, then SIGKILL after 5 s), last started first; their logs
        stay readable until :meth:`aclose`. Idempotent."""
        for d in reversed(self.daemons):
            with contextlib.suppress(Exception):
                await asyncio.shield(d.stop())

    async def aclose(self) -> None:
        """Stop the daemons, delete the namespaces, remove the work directory (unless
        ``keep_logs``). Safe to call twice."""
        await self.stop_daemons()
        self.daemons = []
        held, self._identities = list(self._identities.values()), {}
        for security in held:
            with contextlib.suppress(Exception):
                await security.close()
        names, self.namespaces = self.namespaces, []
        for name in names:
            with contextlib.suppress(Exception):
                nsns.delete_netns(name)
        if self.keep_logs:
            say(f"logs kept in {self.work}")
        else:
            shutil.rmtree(self.work, ignore_errors=True)

    async def __aenter__(self) -> Scratch:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def settle(seconds: float) -> None:
    """Let the kernel finish background work (namespace destruction) between phases."""
    if seconds > 0:
        await asyncio.sleep(seconds)


# ------------------------------------------------------------------------------------ connections

#: The client's interface in every benchmark.
IFNAME = "nsm-1"


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

    @contextlib.contextmanager
    def recording(self, result: dict[str, Any], started: float) -> Iterator[None]:
        """Around a benchmark's run: an exception counts as a failure ("benchmark aborted") and
        goes on; at the end, whatever happened, :meth:`report`."""
        try:
            yield
        except BaseException as exc:
            self.add("benchmark aborted", exc)
            raise
        finally:
            self.report(result, started)

    def report(self, result: dict[str, Any], started: float) -> None:
        """Into a benchmark's result: the failures, their first messages and the wall time
        since ``started`` (``time.perf_counter()``)."""
        result["failures"] = self.count
        result["failure_examples"] = self.first
        result["wall_s"] = round(time.perf_counter() - started, 1)


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


async def timed(count: int, fn: Callable[[int], Awaitable[None]]) -> dict[str, float]:
    """:func:`summarize` of ``fn(0..count-1)``'s times, one after the other (ms)."""
    values = []
    for i in range(count):
        t0 = time.perf_counter()
        await fn(i)
        values.append(ms(t0, time.perf_counter()))
    return summarize(values)


async def verify_up(nl: Netlink, netns: str, conn: Connection, ifname: str = IFNAME,
                    mtu: int | None = None) -> None:
    """The client's interface exists, is up, has every address of the connection (and the MTU
    ``mtu`` when given)."""
    link = await nl.link(netns, ifname)
    if link is None:
        raise CheckFailed(f"{ifname} does not exist in {netns}")
    if not link.admin_up:
        raise CheckFailed(f"{ifname} in {netns} is down")
    if mtu is not None and link.mtu != mtu:
        raise CheckFailed(f"{ifname} in {netns} has MTU {link.mtu}, not {mtu}")
    want = list(conn.context.ip_context.src_ip_addrs)
    have = set(await nl.addresses(netns, ifname))
    missing = [a for a in want if a not in have]
    if not want or missing:
        raise CheckFailed(f"{ifname} in {netns} lacks {missing or 'an address'} (has {sorted(have)})")


async def warm_one(make: Callable[[], Client], nl: Netlink, netns: str, failures: Failures,
                   what: str, *, wait: float = 20.0, mtu: int | None = None) -> float:
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
            await verify_up(nl, netns, conn, mtu=mtu)
        finally:
            await client.close(raise_errors=True)
            nl.forget(netns)
        return took


class Requester(Protocol):
    """What the timing helpers use of a client: an SDK ``Client``, or one connection of a
    long-lived client that holds many (``bench.security``'s agent part)."""

    @property
    def connection(self) -> Connection | None: ...

    async def request(self) -> Connection: ...

    async def close(self, *, raise_errors: bool = False) -> None: ...


async def timed_request(client: Requester, nl: Netlink, netns: str, failures: Failures, what: str,
                        request_ms: list[float], verified_ms: list[float] | None = None, *,
                        verify: bool = True, mtu: int | None = None,
                        verify_ms: list[float] | None = None) -> Connection | None:
    """Request (timed into ``request_ms``), then check the interface from here (request +
    check timed into ``verified_ms``, the check alone into ``verify_ms``). The connection, or
    None after a counted failure."""
    t0 = time.perf_counter()
    try:
        conn = await client.request()
    except Exception as exc:
        failures.add(f"{what} request", exc)
        return None
    t1 = time.perf_counter()
    request_ms.append(ms(t0, t1))
    if not verify:
        return conn
    try:
        await verify_up(nl, netns, conn, mtu=mtu)
    except Exception as exc:
        failures.add(f"{what} verify", exc)
        return None
    t2 = time.perf_counter()
    if verified_ms is not None:
        verified_ms.append(ms(t0, t2))
    if verify_ms is not None:
        verify_ms.append(ms(t1, t2))
    return conn


async def timed_close(client: Requester | None, nl: Netlink, netns: str, failures: Failures,
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


#: Who a pod is, by its namespace: ``Lab.pod_identity``, ``Scratch.pod_identity``.
PodIdentity = Callable[[str], Security]


async def start_identities(identity: PodIdentity, namespaces: Iterable[str]) -> None:
    """Get the SVIDs of the pods of ``namespaces`` before a timed phase: a real pod has its
    SVID before it runs, so issuing one is not part of its Request."""
    for ns in namespaces:
        await identity(ns).start()


def new_clients(manager_url: str, service: str, namespaces: Sequence[str],
                label: str, identity: PodIdentity, manager_id: str | None = None
                ) -> Callable[[int], Client]:
    """``i`` → a new SDK ``Client`` of ``service`` from ``namespaces[i]`` with the identity of
    its pod, as a new pod would make (its Request also connects its channel to the manager),
    configured with the manager's SPIFFE ID as a pod of the node's DaemonSet is
    (``NSM_MANAGER_ID``: the handshake proves the manager, no identity round trip).
    The setup benchmarks measure the Request path, so their clients do not heal (no monitor
    stream, no liveness probe per client): what healing costs is measured by ``bench.heal``
    and ``bench.liveness``."""
    def make(i: int) -> Client:
        return Client(heal=None, manager_url=manager_url, service=service, netns=namespaces[i],
                      ifname=IFNAME, name=f"bench-nsc-{label}-{i}", security=identity(namespaces[i]),
                      manager_id=manager_id)

    return make


@contextlib.contextmanager
def harness_gc_paused() -> Iterator[None]:
    """This process's garbage collector off while a phase is timed, and a collection after.

    The benchmark process holds every client of a phase (hundreds of connections, their
    chains and channels): a full collection of that heap took 30-45 ms and landed inside one
    of the timed Requests, the sequential maximum (57 ms against 23 ms without it, insecure,
    same hour). A pod's client process holds one connection, and the daemons freeze their
    heap once serving (:func:`nsm.daemon.settle_heap`): that pause belongs to the harness, not
    to what is measured."""
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
        gc.collect()


@contextlib.asynccontextmanager
async def grpc_runtime() -> AsyncIterator[None]:
    """gRPC's asyncio runtime kept up in this process for a whole run, as in a pod's process.

    grpcio starts its runtime (a poller thread, a socket pair watched by the event loop) with
    the first gRPC object of a process and stops it when the last one is gone. A pod's process
    starts it once, with its first channel, and keeps it while it holds its connection; this
    process makes one client after another, each closed before the next: without this, every
    timed Request paid that start again (0.6-1.2 ms of a new channel here), which no pod pays
    per connection. The channel held here never connects (nothing is ever called on it)."""
    holder = grpc.aio.insecure_channel("unix:///nonexistent/nsm-bench-grpc-runtime")
    try:
        yield
    finally:
        await holder.close()


async def phase(nl: Netlink, make_client: Callable[[int], Client], namespaces: Sequence[str],
                concurrency: int, failures: Failures, label: str, pids: Mapping[str, int | None],
                *, verify: bool = True, mtu: int | None = None,
                at_peak: Callable[[dict[int, Connection]], Awaitable[None]] | None = None
                ) -> dict[str, Any]:
    """Set up one connection per namespace (client ``make_client(i)`` in ``namespaces[i]``,
    ``concurrency`` at a time), call ``at_peak`` with the verified ones, then close them all the
    same way; per-connection timings, rates and CPU per process (``pids``)."""
    n = len(namespaces)
    clients: list[Client | None] = [None] * n
    conns: dict[int, Connection] = {}
    request_ms: list[float] = []
    verified_ms: list[float] = []
    verify_ms: list[float] = []
    close_ms: list[float] = []
    cpu = CpuMeter({**pids, "bench (client SDK + checks)": None})

    async def setup(i: int) -> None:
        client = clients[i] = make_client(i)
        conn = await timed_request(client, nl, namespaces[i], failures, f"{label} {i}",
                                   request_ms, verified_ms, verify=verify, mtu=mtu,
                                   verify_ms=verify_ms)
        if conn is not None:
            conns[i] = conn

    async def close(i: int) -> None:
        await timed_close(clients[i], nl, namespaces[i], failures, f"{label} {i}", close_ms)

    try:
        with harness_gc_paused():
            cpu.start()
            setup_wall = await for_each(n, concurrency, setup)
            cpu_setup = cpu.stop(n)
        if at_peak is not None:
            await at_peak(conns)
        with harness_gc_paused():
            cpu.start()
            close_wall = await for_each(n, concurrency, close)
            cpu_close = cpu.stop(n)
    finally:
        for c in clients:  # whatever is still open (failure, Ctrl-C)
            if c is not None:
                await asyncio.shield(c.close())
        for ns in namespaces:
            nl.forget(ns)
    return {**rates(n, concurrency, setup_wall, close_wall), "verified": len(conns),
            "request_ms": summarize(request_ms), "request_verified_ms": summarize(verified_ms),
            "verify_ms": summarize(verify_ms), "close_ms": summarize(close_ms),
            "cpu_ms_per_setup": cpu_setup, "cpu_ms_per_close": cpu_close}


def rates(n: int, concurrency: int, setup_wall: float, close_wall: float) -> dict[str, Any]:
    """How a phase of ``n`` set-ups then ``n`` closes went as a whole (walls in s, rates /s)."""
    return {"n": n, "concurrency": concurrency, "setup_wall_s": round(setup_wall, 3),
            "setups_per_s": round(n / setup_wall, 1), "close_wall_s": round(close_wall, 3),
            "closes_per_s": round(n / close_wall, 1)}


#: The two phases of a setup benchmark (each beside its floor, ``floor_<mode>`` in the result).
MODES = (("sequential", "seq"), ("concurrent", "conc"))


def setup_ratios(result: dict[str, Any], bar: float, prefix: str = "") -> tuple[dict[str, Any],
                                                                                list[Bar]]:
    """Per phase of a setup benchmark, ours against the floor of the same run (both results of
    :func:`phase`-like dicts: ``request_ms``, ``close_ms``, ``setups_per_s``...), and the bar on
    the request p50 (named ``<prefix><mode> request p50 / floor p50``)."""
    ratios: dict[str, Any] = {}
    bars: list[Bar] = []
    for mode, _ in MODES:
        ours, floor = result.get(mode), result.get(f"floor_{mode}")
        if not ours or not floor:
            continue
        fp50 = floor["setup_ms"].get("p50")
        ratios[mode] = {
            "request_p50": ratio(ours["request_ms"].get("p50"), fp50),
            "request_p95": ratio(ours["request_ms"].get("p95"), floor["setup_ms"].get("p95")),
            "request_verified_p50": ratio(ours["request_verified_ms"].get("p50"), fp50),
            "close_p50": ratio(ours["close_ms"].get("p50"), floor["close_ms"].get("p50")),
            "floor_rate_over_ours": ratio(floor["setups_per_s"], ours["setups_per_s"]),
        }
        bars.append(Bar(f"{prefix}{mode} request p50 / floor p50", ratios[mode]["request_p50"], bar))
    return ratios, bars


def setup_table(result: dict[str, Any]) -> list[str]:
    """The latency table of a setup benchmark's phases beside their floors (ms)."""
    head = (f"{'phase':<11} {'metric':<17} {'p50':>8} {'p95':>8} {'p99':>8} {'max':>8} "
            f"| {'floor p50':>9} {'fl p95':>8} {'ratio':>6}")
    lines = [head, "-" * len(head)]
    for mode, _ in MODES:
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
        for rate in ("setups/s", "closes/s"):
            key = rate.replace("/s", "_per_s")
            lines.append(f"{'':<11} {rate:<17} {fmt(ours[key])}{'':>27} | "
                         f"{fmt(floor.get(key), 9, 1)}")
    for mode, _ in MODES:
        ours = result.get(mode)
        if ours:
            cpu = ", ".join(f"{k} {v['total']:.2f}" for k, v in ours["cpu_ms_per_setup"].items())
            lines.append(f"CPU ms per setup ({mode}): {cpu}")
    return lines


def setup_headline(result: dict[str, Any], bar: float) -> dict[str, float | None]:
    """The figures of a setup benchmark compared across repeated runs."""
    out: dict[str, float | None] = {}
    for mode, short in MODES:
        ours, floor = result.get(mode), result.get(f"floor_{mode}")
        r = (result.get("ratios") or {}).get(mode) or {}
        if ours:
            for q in ("p50", "p95", "p99", "max"):
                out[f"{short} request {q} ms"] = ours["request_ms"].get(q)
            out[f"{short} request+verified p50 ms"] = ours["request_verified_ms"].get("p50")
            out[f"{short} close p50 ms"] = ours["close_ms"].get("p50")
            out[f"{short} setups/s"] = ours["setups_per_s"]
        if floor:
            out[f"{short} floor setup p50 ms"] = floor["setup_ms"].get("p50")
            out[f"{short} floor close p50 ms"] = floor["close_ms"].get("p50")
            out[f"{short} floor setups/s"] = floor["setups_per_s"]
        if r:
            out[f"{short} ratio request p50 (bar {bar:g})"] = r.get("request_p50")
    return out


# ------------------------------------------------------------------------------------ the lab


def rss_kb(pid: int | None) -> dict[str, int | None]:
    """``VmRSS`` and ``VmHWM`` (peak RSS) of a process in KiB, from ``/proc/<pid>/status``."""
    out: dict[str, int | None] = {"rss_kb": None, "hwm_kb": None}
    if not pid:
        return out
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    out["rss_kb"] = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    out["hwm_kb"] = int(line.split()[1])
    except OSError:
        pass
    return out


#: The forwarders' policy tables (``vxlan.TablePool``): rules toward these are ours.
TABLE_FIRST, TABLE_COUNT = 0x4E530000, 1 << 16
#: Our link names on a node (``vxlan.names_for``).
LINK_PREFIXES = ("nsv", "nsx", "nsb")


async def node_state(nl: Netlink, netns: str) -> dict[str, int]:
    """Our links (``nsv``/``nsx``/``nsb``) and rules toward connection tables on a node."""
    links = [link.name for link in await nl.links(netns)]
    rules = [r for r in await nl.rules(netns) if TABLE_FIRST <= r.table < TABLE_FIRST + TABLE_COUNT]
    out = {p: sum(1 for name in links if name.startswith(p)) for p in LINK_PREFIXES}
    out["rules"] = len(rules)
    return out


class BenchLab(Lab):
    """The demo's cluster (:class:`nsm.lab.Lab`) for a benchmark: its namespaces are
    ``nsmb<pid>-<name>`` (so :func:`sweep_stale` finds them after a SIGKILL), 60 s to start, and
    what the benchmarks read of it. Secure (mTLS, tokens) unless ``secure=False``; ``tag``
    tells two labs of one benchmark apart (``nsmb<pid>_<tag>-<name>``)."""

    def __init__(self, topology: Topology, *, secure: bool = True, tag: str = "") -> None:
        prefix = f"{NS_PREFIX}{os.getpid()}" + (f"_{tag}" if tag else "")
        super().__init__(topology, prefix=prefix, start_timeout=60.0, secure=secure)

    def pids(self) -> dict[str, int | None]:
        return {key: d.pid for key, d in self.daemons.items()}

    def memory(self) -> dict[str, dict[str, int | None]]:
        """VmRSS and VmHWM of every daemon (KiB)."""
        return {key: rss_kb(pid) for key, pid in self.pids().items()}

    def log_problems(self, limit: int = 5) -> dict[str, Any]:
        """:func:`log_problems` of the daemons' logs."""
        return log_problems(self.logs().items(), limit)

    async def leftovers(self, nl: Netlink) -> dict[str, dict[str, int]]:
        """:func:`node_state` of every node; all zero when every connection was removed."""
        return {name: await node_state(nl, node.netns) for name, node in self.nodes.items()}

    async def check_leftovers(self, nl: Netlink, failures: Failures, what: str
                              ) -> dict[str, dict[str, int]]:
        """:meth:`leftovers`, counted as a failure unless all zero."""
        left = await self.leftovers(nl)
        if any(v for node in left.values() for v in node.values()):
            failures.add(what, CheckFailed(f"left on the nodes: {left}"))
        return left


# ------------------------------------------------------------------------------------ hand-built

UNDERLAY = ipaddress.IPv4Network("172.30.0.0/24")
UNDERLAY_MTU = 1500
#: Underlay MTU minus the VXLAN/IPv4 overhead: what the forwarders give both pod interfaces.
TUNNEL_MTU = UNDERLAY_MTU - 50
NODE_IF = "eth0"


@dataclass(frozen=True)
class HandNode:
    """A hand-built node: its namespace and underlay address."""

    name: str
    netns: str
    ip: str


class Fabric:
    """Nodes built directly with Netlink, the way :mod:`nsm.lab` builds them: a fabric
    namespace with bridge ``br0``; per node a namespace whose ``eth0`` (172.30.0.<i>/24, MTU
    1500) is a port of the bridge, and ``ip_forward=1``. Everything lives in ``scratch``."""

    def __init__(self, scratch: Scratch, nl: Netlink) -> None:
        self.scratch = scratch
        self.nl = nl
        self.nodes: list[HandNode] = []

    async def build(self, n_nodes: int = 2) -> list[HandNode]:
        nl = self.nl
        fabric = self.scratch.netns("fab")
        await nl.create_bridge("br0", fabric, mtu=UNDERLAY_MTU)
        await nl.set_up(fabric, "br0")
        for i in range(1, n_nodes + 1):
            name = f"node{i}"
            ns = self.scratch.netns(name)
            ip = str(UNDERLAY.network_address + i)
            await nl.create_veth(NODE_IF, ns, name, fabric, mtu=UNDERLAY_MTU)
            await nl.set_master(fabric, name, "br0")
            await nl.set_up(fabric, name)
            await nl.setup_interface(ns, NODE_IF, addresses=[f"{ip}/{UNDERLAY.prefixlen}"],
                                     routes=[], mtu=UNDERLAY_MTU)
            await nl.set_sysctl_in_netns(ns, "net.ipv4.ip_forward", 1)
            self.nodes.append(HandNode(name, ns, ip))
        nl.forget(fabric)
        return self.nodes


# ------------------------------------------------------------------------------------ registry


@dataclass
class Options:
    """What ``bench.run`` passes to every benchmark; each picks its own defaults from
    ``quick`` when ``n``/``concurrency`` are not given."""

    quick: bool = False
    n: int | None = None
    concurrency: int | None = None
    keep_logs: bool = False
    #: Seconds to wait between phases so the kernel finishes destroying namespaces.
    settle: float = 1.0
    #: Bench-specific settings (``--set key=value``).
    extra: dict[str, str] = field(default_factory=dict)

    def flag(self, key: str) -> bool:
        """A bench-specific switch, on unless set to 0, false or no."""
        return self.extra.get(key, "1") not in ("0", "false", "no")


@dataclass
class Bar:
    """A target: ``value`` must be at most ``limit`` (e.g. a ratio against a floor)."""

    name: str
    value: float | None
    limit: float
    unit: str = "x"

    @property
    def ok(self) -> bool:
        return self.value is not None and self.value <= self.limit

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


@dataclass(frozen=True)
class Bench:
    """A registered benchmark: ``run(options) -> result dict``, ``table(result) -> text``, and
    ``headline(result) -> {figure: value}``: the few figures compared across repeated runs
    (best-of and spread); lower is better unless the name ends with ``/s``."""

    name: str
    doc: str
    run: Callable[[Options], Awaitable[dict[str, Any]]]
    table: Callable[[dict[str, Any]], str]
    headline: Callable[[dict[str, Any]], dict[str, float | None]] | None = None


def higher_is_better(figure: str) -> bool:
    """The naming convention of headline figures: rates (``.../s``) are better higher."""
    return figure.endswith("/s")


def spread(runs: Sequence[dict[str, float | None]]) -> dict[str, dict[str, Any]]:
    """Per headline figure over repeated runs: best, median, worst and every value."""
    out: dict[str, dict[str, Any]] = {}
    names = [k for run in runs for k in run]
    for name in dict.fromkeys(names):
        values = [v for run in runs if (v := run.get(name)) is not None and not math.isnan(v)]
        if not values:
            continue
        ordered = sorted(values, reverse=higher_is_better(name))
        out[name] = {"best": ordered[0], "median": round(statistics.median(ordered), 3),
                     "worst": ordered[-1], "values": values}
    return out


def spread_table(name: str, summary: dict[str, dict[str, Any]]) -> str:
    """The :func:`spread` of one benchmark as a human table."""
    runs = max((len(s["values"]) for s in summary.values()), default=0)
    width = max((len(f) for f in summary), default=10)
    head = f"{f'{name}: best-of-{runs} and spread':<{width + 2}} {'best':>9} {'median':>9} {'worst':>9}"
    lines = [head, "-" * len(head)]
    for figure, s in summary.items():
        lines.append(f"  {figure:<{width}} {fmt(s['best'], 9)} {fmt(s['median'], 9)} "
                     f"{fmt(s['worst'], 9)}")
    return "\n".join(lines)


@contextlib.contextmanager
def sigterm_cancels(task: asyncio.Task[Any]) -> Iterator[None]:
    """While inside, SIGTERM cancels ``task`` (as Ctrl-C does under ``asyncio.run``), so its
    cleanup runs."""
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            loop.remove_signal_handler(signal.SIGTERM)


def outcome_lines(result: dict[str, Any]) -> list[str]:
    """The end of every benchmark's table: each bar and its verdict, the failure count with the
    first failures, and the warnings/errors found in the daemons' logs."""
    lines = []
    for b in result.get("bars", []):
        lines.append(f"bar: {b['name']} = {fmt(b['value'], 0, 3)} ({b.get('op', '<=')} "
                     f"{b['limit']}): {'ok' if b['ok'] else 'MISSED'}")
    problems = result.get("daemon_log_problems") or {}
    lines.append(f"failures: {result.get('failures')}; daemon log warnings/errors: "
                 f"{problems.get('count', '-')}")
    lines += [f"  {text}" for text in result.get("failure_examples", []) + problems.get("first", [])]
    return lines


def fmt(value: float | None, width: int = 8, digits: int = 2) -> str:
    """A number for a table cell (``-`` when missing)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return f"{'-':>{width}}"
    return f"{value:>{width}.{digits}f}"


# ------------------------------------------------------------------------------------ command line


def cli(module_doc: str, runner: Callable[..., Awaitable[dict[str, Any]]],
        render: Callable[[dict[str, Any]], str], argv: list[str] | None,
        extra: Callable[[argparse.ArgumentParser], None] | None = None) -> int:
    """The ``main()`` of a benchmark run on its own: JSON on stdout (and ``--json``), the human
    table on stderr; exit 0, 1 (failures), 2 (not root) or 130 (interrupted)."""
    parser = argparse.ArgumentParser(description=summary(module_doc))
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke)")
    parser.add_argument("--json", metavar="FILE", help="also write the JSON result to FILE")
    if extra is not None:
        extra(parser)
    args = vars(parser.parse_args(argv))
    json_path = args.pop("json")
    if os.geteuid() != 0:
        say("needs root (network namespaces)")
        return 2
    async def run() -> dict[str, Any]:
        async with grpc_runtime():
            return await runner(**args)

    try:
        result = asyncio.run(run())
    except KeyboardInterrupt:
        say("interrupted; everything it created was removed")
        return 130
    emit_json(result, json_path)
    say(render(result))
    return 1 if result.get("failures") else 0


def emit_json(doc: dict[str, Any], path: str | None) -> None:
    """The JSON document on stdout, and into ``path`` when given."""
    text = json.dumps(doc, indent=2, default=str)
    print(text, flush=True)
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")


def size_options(parser: argparse.ArgumentParser, default_n: int, default_concurrency: int) -> None:
    """``--n`` and ``--concurrency``, None when not given (the benchmark's default)."""
    parser.add_argument("--n", type=int, default=None, help=f"connections ({default_n})")
    parser.add_argument("--concurrency", type=int, default=None,
                        help=f"in flight at once ({default_concurrency})")

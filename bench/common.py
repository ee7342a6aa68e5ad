"""Shared pieces of the benchmarks: statistics, machine facts, CPU accounting, a scratch area
(namespaces, daemons, a work directory) that is always removed, and the bench registry types.

Every benchmark is a :class:`Bench`: an async function taking :class:`Options` and returning one
JSON-serialisable dict with at least ``name``, ``failures`` (int) and ``bars`` (list of
:class:`Bar` dicts), plus a function rendering that dict as a human table. ``bench.run`` runs
the registered ones and gathers their dicts into one document.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from nsm.kernel import netns as nsns
from nsm.lab.processes import Daemon

#: Prefix of every namespace a benchmark creates: ``nsmb<pid>-...`` (see :func:`sweep_stale`).
NS_PREFIX = "nsmb"

_CLK_TCK = os.sysconf("SC_CLK_TCK")


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
    """Delete namespaces left by a benchmark process that died without cleaning up (killed
    with SIGKILL): names ``nsmb<pid>-...`` whose ``<pid>`` is no longer running. Namespaces of
    running benchmarks and everything else are left alone. Returns the names removed."""
    removed = []
    for name in nsns.list_netns():
        if not name.startswith(NS_PREFIX):
            continue
        pid_text = name[len(NS_PREFIX):].split("-", 1)[0]
        if not pid_text.isdigit() or int(pid_text) == os.getpid():
            continue
        if Path(f"/proc/{pid_text}").exists():
            continue
        with contextlib.suppress(Exception):
            nsns.delete_netns(name)
            removed.append(name)
    return removed


class Scratch:
    """Namespaces, daemon processes and a work directory of one benchmark, all removed by
    :meth:`aclose` (also on failure and Ctrl-C: use ``async with``).

    Namespace names are ``nsmb<pid>-<label>``; daemons log to ``<work>/<name>.log``.
    """

    def __init__(self, label: str, *, keep_logs: bool = False) -> None:
        self.tag = f"{NS_PREFIX}{os.getpid()}-{label}"
        self.work = Path(tempfile.mkdtemp(prefix=f"{self.tag}-"))
        self.keep_logs = keep_logs
        self.namespaces: list[str] = []
        self.daemons: list[Daemon] = []

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
        d = Daemon(name, argv, url=url, env=env, log_path=self.work / f"{name}.log")
        self.daemons.append(d)
        await d.start()
        return d

    def log_problems(self, limit: int = 5) -> dict[str, Any]:
        """Warning and error lines in the daemons' logs: a count and the first few."""
        lines: list[str] = []
        count = 0
        for d in self.daemons:
            if d.log_path is None or not d.log_path.exists():
                continue
            for line in d.log_path.read_text(errors="replace").splitlines():
                parts = line.split(maxsplit=2)
                if len(parts) >= 2 and parts[1] in ("warning", "error", "critical"):
                    count += 1
                    if len(lines) < limit:
                        lines.append(f"{d.name}: {line[:300]}")
                elif line.startswith("Traceback"):
                    count += 1
                    if len(lines) < limit:
                        lines.append(f"{d.name}: {line[:300]}")
        return {"count": count, "first": lines}

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

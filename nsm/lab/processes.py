"""Processes of the emulated cluster, the demo, the benchmarks and the tests: ``nsm`` daemons
started as real processes (optionally inside a network namespace) that are waited for until they
serve, stopped with SIGTERM and killed if they hang; and processes found by pid — whether one is
still the same process, which ones live in given namespaces, ending them — so that nothing is
left behind even when the process that started them is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

import nsm
from nsm.errors import Unavailable
from nsm.security.tls import Security
from nsm.transport import dial

#: Where the ``nsm`` package this process runs comes from: daemons run the same code.
NSM_ROOT = str(Path(nsm.__file__).resolve().parents[1])


def daemon_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a daemon: this one without ``NSM_*`` (every flag reads one: an
    ``NSM_SERVICE`` meant for one command would add a service to every endpoint), with the
    ``nsm`` package this process imported first on ``PYTHONPATH``, unbuffered output, then
    ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NSM_")}
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = NSM_ROOT + (os.pathsep + path if path else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class Daemon:
    """One ``nsm <role> ...`` process (``args`` after ``nsm``), inside ``netns`` if given
    (through :mod:`nsm.lab.netns_exec`), output appended to ``log_path``; its environment is
    :func:`daemon_env` plus ``env``."""

    def __init__(self, name: str, args: Sequence[str], *, url: str,
                 env: Mapping[str, str] | None = None, log_path: Path | None = None,
                 netns: str | None = None, security: Security | None = None) -> None:
        self.name = name
        #: The identity :func:`wait_serving` asks with.
        self.security = security
        self.args = list(args)
        self.url = url
        self.env = dict(env or {})
        self.log_path = log_path
        self.netns = netns
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, timeout: float = 15.0) -> Daemon:
        cmd = [sys.executable, "-m", "nsm.cli", *self.args]
        if self.netns:
            cmd = [sys.executable, "-m", "nsm.lab.netns_exec", self.netns, "--", *cmd]
        out = (os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
               if self.log_path else asyncio.subprocess.DEVNULL)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *cmd, env=daemon_env(self.env), stdin=asyncio.subprocess.DEVNULL, stdout=out,
                stderr=out, start_new_session=True)
        finally:
            if self.log_path:
                os.close(out)
        try:
            await wait_serving(self.url, timeout=timeout, proc=self.proc, security=self.security)
        except BaseException:
            await self.stop()
            raise
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        """Started and not exited (nor stopped or killed)."""
        return self.proc is not None and self.proc.returncode is None

    async def stop(self, timeout: float = 5.0) -> int | None:
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        return proc.returncode

    async def kill(self) -> None:
        """Kill without a chance to clean up (to test healing and expiry)."""
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()
        self.proc = None


async def wait_serving(url: str, *, timeout: float = 15.0,
                       proc: asyncio.subprocess.Process | None = None,
                       security: Security | None = None) -> None:
    """Wait until the gRPC health service at ``url`` says SERVING."""
    deadline = time.monotonic() + timeout
    channel = dial(url, security)
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if proc is not None and proc.returncode is not None:
                raise Unavailable(f"process exited with {proc.returncode} before serving {url}")
            try:
                resp = await stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise Unavailable(f"{url} is not serving after {timeout:.0f}s")
            await asyncio.sleep(0.05)
    finally:
        await channel.close()


def tail(path: Path | None, lines: int | None = None) -> str:
    """The last ``lines`` lines of a log file (all of it for None; "" if there is none)."""
    if path is None:
        return ""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    if lines is None:
        return text
    return "\n".join(text.splitlines()[-lines:])


# ---------------------------------------------------------------------------------- by pid


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (None if it is gone or a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2:].split()
    if fields[0] == b"Z":
        return None
    return int(fields[19])


def identity(pid: int) -> dict[str, Any]:
    """What tells this process apart from a later one with the same pid (for state files)."""
    return {"pid": pid, "start_time": start_time(pid)}


def is_alive(pid: int | None, start: int | None = None) -> bool:
    """Whether ``pid`` runs (and, if its ``start`` time is given, is still the same process)."""
    if not pid:
        return False
    now = start_time(pid)
    return now is not None and (start is None or now == start)


def pids_in_netns(paths: Iterable[str]) -> list[int]:
    """Processes (other than this one) whose network namespace is one of ``paths``."""
    inodes = set()
    for path in paths:
        with contextlib.suppress(OSError):
            inodes.add(f"net:[{os.stat(path).st_ino}]")
    if not inodes:
        return []
    found = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            if os.readlink(f"/proc/{entry}/ns/net") in inodes:
                found.append(int(entry))
        except OSError:
            continue
    return found


def pids_naming(text: str) -> list[tuple[int, str]]:
    """Live processes (other than this one) whose command line contains ``text``, with it."""
    found: list[tuple[int, str]] = []
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                raw = f.read()
        except OSError:  # exited meanwhile
            continue
        cmd = raw.replace(b"\0", b" ").decode(errors="replace").strip()
        if text in cmd:  # a zombie has an empty command line: only live processes count
            found.append((int(entry.name), cmd))
    return found


def end_pids(pids: Sequence[tuple[int, int | None]], timeout: float) -> list[int]:
    """SIGTERM each (pid, start time) still alive, wait up to ``timeout``, then SIGKILL; returns
    the pids that were alive."""
    alive = [(p, st) for p, st in pids if is_alive(p, st)]
    for pid, _ in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(is_alive(p, st) for p, st in alive) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid, st in alive:
        if is_alive(pid, st):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return [p for p, _ in alive]


def end_processes_in(paths: Iterable[str], timeout: float = 5.0) -> list[int]:
    """End (SIGTERM, then SIGKILL) every process inside the given network namespaces."""
    return end_pids([(p, start_time(p)) for p in pids_in_netns(paths)], timeout)

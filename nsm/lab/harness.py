"""One harness for the tests and the benchmarks: waiting, leak checks, monitor snapshots and
daemon logs, and :class:`LabHarness`, a running :class:`~nsm.lab.builder.Lab` with what a test
(or a benchmark phase) does with it.

- Waiting: :func:`eventually` (a sync or async check, a timeout, what is awaited).
- Leak checks: :func:`no_leaked_tasks` (asyncio tasks); :func:`find_leftovers` (namespaces,
  processes and root-namespace links a run left, found by the names it gave them);
  :func:`open_fds`, :func:`namespace_fds` (file descriptors); :class:`NetnsGroup` (namespaces
  made for one test, removed together). Per test, :meth:`LabHarness.scope` checks that what the
  test made is gone: connections in every daemon's monitor, interfaces in endpoints' pods,
  per-connection links and policy routing on the nodes, processes in its pods, namespace file
  descriptors, stopped daemons.
- Counting what a lab holds (:mod:`nsm.lab.census`): :meth:`LabHarness.census` (kernel objects
  per namespace, each daemon's file descriptors and ``status``, registrations, this process's
  tasks and fds), :meth:`LabHarness.daemon_status` (one daemon's SIGUSR1 status).
- Monitor snapshots: :func:`monitor_snapshot` (the ``INITIAL_STATE_TRANSFER`` of
  ``MonitorConnections``) over :class:`Channels` (one cached channel per URL).
- Daemon logs: :class:`LogMarks` (what each log got since a mark), :func:`failure_logs` (the
  sections a failed test's report gets).

Nothing here depends on pytest: ``tests/conftest.py`` makes the fixtures and the report hook of
it. Traffic (pings, scapy, TCP) is :mod:`nsm.lab.traffic`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import os
import re
import signal
import socket
import sys
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import grpc

from nsm.api import connection_pb2_grpc
from nsm.api.connection_pb2 import (
    DOWN,
    INITIAL_STATE_TRANSFER,
    UPDATE,
    Connection,
    ConnectionEvent,
    Mechanism,
    MonitorScopeSelector,
)
from nsm.api.networkservice_pb2 import NetworkServiceRequest
from nsm.api.networkservice_pb2_grpc import NetworkServiceStub
from nsm.api.registry_pb2 import NetworkService, NetworkServiceEndpoint
from nsm.client.sdk import Client
from nsm.daemon import STATUS_SIGNAL
from nsm.elements.tokens import HopTokens
from nsm.kernel import netns as nsns
from nsm.kernel.netlink import LinkInfo, Netlink
from nsm.kernel.ping import PingResult, ping
from nsm.lab import traffic
from nsm.lab.builder import Lab
from nsm.lab.census import Census, fd_counts, kernel_counts, parse_status, rss_kib
from nsm.lab.leftovers import cleanup
from nsm.lab.processes import NSM_ROOT, Daemon, daemon_env, end_processes_in, pids_naming, tail
from nsm.lab.topology import Topology
from nsm.mechanisms import NETNS_INODE_URL, REMOTE
from nsm.registry.client import RegistryClient
from nsm.security.ids import FORWARDER, MANAGER, node_id
from nsm.security.netns import NetnsProof
from nsm.security.policy import Policies
from nsm.security.tls import Security
from nsm.transport import Channels as TransportChannels
from nsm.transport import dial
from nsm.wellknown import FORWARDER_SERVICE

#: Names of the per-connection links a forwarder makes in its node's namespace.
TUNNEL_PREFIXES = ("nsv", "nsx", "nsb")
#: Tables of a fresh namespace (local, main, default) and the priorities of its rules.
STANDARD_TABLES = frozenset({253, 254, 255})
STANDARD_RULES = frozenset({0, 32766, 32767})
#: Links the mesh or a lab make (client and endpoint interfaces, per-connection links, fabric
#: ports named after nodes, the fabric bridge): none of them may ever appear in the root namespace.
MESH_LINK = re.compile(r"^(ns[mvxb]|node\d|br0$)")
#: Lines of a daemon's log that say little and crowd out the rest (grpc's and pyroute2's debug output).
LOG_NOISE = ("_cygrpc] Loaded running loop", "debug pyroute2.netlink.core ")

# ---------------------------------------------------------------------------------- waiting

#: ``await eventually(check, timeout=..., what=...)``
Eventually = Callable[..., Awaitable[Any]]


async def eventually(check: Callable[[], Any], *, timeout: float = 10.0, what: str = "condition",
                     interval: float = 0.02) -> Any:
    """Wait until ``check()`` (a function or a coroutine function) returns something true, and
    return it; AssertionError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached within {timeout}s")
        await asyncio.sleep(interval)


# ---------------------------------------------------------------------------------- leaks


@contextlib.asynccontextmanager
async def no_leaked_tasks(grace: float = 2.0) -> AsyncIterator[None]:
    """The block leaves no asyncio task of its own behind (given ``grace`` seconds to finish)."""
    before = asyncio.all_tasks()
    yield
    deadline = time.monotonic() + grace
    while True:
        leaked = {t for t in asyncio.all_tasks() - before
                  if t is not asyncio.current_task() and not t.done()}
        if not leaked or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.02)
    if leaked:
        raise AssertionError(f"leaked tasks: {leaked}")


def root_links() -> set[str]:
    """Names of the links in this process's network namespace."""
    return {name for _, name in socket.if_nameindex()}


def open_fds() -> dict[int, str]:
    """This process's open file descriptors and what each one is (``readlink``)."""
    fds = {}
    for entry in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own fd, closed meanwhile
            fds[int(entry)] = os.readlink(f"/proc/self/fd/{entry}")
    return fds


def namespace_fds() -> dict[int, int]:
    """This process's file descriptors that hold a namespace (any kind, on the nsfs file
    system), and the namespace's inode. One keeps a deleted namespace, and its links, alive."""
    nsfs = os.stat("/proc/self/ns/net").st_dev
    found = {}
    for entry in os.listdir("/proc/self/fd"):
        try:
            st = os.fstat(int(entry))
        except OSError:  # the listing's own fd, closed meanwhile
            continue
        if st.st_dev == nsfs:
            found[int(entry)] = st.st_ino
    return found


def leaked_namespace_fds(before: Mapping[int, int]) -> list[str]:
    """Namespace file descriptors open now that were not in ``before`` (:func:`namespace_fds`)."""
    return [f"fd {fd} holds namespace inode {ino}" for fd, ino in sorted(namespace_fds().items())
            if before.get(fd) != ino]


class NetnsGroup:
    """Namespaces made for one test (or benchmark), all named ``<prefix>-<tag>``, removed
    together by :meth:`cleanup` (also those made with a name from :meth:`name`)."""

    def __init__(self, prefix: str) -> None:
        nsns.netns_path(prefix)  # validates the characters
        self.prefix = prefix
        self.names: list[str] = []

    def name(self, tag: str) -> str:
        """A name in this group, for a namespace the caller creates itself."""
        return f"{self.prefix}-{tag}"

    def __call__(self, tag: str = "ns") -> str:
        """Create ``<prefix>-<tag><n>`` and return its path."""
        name = self.name(f"{tag}{len(self.names)}")
        self.names.append(name)
        return nsns.create_netns(name)

    def leftovers(self) -> list[str]:
        return [n for n in nsns.list_netns() if n.startswith(self.prefix + "-")]

    def cleanup(self) -> None:
        for name in self.leftovers():
            nsns.delete_netns(name)


@dataclass
class Leftovers:
    """What a run left behind (see :func:`find_leftovers`)."""

    namespaces: list[str] = field(default_factory=list)
    processes: list[tuple[int, str]] = field(default_factory=list)
    links: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.namespaces or self.processes or self.links)

    def lines(self) -> list[str]:
        return ([f"  network namespace {n}" for n in self.namespaces]
                + [f"  process {pid}: {cmd[:200]}" for pid, cmd in self.processes]
                + [f"  link {n} in the root namespace" for n in self.links])

    def remove(self) -> None:
        """Kill the processes (SIGKILL) and delete the namespaces (links are reported only)."""
        for pid, _ in self.processes:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        for name in self.namespaces:
            with contextlib.suppress(Exception):
                nsns.delete_netns(name)


def find_leftovers(markers: Sequence[str], *, links_before: set[str] | None = None) -> Leftovers:
    """Named namespaces whose name starts with one of ``markers``, live processes whose command
    line contains one, and (with ``links_before``) links of the mesh's kinds (:data:`MESH_LINK`)
    that appeared in this process's namespace since."""
    found = Leftovers()
    found.namespaces = [n for n in nsns.list_netns() if n.startswith(tuple(markers))]
    seen: set[int] = set()
    for marker in markers:
        for pid, cmd in pids_naming(marker):
            if pid not in seen:
                seen.add(pid)
                found.processes.append((pid, cmd))
    if links_before is not None:
        found.links = sorted(n for n in root_links() - links_before if MESH_LINK.match(n))
    return found


# ---------------------------------------------------------------------------------- monitors


async def monitor_snapshot(channel: grpc.aio.Channel, *, timeout: float = 5.0) -> dict[str, Connection]:
    """The connections a ``MonitorConnections`` server knows now: its first event (the
    ``INITIAL_STATE_TRANSFER``), by connection id."""
    call = connection_pb2_grpc.MonitorConnectionStub(channel).MonitorConnections(
        MonitorScopeSelector(), timeout=timeout)
    try:
        event: ConnectionEvent = await call.read()
    finally:
        call.cancel()
    if event is grpc.aio.EOF:
        raise AssertionError("the monitor ended without a snapshot")
    return dict(event.connections)


class Channels:
    """One gRPC channel per URL, made on first use, all closed by :meth:`close`."""

    def __init__(self, security: Security | None = None) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.security = security

    def get(self, url: str) -> grpc.aio.Channel:
        channel = self._channels.get(url)
        if channel is None:
            channel = self._channels[url] = dial(url, self.security)
        return channel

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            with contextlib.suppress(Exception):
                await channel.close()


# ---------------------------------------------------------------------------------- logs


class LogMarks:
    """The ``*.log`` files of a directory, and what each one got since :meth:`mark` (a test's
    share of the logs of daemons that live longer than the test)."""

    def __init__(self, directory: Path, *, noise: Sequence[str] = LOG_NOISE) -> None:
        self.directory = directory
        self.noise = tuple(noise)
        self._marks: dict[Path, int] = {}

    def paths(self) -> list[Path]:
        return sorted(self.directory.glob("*.log"))

    def mark(self) -> None:
        self._marks = {}
        for p in self.paths():
            with contextlib.suppress(OSError):
                self._marks[p] = p.stat().st_size

    def since_mark(self, path: Path) -> str:
        """What ``path`` got since the mark (all of it if it is newer)."""
        with path.open("rb") as f:
            f.seek(self._marks.get(path, 0))
            return f.read().decode(errors="replace")

    def sections(self, lines: int = 200) -> list[tuple[str, str]]:
        """(log name, its last ``lines`` lines since the mark) for each log that got any."""
        out = []
        for path in self.paths():
            try:
                text = self.since_mark(path)
            except OSError:
                continue
            kept = [ln for ln in text.splitlines() if not any(n in ln for n in self.noise)]
            if kept:
                out.append((path.stem, "\n".join(kept[-lines:])))
        return out


def failure_logs(value: Any, lines: int = 200) -> list[tuple[str, str]]:
    """The daemon logs to show with a failed test for a fixture value: a :class:`LabHarness`'s
    since the test began, a :class:`Lab`'s last ``lines`` lines; nothing for anything else."""
    if isinstance(value, LabHarness):
        return value.logs.sections(lines)
    if isinstance(value, Lab):
        return [(key, text) for key, text in value.logs(lines).items() if text]
    return []


# ---------------------------------------------------------------------------------- lab harness


@dataclass
class Nse:
    """An endpoint process a harness started (:meth:`LabHarness.start_nse`)."""

    name: str
    services: list[str]
    cidr: str
    netns: str
    url: str
    daemon: Daemon
    node: str
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


class LabHarness:
    """A running lab plus what tests and benchmarks do with it: fresh pods, clients, daemons and
    processes that go away at the end of a :meth:`scope`; traffic; views of the nodes' kernel
    state and the daemons' monitors; the check that a scope left nothing behind; the daemons'
    logs since the scope began.

    Build one with :meth:`running` (``async with LabHarness.running(topology, prefix=...)``);
    subclasses add what their tests share and may override :meth:`setup` (run once the lab is
    up, before the harness is handed out)."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.prefix = lab.prefix
        self.netlink = Netlink()
        self.channels = Channels(lab.security)
        #: Channels of the identities raw calls are signed with (:meth:`raw_request`).
        self._signing: dict[str, TransportChannels] = {}

        self.logs = LogMarks(lab.log_dir)
        #: Endpoints started with :meth:`start_nse`, by name (while they run).
        self.nses: dict[str, Nse] = {}
        #: Leftovers a failed scope was already blamed for (later scopes fail only on their own).
        self.known_leftovers: set[str] = set()
        self._count = itertools.count(1)
        self._stack: contextlib.AsyncExitStack | None = None
        self._scope_pods: list[str] = []
        self._session_pods: list[str] = []

    # -- lifecycle --------------------------------------------------------------------------

    @classmethod
    @contextlib.asynccontextmanager
    async def running(cls, topology: Topology, *, prefix: str, **lab_kwargs: Any) -> AsyncIterator[Self]:
        """Build the lab, :meth:`setup`, yield the harness; then close it, tear the lab down
        and remove whatever else carries the lab's prefix (also after a failure)."""
        try:
            async with Lab(topology, prefix=prefix, **lab_kwargs) as lab:
                harness = cls(lab)
                try:
                    await harness.setup()
                    yield harness
                finally:
                    await harness.close()
        finally:
            await asyncio.to_thread(cleanup, prefix, state_dir=None)

    async def setup(self) -> None:
        """Run once the lab is up (nothing here)."""

    async def close(self) -> None:
        for name in reversed(list(self.nses)):
            with contextlib.suppress(Exception):
                await self.lab.remove_daemon(name)
        self.nses.clear()
        await self.channels.close()
        for channels in self._signing.values():
            await channels.close()
        self._signing.clear()
        await self.netlink.close()
        for name in self._session_pods:
            with contextlib.suppress(Exception):
                nsns.delete_netns(name)
        self._session_pods.clear()

    @contextlib.asynccontextmanager
    async def scope(self, *, check: bool = True, grace: float = 5.0) -> AsyncIterator[Self]:
        """One test (or benchmark phase): what it makes through the harness goes at the end —
        clients closed, daemons and processes stopped, then pods deleted — even when it fails.
        Then, with ``check``, it must have left nothing (:meth:`leftovers`, stopped daemons,
        processes in its pods, namespace file descriptors), given ``grace`` seconds."""
        self.logs.mark()
        previous, self.netlink = self.netlink, Netlink()  # its sockets must not pin deleted pods
        await previous.close()
        fds = namespace_fds()
        problems: list[str] = []
        try:
            try:
                async with contextlib.AsyncExitStack() as stack:
                    self._stack = stack
                    try:
                        yield self
                    finally:
                        self._stack = None
            finally:
                problems += await self._delete_scope_pods()
            if check:
                await self.check_clean(grace=grace, problems=problems)
        finally:
            await self.netlink.close()
        if check:
            self._blame(leaked_namespace_fds(fds), "the test left namespace file descriptors open")

    @property
    def stack(self) -> contextlib.AsyncExitStack:
        if self._stack is None:
            raise AssertionError("not inside a scope (use the per-test fixture)")
        return self._stack

    async def _delete_scope_pods(self) -> list[str]:
        pods, self._scope_pods = self._scope_pods, []
        if not pods:
            return []
        stray = await asyncio.to_thread(end_processes_in, [nsns.netns_path(n) for n in pods], 5.0)
        for name in pods:
            with contextlib.suppress(Exception):
                nsns.delete_netns(name)
        return [f"process {pid} left in a pod of the test" for pid in stray]

    async def check_clean(self, *, grace: float = 5.0, problems: Sequence[str] = ()) -> None:
        """AssertionError unless the lab is as a scope must leave it (see :meth:`scope`); waits
        up to ``grace`` seconds for stray timers before blaming."""
        deadline = time.monotonic() + grace
        while True:
            found = list(problems) + self.stopped_daemons() + await self.leftovers()
            new = [p for p in found if p not in self.known_leftovers]
            if not new or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        self._blame(new, "the test left things in the lab")

    def _blame(self, new: Sequence[str], what: str) -> None:
        new = [p for p in new if p not in self.known_leftovers]
        if new:
            self.known_leftovers.update(new)
            raise AssertionError(f"{what}:\n  " + "\n  ".join(new))

    # -- names and things a test makes ------------------------------------------------------

    def name(self, label: str) -> str:
        """A unique name carrying the lab's prefix (endpoints, daemons, namespaces)."""
        return f"{self.prefix}-{label}{next(self._count)}"

    def sock(self, label: str) -> str:
        """A fresh unix socket URL in the lab's work directory."""
        assert self.lab.workdir is not None
        return f"unix://{self.lab.workdir}/{label}-{next(self._count)}.sock"

    async def pod(self, tag: str = "p") -> str:
        """A fresh empty namespace (``<lab prefix>-<tag><n>``; its path), deleted at the end of
        the scope after everything else the scope made (or with the harness, outside a scope)."""
        name = self.lab.ns_name(f"{tag}{next(self._count)}")
        path = nsns.create_netns(name)
        (self._scope_pods if self._stack is not None else self._session_pods).append(name)
        return path

    def pod_identity(self, netns: str) -> Security:
        """The identity of the pod of ``netns`` (``spiffe://<td>/ns/default/pod/<name>``), as
        ``nsm nsc`` takes it by default (started by its first use)."""
        return self.lab.pod_identity(netns)

    def manager_id(self, node: str) -> str | None:
        """The SPIFFE ID ``node``'s manager has (None when not secure)."""
        return self.lab.manager_id(node)

    def open_client(self, node: str, service: str, netns: str, **kwargs: Any) -> Client:
        """An SDK client of ``node``'s manager for a pod (with the pod's identity unless
        ``security`` is given), closed at the end of the scope."""
        kwargs.setdefault("security", self.pod_identity(netns))
        kwargs.setdefault("manager_id", self.lab.manager_id(node))
        client = Client(manager_url=self.lab.node(node).manager_url, service=service, netns=netns,
                        **kwargs)
        self.stack.push_async_callback(client.close)
        return client

    async def start_daemon(self, label: str, args: Sequence[str], *, url: str,
                           node: str | None = None, env: Mapping[str, str] | None = None,
                           timeout: float = 15.0) -> Daemon:
        """Any ``nsm`` daemon (``args`` after ``nsm``) in ``node``'s namespace (default the
        registry's), serving at ``url``; stopped at the end of the scope."""
        name = self.name(label)
        daemon = await self.lab.add_daemon(name, args, url=url, node=node, env=env, timeout=timeout)
        self.stack.push_async_callback(self._remove_daemon, name)
        return daemon

    async def _remove_daemon(self, name: str) -> None:
        with contextlib.suppress(Exception):
            await self.lab.remove_daemon(name)

    async def start_nse(self, label: str = "nse", *, services: Sequence[str], cidr: str,
                        labels: Mapping[str, str] | None = None, expiry: float = 30.0,
                        netns: str | None = None, node: str | None = None,
                        registry: str | None = None, extra: Sequence[str] = (),
                        wait: bool = True) -> Nse:
        """One more endpoint on ``node`` (default the registry's), its interfaces in ``netns``
        (default a pod of its own), registering at ``registry`` (default through its node's
        manager, as the lab's endpoints do); waited for in the registry. Inside a scope it is
        stopped and unregistered at the end of the scope, else with the harness."""
        node = node or self.lab.registry_node
        ns = netns or await self.pod(f"{label}ns")
        name = self.name(label)
        assert self.lab.workdir is not None
        url = f"unix://{self.lab.workdir}/{name}.sock"
        argv = ["nse", "--name", name, "--cidr", cidr, "--netns", ns, "--listen", url,
                "--registry", registry or self.lab.node(node).manager_url, "--node", node,
                "--expiry", f"{expiry}s", "--log-level", self.lab.log_level]
        for s in services:
            argv += ["--service", s]
        for k, v in (labels or {}).items():
            argv += ["--label", f"{k}={v}"]
        argv += list(extra)
        daemon = await self.lab.add_daemon(name, argv, url=url, node=node)
        nse = Nse(name, list(services), cidr, ns, url, daemon, node, dict(labels or {}))
        self.nses[name] = nse
        if self._stack is not None:
            self._stack.push_async_callback(self._stop_nse, nse)
        if wait:
            await self.wait_registered(name)
        return nse

    async def _stop_nse(self, nse: Nse) -> None:
        self.nses.pop(nse.name, None)
        await self._remove_daemon(nse.name)
        with contextlib.suppress(Exception):
            await self.registry_client().unregister_nse(nse.name)

    async def spawn_python(self, *args: str, env: Mapping[str, str] | None = None,
                           stdin: bool = True) -> asyncio.subprocess.Process:
        """``python ARGS`` with piped stdio (a daemon's environment plus ``env``), killed at the
        end of the scope."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, *args, cwd=NSM_ROOT, env=daemon_env({**self.lab.daemon_env, **(env or {})}),
            stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            start_new_session=True)

        async def reap() -> None:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(proc.communicate(), 5)

        self.stack.push_async_callback(reap)
        return proc

    async def spawn_cli(self, *args: str, env: Mapping[str, str] | None = None
                        ) -> asyncio.subprocess.Process:
        """``python -m nsm.cli ARGS`` with piped output, killed at the end of the scope."""
        return await self.spawn_python("-m", "nsm.cli", *args, env=env, stdin=False)

    @staticmethod
    async def nsc_connected(proc: asyncio.subprocess.Process, timeout: float = 30.0) -> str:
        """The first line an ``nsm nsc`` process printed (``connected id=... ...``, from
        :meth:`spawn_cli`); AssertionError with what it said otherwise."""
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout)).decode()
        if not line.startswith("connected "):
            err = await asyncio.wait_for(proc.stderr.read(), 5) if proc.stderr is not None else b""
            raise AssertionError(f"nsm nsc: {line!r} {err.decode()}")
        return line

    async def run_python(self, *args: str, env: Mapping[str, str] | None = None,
                         timeout: float = 30.0) -> CliResult:
        """Run ``python ARGS`` to completion."""
        proc = await self.spawn_python(*args, env=env, stdin=False)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, err = await proc.communicate()
            raise AssertionError(f"python {' '.join(args)} did not finish in {timeout}s: "
                                 f"{out.decode()} {err.decode()}") from None
        assert proc.returncode is not None
        return CliResult(proc.returncode, out.decode(), err.decode())

    async def run_cli(self, *args: str, env: Mapping[str, str] | None = None,
                      timeout: float = 30.0) -> CliResult:
        """Run ``nsm ARGS`` to completion."""
        return await self.run_python("-m", "nsm.cli", *args, env=env, timeout=timeout)

    # -- waiting and traffic ----------------------------------------------------------------

    async def eventually(self, check: Callable[[], Any], *, timeout: float, what: str,
                         interval: float = 0.1) -> Any:
        return await eventually(check, timeout=timeout, what=what, interval=interval)

    async def ping(self, netns: str, dst: str, **kwargs: Any) -> PingResult:
        return await asyncio.to_thread(ping, netns, dst, **kwargs)

    async def assert_ping(self, netns: str, dst: str, count: int = 2) -> None:
        """``count`` echo replies out of ``count + 1`` requests. One spare: under the full
        suite's load a single echo went unanswered twice in about a dozen runs (cause not
        found yet; never reproduced alone or under CPU load) — see docs/performance.md."""
        result = await self.ping(netns, dst, count=count + 1, interval=0.02)
        if result.lost:  # shown in the warnings summary: data for the open question
            warnings.warn(f"ping {dst} from {netns}: echo seq {result.lost} of {result.sent} "
                          f"unanswered (rtts {[round(r, 3) for r in result.rtts_ms]} ms)",
                          stacklevel=2)
        if result.received < count:
            raise AssertionError(f"ping {dst} from {netns}: {result.received}/{result.sent} "
                                 f"answered, lost seq {result.lost} {result.errors}")

    async def icmp(self, netns: str, src: str, dst: str, ident: int,
                   payload: bytes) -> dict[str, Any] | None:
        """A scapy ICMP echo from ``netns`` (src → dst): the reply's fields, or None."""
        return await asyncio.to_thread(nsns.run_in_netns, netns, traffic.icmp_echo, src, dst,
                                       ident, payload)

    async def arp(self, netns: str, iface: str, src: str, dst: str) -> dict[str, str] | None:
        """A scapy ARP who-has ``dst`` on ``iface``: the reply's fields, or None."""
        return await asyncio.to_thread(nsns.run_in_netns, netns, traffic.arp_who_has, iface,
                                       src, dst)

    async def l2(self, client_ns: str, client_if: str, server_ns: str, server_if: str,
                 frames: Sequence[tuple[str, int, bytes]],
                 ethertype: int) -> tuple[str, list[dict[str, Any]]]:
        """Raw Ethernet frames across (see :func:`nsm.lab.traffic.l2_frames_across`)."""
        return await asyncio.to_thread(traffic.l2_frames_across, client_ns, client_if, server_ns,
                                       server_if, frames, ethertype)

    async def tcp(self, client_ns: str, server_ns: str, server_addr: str, size: int) -> bytes:
        """A TCP echo of ``size`` bytes (see :func:`nsm.lab.traffic.tcp_exchange`)."""
        return await asyncio.to_thread(traffic.tcp_exchange, client_ns, server_ns, server_addr,
                                       size)

    # -- kernel state -----------------------------------------------------------------------

    async def links(self, netns: str) -> list[LinkInfo]:
        """The links of a namespace, without ``lo``."""
        return [link for link in await self.netlink.links(netns) if link.name != "lo"]

    async def link_names(self, netns: str) -> list[str]:
        return sorted(link.name for link in await self.links(netns))

    async def tunnel_links(self, node: str) -> dict[str, LinkInfo]:
        """The per-connection links (nsv/nsx/nsb) in a node's namespace, by name."""
        return {link.name: link for link in await self.netlink.links(self.lab.node(node).netns)
                if link.name.startswith(TUNNEL_PREFIXES)}

    async def iface_with(self, netns: str, cidr: str) -> LinkInfo:
        """The interface of ``netns`` that has the address ``cidr``."""
        for link in await self.links(netns):
            if cidr in await self.netlink.addresses(netns, link.name):
                return link
        raise AssertionError(f"no interface with {cidr} in {netns}: "
                             f"{await self.link_names(netns)}")

    async def policy(self, node: str) -> list[str]:
        """Policy rules and routing tables of a node that a fresh namespace does not have."""
        ns = self.lab.node(node).netns
        found = [f"rule {r}" for r in await self.netlink.rules(ns)
                 if r.priority not in STANDARD_RULES or r.table not in STANDARD_TABLES]
        found += [f"route {r}" for r in await self.netlink.routes(ns, table=None)
                  if r.table not in STANDARD_TABLES]
        return found

    # -- the daemons' view ------------------------------------------------------------------

    def channel(self, url: str) -> grpc.aio.Channel:
        return self.channels.get(url)

    # -- raw calls, signed as the hop's real caller -------------------------------------------

    def caller_of(self, url: str, mechanisms: Sequence[Mechanism] = ()) -> Security:
        """The identity the real caller of the hop at ``url`` has: a node's forwarder is called
        by that node's manager, an endpoint by its node's forwarder, a manager asked for a REMOTE
        mechanism by a forwarder; anything else by the lab."""
        for node in self.lab.nodes.values():
            if url == node.forwarder_url:
                return self.lab.identity(node_id(self.lab.trust_domain, node.name, MANAGER))
            if url in (node.manager_url, node.manager_tcp_url) and any(
                    m.cls == REMOTE for m in mechanisms):
                return self.lab.identity(node_id(self.lab.trust_domain, node.name, FORWARDER))
        for name, ep in [*((e.url, e.node) for e in self.lab.endpoints.values()),
                         *((n.url, n.node) for n in self.nses.values())]:
            if url == name:
                return self.lab.identity(node_id(self.lab.trust_domain, ep, FORWARDER))
        return self.lab.security

    async def _signed(self, url: str, conn: Connection, security: Security | None,
                      mechanisms: Sequence[Mechanism] = (), prove: bool = True,
                      ) -> tuple[grpc.aio.Channel, list[tuple[str, str]]]:
        security = security or self.caller_of(url, mechanisms)
        await security.start()
        channels = self._signing.get(security.id or "")
        if channels is None:
            channels = self._signing[security.id or ""] = TransportChannels(security=security)
        # Signed on a copy: the request goes as the test made it (a malformed expiry included),
        # the token in the metadata.
        copy = Connection()
        copy.CopyFrom(conn)
        metadata: list[tuple[str, str]] = []
        if copy.path.path_segments and copy.path.index < len(copy.path.path_segments):
            copy.path.path_segments[copy.path.index].ClearField("expires")
            metadata = await HopTokens(channels, Policies(next_token_signed=False)).sign(url, copy)
        for m in mechanisms:  # the caller proves the namespaces it names (until the scope ends)
            path = m.parameters.get(NETNS_INODE_URL, "")
            if prove and path.startswith("file://") and security.enabled and await asyncio.to_thread(
                    os.path.exists, path[7:]):
                await self.stack.enter_async_context(NetnsProof.listen(security, path[7:]))
        return channels.get(url), metadata

    async def raw_request(self, url: str, request: NetworkServiceRequest, *,
                          security: Security | None = None, timeout: float = 20.0,
                          prove: bool = True,
                          metadata: Sequence[tuple[str, str]] = ()) -> Connection:
        """``Request`` straight to the hop at ``url`` as its real caller would send it (signed by
        :meth:`caller_of`'s identity, or ``security``; the namespaces it names proven unless not
        ``prove``): how tests reach one hop with a request of their own. Raises the
        ``AioRpcError``."""
        channel, signed = await self._signed(url, request.connection, security,
                                             request.mechanism_preferences, prove)
        return await NetworkServiceStub(channel).Request(request, metadata=[*signed, *metadata],
                                                         timeout=timeout)

    async def raw_close(self, url: str, conn: Connection, *, security: Security | None = None,
                        timeout: float = 20.0) -> None:
        channel, metadata = await self._signed(url, conn, security)
        await NetworkServiceStub(channel).Close(conn, metadata=metadata, timeout=timeout)

    async def connections(self, url: str, timeout: float = 5.0) -> dict[str, Connection]:
        """The connections the monitor at ``url`` knows (its INITIAL_STATE_TRANSFER)."""
        try:
            return await monitor_snapshot(self.channel(url), timeout=timeout)
        except AssertionError:
            raise AssertionError(f"monitor at {url} ended without a snapshot") from None

    def registry_client(self) -> RegistryClient:
        return RegistryClient(self.channel(self.lab.registry_url), timeout=5.0)

    async def wait_registered(self, name: str, *, present: bool = True,
                              timeout: float = 10.0) -> None:
        """Wait until the registry has (or no longer has) the endpoint ``name``, plus a moment
        for the managers' watch of the registry to catch up."""
        client = self.registry_client()

        async def done() -> bool:
            return bool(await client.find_nse(NetworkServiceEndpoint(name=name))) == present

        await eventually(done, timeout=timeout, interval=0.05,
                         what=f"endpoint {name} {'' if present else 'un'}registered")
        await asyncio.sleep(0.1)

    async def forwarders(self) -> list[NetworkServiceEndpoint]:
        return await self.registry_client().find_nse(
            NetworkServiceEndpoint(network_service_names=[FORWARDER_SERVICE]))

    def monitor_urls(self, nodes: Sequence[str] | None = None) -> dict[str, str]:
        """Every running daemon with a connection monitor on the given nodes (default all), by
        key: ``manager.<node>``, ``forwarder.<node>``, ``nse.<name>`` and started endpoints'
        names."""
        nodes = list(nodes or self.lab.nodes)
        urls = {}
        for name in nodes:
            urls[f"manager.{name}"] = self.lab.node(name).manager_url
            urls[f"forwarder.{name}"] = self.lab.node(name).forwarder_url
        for name, ep in self.lab.endpoints.items():
            if ep.node in nodes:
                urls[f"nse.{name}"] = ep.url
        for name, nse in self.nses.items():
            if nse.node in nodes:
                urls[name] = nse.url
        daemons = self.lab.daemons
        return {key: url for key, url in urls.items() if key in daemons and daemons[key].running}

    def stopped_daemons(self) -> list[str]:
        """The lab's daemons that do not run (a scope must leave them all running)."""
        return [f"daemon {key} is not running" for key, d in self.lab.daemons.items()
                if not d.running]

    async def leftovers(self, nodes: Sequence[str] | None = None) -> list[str]:
        """Everything connection-related on the given nodes (default all): per-connection links,
        policy rules and tables, interfaces in endpoints' pods, connections in the monitors of
        the daemons that run. Empty when clean."""
        nodes = list(nodes or self.lab.nodes)
        problems = []
        for node in nodes:
            problems += [f"{node}: link {n}" for n in sorted(await self.tunnel_links(node))]
            problems += [f"{node}: {p}" for p in await self.policy(node)]
        pods = {f"pod of {name}": ep.netns for name, ep in self.lab.endpoints.items()
                if ep.node in nodes}
        pods.update({f"pod of {name}": nse.netns for name, nse in self.nses.items()
                     if nse.node in nodes})
        for what, netns in pods.items():
            problems += [f"{what}: interface {n}" for n in await self.link_names(netns)]
        for key, url in self.monitor_urls(nodes).items():  # one by one: each gets its timeout
            problems += [f"{key}: connection {cid}" for cid in sorted(await self.connections(url))]
        return problems

    async def assert_clean(self, nodes: Sequence[str] | None = None) -> None:
        problems = await self.leftovers(nodes)
        if problems:
            raise AssertionError("left behind:\n  " + "\n  ".join(problems))

    async def eventually_clean(self, timeout: float, nodes: Sequence[str] | None = None) -> float:
        """Wait until clean; returns the seconds it took (fails with the leftovers)."""
        t0 = time.monotonic()
        while True:
            problems = await self.leftovers(nodes)
            if not problems:
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"not clean after {timeout}s:\n  " + "\n  ".join(problems))
            await asyncio.sleep(0.1)

    # -- counting what the lab holds -------------------------------------------------------

    async def daemon_status(self, key: str, timeout: float = 10.0) -> dict[str, int]:
        """What a running daemon holds, as it counts it: the ``status`` line it logs on
        SIGUSR1 (see :mod:`nsm.daemon`), read back from its log."""
        daemon = self.lab.daemon(key)
        if daemon.pid is None or daemon.log_path is None or not daemon.running:
            raise AssertionError(f"daemon {key} does not run (or has no log)")
        start = daemon.log_path.stat().st_size
        os.kill(daemon.pid, STATUS_SIGNAL)
        deadline = time.monotonic() + timeout
        while True:
            with daemon.log_path.open("rb") as f:
                f.seek(start)
                text = f.read().decode(errors="replace")
            for line in text.split("\n")[:-1]:  # whole lines only
                status = parse_status(line)
                if status is not None:
                    return status
            if time.monotonic() > deadline:
                raise AssertionError(f"daemon {key} logged no status within {timeout}s")
            await asyncio.sleep(0.02)

    def census_namespaces(self, pods: Sequence[str] = ()) -> dict[str, str]:
        """The namespaces :meth:`census` counts, by label: nodes, the fabric, the endpoints'
        pods and ``pods`` (paths or names)."""
        spaces = {f"node {name}": node.netns for name, node in self.lab.nodes.items()}
        spaces["fabric"] = self.lab.fabric_netns
        spaces.update({f"pod of {name}": ep.netns for name, ep in self.lab.endpoints.items()})
        spaces.update({f"pod of {name}": nse.netns for name, nse in self.nses.items()})
        spaces.update({f"pod {os.path.basename(p)}": p for p in pods})
        return {label: os.path.basename(path) for label, path in spaces.items()}

    async def census(self, pods: Sequence[str] = ()) -> Census:
        """Everything the lab holds, counted (see :mod:`nsm.lab.census`): per namespace of
        :meth:`census_namespaces` its links, addresses, routes, rules and permanent neighbours;
        the root namespace's links; the lab's named namespaces; per running daemon its fds (by
        kind), resident memory (``rss_kib``) and its ``status``; the services and endpoints a
        Find at the registry returns; this process's asyncio tasks (but the caller's) and fds."""
        census = Census()
        census.counts["test: tasks"] = len(asyncio.all_tasks()) - 1  # before this makes any
        registry = self.registry_client()
        census.counts["registry: endpoints found"] = len(await registry.find_nse())
        census.counts["registry: services found"] = len(await registry.find_ns(NetworkService()))
        census.add("test", fd_counts())  # after the registry channel is up: it stays
        spaces = self.census_namespaces(pods)
        for label, counts in zip(spaces, await asyncio.gather(
                *(asyncio.to_thread(kernel_counts, ns) for ns in spaces.values())), strict=True):
            census.add(label, counts)
        census.add("root", await asyncio.to_thread(kernel_counts, None))
        census.counts["namespaces"] = sum(1 for n in nsns.list_netns() if n.startswith(self.prefix))
        running = {key: d for key, d in self.lab.daemons.items() if d.running and d.pid}
        statuses = await asyncio.gather(*(self.daemon_status(key) for key in running))
        for (key, daemon), status in zip(running.items(), statuses, strict=True):
            assert daemon.pid is not None
            census.add(key, fd_counts(daemon.pid))
            rss = rss_kib(daemon.pid)
            if rss is not None:
                census.counts[f"{key}: rss_kib"] = rss
            census.add(key, status)
        return census

    def daemon_log(self, daemon: Daemon) -> str:
        """What ``daemon`` logged since the scope began."""
        if daemon.log_path is None:
            return ""
        return self.logs.since_mark(daemon.log_path)

    def log_tail(self, key: str, lines: int | None = None) -> str:
        """The last lines of a daemon's whole log."""
        return tail(self.lab.daemon(key).log_path, lines)


class MonitorWatch:
    """One ``MonitorConnections`` stream of a daemon, read event by event (tests of monitoring).
    Each event must carry exactly one connection."""

    def __init__(self, channel: grpc.aio.Channel, selector: MonitorScopeSelector) -> None:
        self.call = connection_pb2_grpc.MonitorConnectionStub(channel).MonitorConnections(selector)

    async def initial(self, timeout: float = 5.0) -> dict[str, Connection]:
        event = await asyncio.wait_for(self.call.read(), timeout)
        assert event is not grpc.aio.EOF and event.type == INITIAL_STATE_TRANSFER, event
        return dict(event.connections)

    async def next(self, timeout: float) -> tuple[int, Connection]:
        event = await asyncio.wait_for(self.call.read(), timeout)
        assert event is not grpc.aio.EOF and len(event.connections) == 1, event
        (conn,) = event.connections.values()
        return event.type, conn

    async def until(self, kind: int, state: int | None, timeout: float) -> Connection:
        """The next event of ``kind`` (and ``state``), skipping refreshes' UPDATEs before it;
        a DOWN or any other event before it fails."""
        deadline = time.monotonic() + timeout
        while True:
            got, conn = await self.next(max(0.01, deadline - time.monotonic()))
            if got == kind and (state is None or conn.state == state):
                return conn
            assert got == UPDATE and conn.state != DOWN, (got, conn)

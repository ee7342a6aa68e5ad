"""Fixtures for the end-to-end tests of the single-node mesh: real ``nsm`` processes
(registry, manager, forwarder, endpoints) on unix sockets, pods as network namespaces.

- ``mesh_session`` (one per xdist worker): the registry, manager, forwarder and a main endpoint
  (service :data:`SERVICE`, CIDR :data:`CIDR`), started as :class:`nsm.lab.processes.Daemon` processes in
  a temporary directory named with the run prefix, exactly as ``nsm demo`` does.
- ``mesh`` (per test): the same mesh plus everything the test makes through it (namespaces,
  SDK clients, extra endpoints and daemons, CLI processes), all removed at the end of the test
  even when it fails. Then the test is checked to have left no connection in the manager's,
  the forwarder's or the main endpoint's monitor and no interface in the endpoint's namespace.
- When a test fails, what the daemons logged during it is attached to the report.

Every e2e test runs in the session's event loop (``loop_scope="session"``), since the mesh's
channels live there. Test modules import nothing from here: everything comes as a fixture.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio

from nsm.api import connection_pb2_grpc
from nsm.api.connection_pb2 import Connection, ConnectionEvent, MonitorScopeSelector
from nsm.api.registry_pb2 import NetworkServiceEndpoint
from nsm.client.sdk import Client
from nsm.kernel import netns as nsns
from nsm.kernel.netlink import Netlink
from nsm.lab.processes import Daemon
from nsm.registry.client import RegistryClient
from nsm.transport import dial
from nsm.wellknown import FORWARDER_SERVICE

ROOT = Path(__file__).resolve().parents[2]
E2E_DIR = Path(__file__).resolve().parent

#: The main endpoint's service and address pool (first pair: .1 endpoint, .2 client).
SERVICE = "e2e-ip"
CIDR = "172.30.0.0/24"
FIRST_PAIR = ("172.30.0.1/32", "172.30.0.2/32")
NODE = "node1"

LOG_TAIL_LINES = 200


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without ``NSM_*`` (which every daemon flag reads)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NSM_")}
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra or {})
    return env


@dataclass
class Nse:
    """One endpoint process and where it puts its interfaces."""

    name: str
    services: list[str]
    cidr: str
    netns: str
    url: str
    daemon: Daemon
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


class Mesh:
    """The running mesh and the helpers tests use (see the module docstring)."""

    def __init__(self, prefix: str, work: Path) -> None:
        self.prefix = prefix
        self.work = work
        self.service = SERVICE
        self.cidr = CIDR
        self.first_pair = FIRST_PAIR
        self.registry_url = f"unix://{work}/registry.sock"
        self.manager_url = f"unix://{work}/manager.sock"
        self.forwarder_url = f"unix://{work}/forwarder.sock"
        self.forwarder_name = f"{NODE}-fwd"
        self.netlink = Netlink()
        self.daemons: dict[str, Daemon] = {}
        self.nses: dict[str, Nse] = {}
        self.main: Nse | None = None
        self._counter = itertools.count(1)
        self._session_namespaces: list[str] = []
        self._stack: contextlib.AsyncExitStack | None = None
        self._log_marks: dict[Path, int] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        #: Leftovers already reported by a failed test (so later tests fail only on their own).
        self._known_leftovers: set[str] = set()

    # -- names and logs -------------------------------------------------------------------

    def name(self, label: str) -> str:
        """A unique name carrying the run prefix (namespaces, endpoints, daemons)."""
        return f"{self.prefix}-{label}{next(self._counter)}"

    def sock(self, label: str) -> str:
        return f"unix://{self.work}/{label}-{next(self._counter)}.sock"

    def _log_paths(self) -> list[Path]:
        return sorted(self.work.glob("*.log"))

    def mark_logs(self) -> None:
        self._log_marks = {p: p.stat().st_size for p in self._log_paths()}

    def log_since_mark(self, daemon: Daemon) -> str:
        """What ``daemon`` logged since the test started."""
        assert daemon.log_path is not None
        with daemon.log_path.open("rb") as f:
            f.seek(self._log_marks.get(daemon.log_path, 0))
            return f.read().decode(errors="replace")

    def logs_since_mark(self) -> list[tuple[str, str]]:
        out = []
        for path in self._log_paths():
            with contextlib.suppress(OSError), path.open("rb") as f:
                f.seek(self._log_marks.get(path, 0))
                lines = [ln for ln in f.read().decode(errors="replace").splitlines()
                         if "_cygrpc] Loaded running loop" not in ln]  # grpc's debug noise
                if lines:
                    out.append((path.stem, "\n".join(lines[-LOG_TAIL_LINES:])))
        return out

    # -- session daemons -------------------------------------------------------------------

    async def start_session(self) -> None:
        specs = [
            ("registry", ["registry", "--listen", self.registry_url, "--log-level", "debug"],
             self.registry_url),
            ("manager", ["manager", "--name", NODE, "--listen", self.manager_url,
                         "--registry", self.registry_url, "--log-level", "debug"], self.manager_url),
            ("forwarder", ["forwarder", "--name", self.forwarder_name, "--node", NODE,
                           "--listen", self.forwarder_url, "--manager", self.manager_url,
                           "--registry", self.registry_url, "--log-level", "debug"],
             self.forwarder_url),
        ]
        for name, argv, url in specs:
            daemon = Daemon(name, argv, url=url, log_path=self.work / f"{name}.log",
                            env=clean_env())
            self.daemons[name] = daemon
            await daemon.start()
        await self.wait_registered(self.forwarder_name)
        nse_ns = nsns.create_netns(self.name("nse"))
        self._session_namespaces.append(Path(nse_ns).name)
        self.main = await self._start_nse("nse-main", [SERVICE], CIDR, nse_ns, labels={},
                                          expiry=60.0, extra=())
        self.daemons["nse-main"] = self.main.daemon

    async def stop_session(self) -> None:
        for name in reversed(list(self.daemons)):
            with contextlib.suppress(Exception):
                await asyncio.shield(self.daemons[name].stop())
        for channel in self._channels.values():
            with contextlib.suppress(Exception):
                await channel.close()
        await self.netlink.close()
        for name in self._session_namespaces:
            with contextlib.suppress(Exception):
                nsns.delete_netns(name)

    @property
    def manager(self) -> Daemon:
        return self.daemons["manager"]

    @property
    def forwarder(self) -> Daemon:
        return self.daemons["forwarder"]

    @property
    def registry(self) -> Daemon:
        return self.daemons["registry"]

    def channel(self, url: str) -> grpc.aio.Channel:
        channel = self._channels.get(url)
        if channel is None:
            channel = self._channels[url] = dial(url)
        return channel

    def registry_client(self) -> RegistryClient:
        return RegistryClient(self.channel(self.registry_url), timeout=5.0)

    # -- per-test resources ------------------------------------------------------------------

    @property
    def stack(self) -> contextlib.AsyncExitStack:
        assert self._stack is not None, "the mesh fixture is not active"
        return self._stack

    async def netns(self, label: str = "nsc") -> str:
        """A fresh pod namespace (path), deleted at the end of the test."""
        name = self.name(label)
        path = nsns.create_netns(name)
        self.stack.callback(nsns.delete_netns, name)
        self.stack.callback(self.netlink.forget, path)
        return path

    async def netns_many(self, count: int, label: str = "nsc") -> list[str]:
        return [await self.netns(label) for _ in range(count)]

    def client(self, netns: str, *, service: str | None = None, **kwargs: Any) -> Client:
        """An SDK client for a pod namespace (closed at the end of the test)."""
        client = Client(manager_url=self.manager_url, service=service or self.service,
                        netns=netns, **kwargs)
        self.stack.push_async_callback(client.close)
        return client

    async def _start_nse(self, label: str, services: Sequence[str], cidr: str, netns: str, *,
                         labels: Mapping[str, str], expiry: float, extra: Sequence[str],
                         wait: bool = True) -> Nse:
        name = self.name(label)
        url = f"unix://{self.work}/{name}.sock"
        argv = ["nse", "--name", name, "--cidr", cidr, "--netns", netns, "--listen", url,
                "--registry", self.registry_url, "--node", NODE, "--expiry", f"{expiry}s",
                "--log-level", "debug"]
        for s in services:
            argv += ["--service", s]
        for k, v in labels.items():
            argv += ["--label", f"{k}={v}"]
        argv += list(extra)
        daemon = Daemon(name, argv, url=url, log_path=self.work / f"{name}.log", env=clean_env())
        await daemon.start()
        nse = Nse(name, list(services), cidr, netns, url, daemon, dict(labels))
        self.nses[name] = nse
        if wait:
            await self.wait_registered(name)
        return nse

    async def start_nse(self, label: str = "nse", *, services: Sequence[str] | None = None,
                        cidr: str = "172.29.0.0/24", labels: Mapping[str, str] | None = None,
                        expiry: float = 30.0, netns: str | None = None,
                        extra: Sequence[str] = ()) -> Nse:
        """One more endpoint process (with its own namespace unless given), stopped and
        unregistered at the end of the test."""
        ns = netns or await self.netns(f"{label}ns")
        nse = await self._start_nse(label, services or [self.service], cidr, ns,
                                    labels=labels or {}, expiry=expiry, extra=extra)

        async def stop() -> None:
            await nse.daemon.stop()
            self.nses.pop(nse.name, None)
            with contextlib.suppress(Exception):
                await self.registry_client().unregister_nse(nse.name)

        self.stack.push_async_callback(stop)
        return nse

    async def start_daemon(self, label: str, args: Sequence[str], *, url: str,
                           env: Mapping[str, str] | None = None, timeout: float = 15.0) -> Daemon:
        """Any ``nsm`` daemon (``args`` after ``nsm``), stopped at the end of the test."""
        name = self.name(label)
        daemon = Daemon(name, list(args), url=url, log_path=self.work / f"{name}.log",
                        env=clean_env(env))
        self.stack.push_async_callback(daemon.stop)
        await daemon.start(timeout=timeout)
        return daemon

    async def spawn_python(self, *args: str, env: Mapping[str, str] | None = None,
                           stdin: bool = True) -> asyncio.subprocess.Process:
        """``python ARGS`` with piped stdio, killed at the end of the test."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, *args, cwd=ROOT, env=clean_env(env),
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
        """``python -m nsm.cli ARGS`` with piped output, killed at the end of the test."""
        return await self.spawn_python("-m", "nsm.cli", *args, env=env, stdin=False)

    async def run_cli_python(self, *args: str, env: Mapping[str, str] | None = None,
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
        return await self.run_cli_python("-m", "nsm.cli", *args, env=env, timeout=timeout)

    # -- observing ---------------------------------------------------------------------------

    async def wait_registered(self, name: str, *, present: bool = True,
                              timeout: float = 10.0) -> None:
        """Wait until the registry has (or no longer has) the endpoint ``name``, plus a moment
        for the manager's watch of the registry to catch up."""
        client = self.registry_client()
        deadline = time.monotonic() + timeout
        while True:
            found = await client.find_nse(NetworkServiceEndpoint(name=name))
            if bool(found) == present:
                await asyncio.sleep(0.1)
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"endpoint {name} {'not ' if present else 'still '}"
                                     f"registered after {timeout}s")
            await asyncio.sleep(0.05)

    async def forwarders(self) -> list[NetworkServiceEndpoint]:
        return await self.registry_client().find_nse(
            NetworkServiceEndpoint(network_service_names=[FORWARDER_SERVICE]))

    async def connections(self, url: str, timeout: float = 5.0) -> dict[str, Connection]:
        """The connections the monitor at ``url`` knows (its INITIAL_STATE_TRANSFER)."""
        stub = connection_pb2_grpc.MonitorConnectionStub(self.channel(url))
        call = stub.MonitorConnections(MonitorScopeSelector(), timeout=timeout)
        try:
            event: ConnectionEvent = await call.read()
        finally:
            call.cancel()
        assert event is not grpc.aio.EOF, f"monitor at {url} ended without a snapshot"
        return dict(event.connections)

    async def all_connections(self) -> dict[str, dict[str, Connection]]:
        """Every live daemon's monitor: manager, forwarder and each endpoint."""
        urls = {"manager": self.manager_url, "forwarder": self.forwarder_url}
        for nse in list(self.nses.values()):
            if nse.daemon.proc is not None and nse.daemon.proc.returncode is None:
                urls[nse.name] = nse.url
        snaps = await asyncio.gather(*(self.connections(u) for u in urls.values()))
        return dict(zip(urls, snaps, strict=True))

    async def link_names(self, netns: str) -> list[str]:
        """Interface names in a namespace, without ``lo``."""
        return sorted(link.name for link in await self.netlink.links(netns) if link.name != "lo")

    async def eventually(self, check: Callable[[], Awaitable[bool]], *, timeout: float,
                         what: str, interval: float = 0.1) -> None:
        deadline = time.monotonic() + timeout
        while not await check():
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not reached within {timeout}s")
            await asyncio.sleep(interval)

    async def assert_clean(self) -> None:
        """No connection anywhere, no interface in the main endpoint's namespace, every
        session daemon alive (leftovers a previous test was already blamed for excepted)."""
        problems = []
        for name, d in self.daemons.items():
            if d.proc is None or d.proc.returncode is not None:
                problems.append(f"session daemon {name} is not running")
        for hop, conns in (await self.all_connections()).items():
            problems += [f"connection {cid} left in the {hop} monitor" for cid in sorted(conns)]
        assert self.main is not None
        problems += [f"interface {n} left in the endpoint's namespace"
                     for n in await self.link_names(self.main.netns)]
        new = [p for p in problems if p not in self._known_leftovers]
        self._known_leftovers.update(problems)
        assert not new, "the test left things in the mesh:\n  " + "\n  ".join(new)


@pytest.fixture(autouse=True)
def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("e2e tests need root (network namespaces, veth)")


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def mesh_session(nsm_run_prefix: str) -> AsyncIterator[Mesh]:
    if os.geteuid() != 0:
        pytest.skip("e2e tests need root (network namespaces, veth)")
    work = Path(tempfile.mkdtemp(prefix=f"{nsm_run_prefix}-"))
    mesh = Mesh(nsm_run_prefix, work)
    try:
        await mesh.start_session()
        yield mesh
    except BaseException:
        for name, text in mesh.logs_since_mark():
            print(f"----- {name}.log -----\n{text}", file=sys.stderr)
        raise
    finally:
        await mesh.stop_session()
        shutil.rmtree(work, ignore_errors=True)


@pytest_asyncio.fixture(loop_scope="session")
async def mesh(mesh_session: Mesh) -> AsyncIterator[Mesh]:
    """The session's mesh, with per-test cleanup and a leak check at the end of the test."""
    mesh_session.mark_logs()
    async with contextlib.AsyncExitStack() as stack:
        mesh_session._stack = stack
        try:
            yield mesh_session
        finally:
            mesh_session._stack = None
    # Everything this test made is gone; nothing of it may remain in the mesh.
    await mesh_session.assert_clean()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed:
        mesh_obj = getattr(item, "funcargs", {}).get("mesh")
        if isinstance(mesh_obj, Mesh):
            for name, text in mesh_obj.logs_since_mark():
                report.sections.append((f"daemon log {name} ({report.when})", text))
    return report

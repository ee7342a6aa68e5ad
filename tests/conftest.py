"""Suite-wide: a name prefix unique to this test run (and xdist worker), and a hard check at the
end of the session that nothing carrying it is left behind.

Tests that create network namespaces, temporary directories or processes put
:func:`nsm_run_prefix` in their names (namespace names, socket paths, daemon names), so
the check below finds exactly what *this* run made — never another run's or another worker's.
At session end, a named namespace whose name starts with the prefix, or a live process whose
command line contains it, fails the session with the list (then it is removed, so one broken
run does not leave the machine dirty for the next).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import time
from collections.abc import Callable, Iterator, Sequence

import grpc
import pytest

from nsm.api import connection_pb2_grpc
from nsm.api.connection_pb2 import (
    DOWN,
    INITIAL_STATE_TRANSFER,
    UPDATE,
    Connection,
    MonitorScopeSelector,
    PathSegment,
)
from nsm.kernel import netns as nsns

#: ``nsmt-<worker>-<random>``: short (it goes into unix socket paths, 107 bytes at most).
RUN_PREFIX = f"nsmt-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}-{secrets.token_hex(3)}"


@pytest.fixture(scope="session")
def nsm_run_prefix() -> str:
    """The prefix for every namespace, directory and process this run creates."""
    return RUN_PREFIX


def leftovers(prefix: str) -> tuple[list[str], list[tuple[int, str]]]:
    """Named namespaces starting with ``prefix`` and live processes whose command line contains it."""
    namespaces = [n for n in nsns.list_netns() if n.startswith(prefix)]
    procs: list[tuple[int, str]] = []
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
        if prefix in cmd:  # a zombie has an empty cmdline: only live processes count
            procs.append((int(entry.name), cmd))
    return namespaces, procs


def _remove(namespaces: list[str], procs: list[tuple[int, str]]) -> None:
    for pid, _ in procs:  # ours: their command lines carry this run's unique prefix
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    for name in namespaces:
        with contextlib.suppress(Exception):
            nsns.delete_netns(name)


@pytest.fixture(scope="session", autouse=True)
def _nothing_left_behind() -> Iterator[None]:
    """Session end: fail hard if a namespace or process of this run's prefix remains."""
    yield
    deadline = time.monotonic() + 3.0  # let processes being stopped finish exiting
    while True:
        namespaces, procs = leftovers(RUN_PREFIX)
        if (not namespaces and not procs) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if namespaces or procs:
        _remove(namespaces, procs)
        lines = [f"test run {RUN_PREFIX!r} left things behind (now removed):"]
        lines += [f"  network namespace {n}" for n in namespaces]
        lines += [f"  process {pid}: {cmd[:200]}" for pid, cmd in procs]
        pytest.fail("\n".join(lines), pytrace=False)


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


@pytest.fixture
def monitor_watch() -> Iterator[Callable[..., MonitorWatch]]:
    """``monitor_watch(channel, segment_id=..., services=[...])``: a :class:`MonitorWatch` with
    that selector, cancelled at the end of the test."""
    watches: list[MonitorWatch] = []

    def open_watch(channel: grpc.aio.Channel, *, segment_id: str = "",
                   services: Sequence[str] = ()) -> MonitorWatch:
        selector = MonitorScopeSelector(network_services=list(services))
        if segment_id:
            selector.path_segments.append(PathSegment(id=segment_id))
        watch = MonitorWatch(channel, selector)
        watches.append(watch)
        return watch

    yield open_watch
    for watch in watches:
        watch.call.cancel()

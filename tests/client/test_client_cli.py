"""``nsm nsc`` as a real subprocess (``python -m nsm.client.main``) against a fake manager."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.empty_pb2 import Empty

from nsm.api import networkservice_pb2_grpc
from nsm.api.connection_pb2 import Connection
from nsm.api.networkservice_pb2 import NetworkServiceRequest
from nsm.errors import NotFound, Unavailable, grpc_errors
from nsm.transport import Server

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parents[2]
#: Against a fake manager no interface is ever built in this (the test's) namespace: no data-plane
#: check (tests/client/test_client_heal.py has those, in namespaces of their own).
LIVENESS_OFF = ("--no-liveness",)


class FakeManager(networkservice_pb2_grpc.NetworkServiceServicer):
    def __init__(self) -> None:
        self.requests: list[NetworkServiceRequest] = []
        self.closes: list[Connection] = []
        #: Refreshes (requests naming the endpoint) fail until a request from scratch comes.
        self.broken = False

    @grpc_errors
    async def Request(self, request: NetworkServiceRequest, context: grpc.aio.ServicerContext) -> Connection:
        self.requests.append(request)
        if self.broken:
            if request.connection.network_service_endpoint_name:
                raise Unavailable("path broken")
            self.broken = False
        if request.connection.network_service != "blue":
            raise NotFound(f'network service "{request.connection.network_service}" not found')
        conn = Connection()
        conn.CopyFrom(request.connection)
        conn.network_service_endpoint_name = "nse-1"
        conn.mechanism.CopyFrom(request.mechanism_preferences[0])
        if not conn.context.ip_context.src_ip_addrs:  # a heal sends the addresses it had
            conn.context.ip_context.src_ip_addrs.append("10.0.0.2/32")
            conn.context.ip_context.dst_ip_addrs.append("10.0.0.1/32")
        return conn

    @grpc_errors
    async def Close(self, request: Connection, context: grpc.aio.ServicerContext) -> Empty:
        self.closes.append(request)
        return Empty()


@pytest.fixture
async def manager(tmp_path: Path) -> AsyncIterator[tuple[FakeManager, str]]:
    fake = FakeManager()
    server = Server([f"unix://{tmp_path}/mgr.sock"])
    networkservice_pb2_grpc.add_NetworkServiceServicer_to_server(fake, server.grpc)
    await server.start()
    try:
        yield fake, str(server.urls[0])
    finally:
        await server.stop(0.1)


async def spawn(*args: str) -> asyncio.subprocess.Process:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NSM_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["NSM_INSECURE"] = "1"  # the fake manager is plaintext
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nsm.client.main", *args, *LIVENESS_OFF, cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def finish(proc: asyncio.subprocess.Process) -> tuple[str, str]:
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    # The one warning every --insecure process logs (the fake manager is plaintext).
    lines = [ln for ln in err.decode().splitlines(keepends=True) if "running --insecure" not in ln]
    return out.decode(), "".join(lines)


async def connected(proc: asyncio.subprocess.Process) -> str:
    """The first line on stdout, which says the connection is up."""
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 15)).decode()
    assert line.startswith("connected id="), line
    return line


async def test_once_prints_the_connection_and_closes(manager) -> None:  # type: ignore[no-untyped-def]
    fake, url = manager
    proc = await spawn("--manager", url, "--service", "blue", "--ifname", "nsm-7", "--label", "app=x",
                       "--once")
    out, err = await finish(proc)
    assert proc.returncode == 0, err
    (line,) = out.strip().splitlines()
    conn_id = fake.requests[0].connection.id
    assert line == f"connected id={conn_id} ifname=nsm-7 src=10.0.0.2/32 dst=10.0.0.1/32 endpoint=nse-1"
    assert dict(fake.requests[0].connection.labels) == {"app": "x"}
    assert [c.id for c in fake.closes] == [conn_id]


async def test_holds_until_sigterm_then_closes(manager, eventually) -> None:  # type: ignore[no-untyped-def]
    fake, url = manager
    proc = await spawn("--manager", url, "--service", "blue", "--lifetime", "0.6s")
    try:
        await connected(proc)
        await eventually(lambda: len(fake.requests) >= 3, timeout=10)  # refreshing
        assert not fake.closes
        proc.send_signal(signal.SIGTERM)
    finally:
        _, err = await finish(proc)
    assert proc.returncode == 0, err
    assert len(fake.closes) == 1


async def test_state_changes_are_log_lines(manager, eventually) -> None:  # type: ignore[no-untyped-def]
    fake, url = manager
    proc = await spawn("--manager", url, "--service", "blue", "--lifetime", "0.6s")
    try:
        await connected(proc)
        fake.broken = True  # refreshes fail until the connection expired and is requested afresh
        await eventually(lambda: not fake.broken, timeout=10)
        healed_at = len(fake.requests)
        await eventually(lambda: len(fake.requests) > healed_at, timeout=10)  # refreshed after the heal
        proc.send_signal(signal.SIGTERM)
    finally:
        out, err = await finish(proc)
    assert proc.returncode == 0, err
    lines = err.splitlines()
    for what in ("connection failed", "connection down", "connection healed"):  # at the default level
        assert any(what in x for x in lines), (what, err)
    assert "expired" in next(x for x in lines if "connection down" in x), err
    assert "updated" not in out  # same endpoint, same addresses
    assert len(fake.closes) == 1


async def test_the_connection_id_is_given_or_derived_from_the_name(manager) -> None:  # type: ignore[no-untyped-def]
    fake, url = manager
    for args, want in ((["--name", "pod-a"], "pod-a-0"), (["--name", "pod-a", "--id", "conn-7"], "conn-7")):
        proc = await spawn("--manager", url, "--service", "blue", "--once", *args)
        out, err = await finish(proc)
        assert proc.returncode == 0, err
        assert out.startswith(f"connected id={want} "), out
        assert fake.requests[-1].connection.path.path_segments[0].id == want
    proc = await spawn("--manager", url, "--service", "blue", "--once")  # no name: random
    out, _ = await finish(proc)
    assert out.startswith("connected id=") and "-0 " not in out


async def test_hold_seconds(manager) -> None:  # type: ignore[no-untyped-def]
    fake, url = manager
    proc = await spawn("--manager", url, "--service", "blue", "--hold", "0.3s")
    out, err = await finish(proc)
    assert proc.returncode == 0, err
    assert out.startswith("connected ") and len(fake.closes) == 1


async def test_request_failure_exits_1_with_the_code(manager) -> None:  # type: ignore[no-untyped-def]
    _, url = manager
    proc = await spawn("--manager", url, "--service", "x", "--once")
    out, err = await finish(proc)
    assert proc.returncode == 1
    assert out == ""
    assert err.strip() == 'nsm nsc: request failed: NOT_FOUND: network service "x" not found'


async def test_unreachable_manager_exits_1(tmp_path: Path) -> None:
    proc = await spawn("--manager", f"unix://{tmp_path}/none.sock", "--service", "x", "--timeout", "3s")
    _, err = await finish(proc)
    assert proc.returncode == 1
    assert err.startswith("nsm nsc: request failed: UNAVAILABLE: ") and "Traceback" not in err


@pytest.mark.parametrize(("args", "message"), [
    (["--ifname", "much-too-long-name"], "at most 15"),
    (["--netns", "/nonexistent/ns"], "does not exist"),
    (["--manager", "http://x"], "unsupported URL"),
    (["--lifetime", "soon"], "not a duration"),
    (["--liveness-interval", "0s"], "must be positive"),
    (["--liveness-timeout", "often"], "not a duration"),
    (["--id", ""], "connection id (--id) is empty"),
    (["--manager-id", "node1-manager"], "'node1-manager' is not a SPIFFE ID"),
])
async def test_bad_flags_exit_2(args: list[str], message: str) -> None:
    proc = await spawn("--manager", "unix:///tmp/none.sock", "--service", "blue", *args)
    _, err = await finish(proc)
    assert proc.returncode == 2
    assert message in err and "Traceback" not in err

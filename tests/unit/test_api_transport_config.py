"""Generated code freshness, URL parsing, flags/env, and error mapping."""

from __future__ import annotations

import argparse
import asyncio
import shutil
from pathlib import Path

import grpc
import pytest

from nsm.api import generate
from nsm.config import duration, env_name, flag, label
from nsm.errors import REASON_KEY, EndpointUnreachable, InvalidArgument, NotFound, from_rpc_error, status_of
from nsm.transport import Server, dial, parse_url, watch_reconnects

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_fresh() -> None:
    assert generate.main(["--check"]) == 0, "run: python -m nsm.api.generate"


def test_generated_code_check_detects_a_stale_proto(tmp_path: Path) -> None:
    api = tmp_path / "api"
    shutil.copytree(ROOT / "api", api)
    text = (api / "registry.proto").read_text()
    (api / "registry.proto").write_text(text.replace("bool deleted = 2;", "bool deleted = 3;", 1))
    rc = generate.main(["--check", "--api-dir", str(api)])
    assert rc == 1


def test_wire_names_match_upstream() -> None:
    from nsm.api import connection_pb2, networkservice_pb2_grpc, registry_pb2

    assert connection_pb2.Connection.DESCRIPTOR.full_name == "connection.Connection"
    f = registry_pb2.NetworkServiceEndpoint.DESCRIPTOR.fields_by_name
    assert (f["url"].number, f["expiration_time"].number) == (4, 5)
    assert "/networkservice.NetworkService/Request" in Path(networkservice_pb2_grpc.__file__).read_text()


@pytest.mark.parametrize(
    ("text", "target"),
    [("unix:///run/x.sock", "unix:/run/x.sock"), ("tcp://127.0.0.1:5000", "127.0.0.1:5000"),
     ("tcp://[::1]:7", "[::1]:7"), ("tcp://node-1:0", "node-1:0")],
)
def test_parse_url(text: str, target: str) -> None:
    assert parse_url(text).target() == target
    assert str(parse_url(str(parse_url(text)))) == str(parse_url(text))


@pytest.mark.parametrize("bad", ["", "unix://relative", "http://x:1", "tcp://host", "tcp://h:99999",
                                 "/tmp/x"])
def test_parse_url_rejects(bad: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_url(bad)


async def test_server_serves_health_on_unix_and_tcp_and_removes_its_socket(tmp_path: Path) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    sock = tmp_path / "s.sock"
    server = Server([f"unix://{sock}", "tcp://127.0.0.1:0"])
    server.add_service_names(["x.Y"])
    await server.start()
    try:
        assert server.urls[1].port != 0
        for url in server.urls:
            ch = dial(url)
            resp = await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="x.Y"), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
            await ch.close()
    finally:
        await server.stop()
    assert not sock.exists()


async def test_a_stopping_server_leaves_its_successors_socket_alone(tmp_path: Path) -> None:
    """A restart where the new server binds the path before the old one has stopped (an
    overlapping rollout): the old one's stop must not unlink the new one's socket."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    sock = tmp_path / "r.sock"
    old, new = Server([f"unix://{sock}"]), Server([f"unix://{sock}"])
    await old.start()
    try:
        await new.start()  # replaces the (old) socket file
        try:
            await old.stop()
            assert sock.exists()
            ch = dial(f"unix://{sock}")
            try:
                resp = await health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(), timeout=5, wait_for_ready=True)
                assert resp.status == health_pb2.HealthCheckResponse.SERVING
            finally:
                await ch.close()
        finally:
            await new.stop()
        assert not sock.exists()
    finally:
        await old.stop()


def test_flags_read_nsm_environment() -> None:
    p = argparse.ArgumentParser()
    env = {"NSM_LISTEN": "unix:///a,unix:///b", "NSM_EXPIRY": "2m", "NSM_LOG_JSON": "true"}
    flag(p, "--listen", help="x", many=True, required=True, env=env)
    flag(p, "--expiry", help="x", type=duration, default=60.0, env=env)
    flag(p, "--log-json", help="x", switch=True, default=False, env=env)
    args = p.parse_args([])
    assert args.listen == ["unix:///a", "unix:///b"]
    assert args.expiry == 120.0 and args.log_json is True
    assert p.parse_args(["--expiry", "5s"]).expiry == 5.0  # the command line wins
    assert env_name("--request-timeout") == "NSM_REQUEST_TIMEOUT"


@pytest.mark.parametrize("bad", ["x", "-1s", "0"])
def test_duration_rejects(bad: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        duration(bad)


def test_label() -> None:
    assert label("a=b=c") == ("a", "b=c")
    with pytest.raises(argparse.ArgumentTypeError):
        label("novalue")


def test_error_mapping_round_trips() -> None:
    assert status_of(NotFound("x")) == (grpc.StatusCode.NOT_FOUND, "x")
    assert status_of(ValueError("boom"))[0] == grpc.StatusCode.INTERNAL

    class FakeRpcError(grpc.aio.AioRpcError):
        def __init__(self) -> None:
            super().__init__(grpc.StatusCode.NOT_FOUND, grpc.aio.Metadata(), grpc.aio.Metadata(),
                             details="gone")

    err = from_rpc_error(FakeRpcError(), "peer")
    assert isinstance(err, NotFound) and err.message == "peer: gone"

    class Unreachable(grpc.aio.AioRpcError):  # an endpoint unreachable two hops down
        def __init__(self) -> None:
            super().__init__(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(),
                             grpc.aio.Metadata((REASON_KEY, EndpointUnreachable.reason)),
                             details="nse-1 cannot be reached")

    err = from_rpc_error(Unreachable(), "fwd")
    assert isinstance(err, EndpointUnreachable) and err.reason == "ENDPOINT_UNREACHABLE"


def test_list_flag_on_command_line_replaces_environment() -> None:
    p = argparse.ArgumentParser()
    flag(p, "--listen", help="x", many=True, required=True, env={"NSM_LISTEN": "unix:///env"})
    assert p.parse_args([]).listen == ["unix:///env"]
    args = p.parse_args(["--listen", "unix:///a", "--listen", "unix:///b"])
    assert args.listen == ["unix:///a", "unix:///b"]


async def test_a_new_channel_reaches_a_restarted_peer_at_once(tmp_path: Path) -> None:
    """A peer that was down: the old channel waits out its reconnect backoff, but a new channel
    connects at once (what :class:`nsm.elements.connect.Connect` relies on after a restart) —
    channels do not share a subchannel still backing off."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    sock = tmp_path / "p.sock"
    url = f"unix://{sock}"
    sock.touch()  # a socket path with nobody listening: connections are refused
    old = dial(url)
    server = Server([url])
    try:
        for _ in range(4):  # refused a few times: its backoff grows (100, 200, 400 ms...)
            with pytest.raises(grpc.aio.AioRpcError):
                await health_pb2_grpc.HealthStub(old).Check(health_pb2.HealthCheckRequest(),
                                                            timeout=2)
            await asyncio.sleep(0.15)
        sock.unlink()
        await server.start()
        new = dial(url)
        try:
            resp = await health_pb2_grpc.HealthStub(new).Check(health_pb2.HealthCheckRequest(),
                                                               timeout=2)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            await new.close()
    finally:
        await old.close()
        await server.stop()


class _FlappingChannel:
    """A channel whose connection is lost and back before its watcher looks: READY, then
    (one state change later) READY again."""

    def __init__(self) -> None:
        self.changes = 0

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return grpc.ChannelConnectivity.READY

    async def wait_for_state_change(self, last: grpc.ChannelConnectivity) -> None:
        self.changes += 1
        if self.changes > 1:
            await asyncio.Event().wait()  # no more changes


@pytest.mark.timeout(5)
async def test_a_reconnect_quicker_than_the_watcher_still_counts() -> None:
    """``watch_reconnects``: READY → (lost) → READY again before the watcher reads the state is
    a reconnect (a restarted peer that must be told again), not nothing."""
    backs: list[int] = []
    channel = _FlappingChannel()
    task = asyncio.ensure_future(watch_reconnects(channel, lambda: backs.append(1)))  # type: ignore[arg-type]
    try:
        for _ in range(100):
            if backs:
                break
            await asyncio.sleep(0.01)
        assert backs == [1]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


class _ScriptedChannel:
    """A channel that goes through ``states`` one state change at a time, then stays."""

    def __init__(self, *states: grpc.ChannelConnectivity) -> None:
        self.states = list(states)
        self.at = 0

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self.states[self.at]

    async def wait_for_state_change(self, last: grpc.ChannelConnectivity) -> None:
        if self.at + 1 >= len(self.states):
            await asyncio.Event().wait()  # no more changes
        self.at += 1


@pytest.mark.timeout(5)
async def test_a_reconnect_seen_as_connecting_still_counts() -> None:
    """``watch_reconnects``: READY → CONNECTING → READY is a reconnect. Looking at the state with
    ``try_to_connect`` right after a lost connection (IDLE) starts connecting, so the watcher may
    never see IDLE or TRANSIENT_FAILURE when the peer is back at once (a quick restart)."""
    ready, connecting = grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.CONNECTING
    backs: list[int] = []
    channel = _ScriptedChannel(ready, connecting, ready)
    task = asyncio.ensure_future(watch_reconnects(channel, lambda: backs.append(1)))  # type: ignore[arg-type]
    try:
        for _ in range(100):
            if channel.at == 2:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert backs == [1]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

"""The registry daemon: flags, a real process with SIGTERM, and raw wire compatibility."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nsm.api.registry_pb2 import NetworkServiceEndpoint
from nsm.lab.census import parse_status
from nsm.registry.client import RegistryClient
from nsm.registry.main import DEFAULT_LISTEN, RegistryDaemon, add_arguments
from nsm.registry.matching import expiration
from nsm.transport import dial

if TYPE_CHECKING:
    from conftest import Harness

pytestmark = pytest.mark.timeout(30)

REPO = Path(__file__).resolve().parents[2]


# --- flags -----------------------------------------------------------------------------------


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_flags_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("NSM_LISTEN", "NSM_EXPIRY", "NSM_LOG_LEVEL", "NSM_LOG_JSON"):
        monkeypatch.delenv(var, raising=False)
    args = parse([])
    assert args.listen is None  # run() then listens on DEFAULT_LISTEN
    assert DEFAULT_LISTEN == "tcp://0.0.0.0:5002"
    assert (args.expiry, args.log_level, args.log_json) == (60.0, "info", False)


def test_flags_from_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("NSM_LISTEN", "NSM_EXPIRY", "NSM_LOG_LEVEL", "NSM_LOG_JSON"):
        monkeypatch.delenv(var, raising=False)
    args = parse(["--listen", "unix:///a.sock", "--listen", "tcp://127.0.0.1:0",
                  "--expiry", "250ms", "--log-level", "debug", "--log-json"])
    assert args.listen == ["unix:///a.sock", "tcp://127.0.0.1:0"]
    assert (args.expiry, args.log_level, args.log_json) == (0.25, "debug", True)


def test_flags_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NSM_LISTEN", "unix:///a.sock,tcp://127.0.0.1:0")
    monkeypatch.setenv("NSM_EXPIRY", "2m")
    monkeypatch.setenv("NSM_LOG_LEVEL", "warning")
    monkeypatch.setenv("NSM_LOG_JSON", "true")
    args = parse([])
    assert args.listen == ["unix:///a.sock", "tcp://127.0.0.1:0"]
    assert (args.expiry, args.log_level, args.log_json) == (120.0, "warning", True)


# --- in-process daemon -----------------------------------------------------------------------


async def test_daemon_binds_tcp_port_zero_and_unix(tmp_path: Path) -> None:
    sock = tmp_path / "d.sock"
    async with RegistryDaemon([f"unix://{sock}", "tcp://127.0.0.1:0"], expiry=5) as daemon:
        assert daemon.url == f"unix://{sock}"
        tcp = daemon.urls[1]
        assert tcp.startswith("tcp://127.0.0.1:") and not tcp.endswith(":0")
        for url in daemon.urls:
            channel = dial(url)
            try:
                nse = await RegistryClient(channel).register_nse(
                    NetworkServiceEndpoint(name=f"via-{url[:3]}", url="unix:///x.sock")
                )
                assert expiration(nse) == pytest.approx(time.time() + 5, abs=1)
            finally:
                await channel.close()
        assert len(await daemon.registry.nse_store.list()) == 2
    assert not sock.exists()


# --- a real process --------------------------------------------------------------------------


async def wait_serving(target: str, proc: asyncio.subprocess.Process, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            assert proc.returncode is None, "registry process exited early"
            request = health_pb2.HealthCheckRequest(
                service="registry.NetworkServiceEndpointRegistry"
            )
            try:
                response = await stub.Check(request, timeout=1)
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("registry process did not become healthy")
            await asyncio.sleep(0.05)


async def start_process(
    *args: str, env: dict[str, str] | None = None
) -> asyncio.subprocess.Process:
    # Plaintext: these are tests of the daemon's process life (tests/security has it secure).
    environ = {**os.environ, "PYTHONPATH": str(REPO), "NSM_INSECURE": "1", **(env or {})}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nsm.registry.main", *args,
        cwd=str(REPO), env=environ,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )


async def test_daemon_process_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    sock = tmp_path / "proc.sock"
    proc = await start_process(
        "--listen", f"unix://{sock}", "--log-json", env={"NSM_EXPIRY": "7s"}
    )
    try:
        await wait_serving(f"unix:{sock}", proc)
        async with grpc.aio.insecure_channel(f"unix:{sock}") as channel:
            client = RegistryClient(channel)
            nse = await client.register_nse(
                NetworkServiceEndpoint(network_service_names=["svc"], url="unix:///x.sock")
            )
            assert expiration(nse) == pytest.approx(time.time() + 7, abs=1)  # NSM_EXPIRY
            assert [n.name for n in await client.find_nse()] == [nse.name]
            async with client.watch_nse() as watch:
                await anext(watch)
                proc.send_signal(signal.SIGTERM)
                _, stderr = await asyncio.wait_for(proc.communicate(), 10)
        assert proc.returncode == 0, stderr.decode()
        assert not sock.exists()
        text = stderr.decode().splitlines()
        # Ours are JSON lines; gRPC core may add a plain line of its own (seen once under load).
        lines = [json.loads(line) for line in text if line.startswith("{")]
        print("non-JSON stderr lines:", [line for line in text if line.strip() and line[0] != "{"])
        messages = [line["msg"] for line in lines]
        assert "registry serving" in messages and "registry stopped" in messages
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_daemon_process_logs_its_status_on_sigusr1(tmp_path: Path) -> None:
    """SIGUSR1: one ``status`` line with what the registry holds; the daemon serves on."""
    sock = tmp_path / "status.sock"
    proc = await start_process("--listen", f"unix://{sock}")
    try:
        await wait_serving(f"unix:{sock}", proc)
        async with grpc.aio.insecure_channel(f"unix:{sock}") as channel:
            client = RegistryClient(channel)
            await client.register_nse(
                NetworkServiceEndpoint(network_service_names=["svc"], url="unix:///x.sock"))
            async with client.watch_nse() as watch:
                await anext(watch)
                proc.send_signal(signal.SIGUSR1)
                assert proc.stderr is not None
                while (status := parse_status((await asyncio.wait_for(
                        proc.stderr.readline(), 10)).decode())) is None:
                    pass
                assert status["endpoints"] == 1 and status["endpoints_watchers"] == 1, status
                assert status["tasks"] > 0
                assert len(await client.find_nse()) == 1  # still serving
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.communicate(), 10)
        assert proc.returncode == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_daemon_process_sigint_and_bad_listen_url(tmp_path: Path) -> None:
    sock = tmp_path / "int.sock"
    proc = await start_process(env={"NSM_LISTEN": f"unix://{sock}"})
    try:
        await wait_serving(f"unix:{sock}", proc)
        proc.send_signal(signal.SIGINT)
        _, stderr = await asyncio.wait_for(proc.communicate(), 10)
        assert proc.returncode == 0, stderr.decode()
        assert not sock.exists()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    bad = await start_process("--listen", "http://nope")
    _, stderr = await asyncio.wait_for(bad.communicate(), 10)
    assert bad.returncode == 1
    assert b"unsupported URL" in stderr


# --- raw wire format -------------------------------------------------------------------------
# Messages built and parsed by hand from the field numbers in nsm-api.md, independent of our
# .proto files and generated code.


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def vint(number: int, value: int) -> bytes:
    return varint(number << 3 | 0) + varint(value)


def ld(number: int, data: bytes | str) -> bytes:
    raw = data.encode() if isinstance(data, str) else data
    return varint(number << 3 | 2) + varint(len(raw)) + raw


def read_varint(data: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        byte = data[i]
        i += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return result, i


def fields(data: bytes) -> dict[int, list[int | bytes]]:
    out: dict[int, list[int | bytes]] = defaultdict(list)
    i = 0
    while i < len(data):
        key, i = read_varint(data, i)
        number, wire = key >> 3, key & 7
        value: int | bytes
        if wire == 0:
            value, i = read_varint(data, i)
        elif wire == 2:
            length, i = read_varint(data, i)
            value, i = data[i:i + length], i + length
        elif wire == 1:
            value, i = data[i:i + 8], i + 8
        elif wire == 5:
            value, i = data[i:i + 4], i + 4
        else:
            raise AssertionError(f"unexpected wire type {wire}")
        out[number].append(value)
    return out


def one(data: bytes, number: int) -> bytes:
    value = fields(data)[number]
    assert len(value) == 1 and isinstance(value[0], bytes), value
    return value[0]


async def test_raw_wire_register_find_watch_unregister(reg: Harness) -> None:
    target = reg.daemon.url.removeprefix("unix://")
    async with grpc.aio.insecure_channel(f"unix:{target}") as channel:
        nse_register = channel.unary_unary("/registry.NetworkServiceEndpointRegistry/Register")
        nse_find = channel.unary_stream("/registry.NetworkServiceEndpointRegistry/Find")
        nse_unregister = channel.unary_unary("/registry.NetworkServiceEndpointRegistry/Unregister")
        ns_register = channel.unary_unary("/registry.NetworkServiceRegistry/Register")

        # NetworkService{name=1}: payload=2 comes back as "IP"
        ns = await ns_register(ld(1, "raw-svc"), timeout=5)
        assert one(ns, 1) == b"raw-svc" and one(ns, 2) == b"IP"

        # NetworkServiceEndpoint{name=1, network_service_names=2,
        #   network_service_labels=3 (map entry {key=1, value=2: NetworkServiceLabels{labels=1}}),
        #   url=4, expiration_time=5 (Timestamp{seconds=1})}
        expires = int(time.time()) + 30
        labels = ld(1, ld(1, "color") + ld(2, "red"))
        nse = (
            ld(1, "raw-nse")
            + ld(2, "raw-svc")
            + ld(3, ld(1, "raw-svc") + ld(2, labels))
            + ld(4, "tcp://10.1.2.3:5001")
            + ld(5, vint(1, expires))
        )
        stored = await nse_register(nse, timeout=5)
        assert one(stored, 1) == b"raw-nse"
        assert fields(stored)[2] == [b"raw-svc"]
        entry = one(stored, 3)  # map entry: key=1 service, value=2 NetworkServiceLabels
        assert one(entry, 1) == b"raw-svc"
        label = one(one(entry, 2), 1)  # labels=1 map entry: key=1, value=2
        assert (one(label, 1), one(label, 2)) == (b"color", b"red")
        assert one(stored, 4) == b"tcp://10.1.2.3:5001"
        assert fields(one(stored, 5))[1] == [expires]  # kept: within the registry's expiry
        initial = fields(one(stored, 6))[1]  # initial_registration_time=6 set by the registry
        assert len(initial) == 1 and isinstance(initial[0], int)
        assert abs(initial[0] - time.time()) < 5

        # our generated code reads the same bytes
        parsed = NetworkServiceEndpoint.FromString(stored)
        assert parsed.network_service_labels["raw-svc"].labels == {"color": "red"}

        # NetworkServiceEndpointQuery{network_service_endpoint=1, watch=2}
        query = ld(1, ld(2, "raw-svc"))
        responses = [r async for r in nse_find(query, timeout=5)]
        assert len(responses) == 1
        # NetworkServiceEndpointResponse{network_service_endpoint=1, deleted=2}
        assert one(one(responses[0], 1), 1) == b"raw-nse"
        assert 2 not in fields(responses[0]) or fields(responses[0])[2] == [0]
        assert [r async for r in nse_find(ld(1, ld(2, "other-svc")), timeout=5)] == []

        watch = nse_find(query + vint(2, 1))
        first = await asyncio.wait_for(watch.read(), 5)
        assert one(one(first, 1), 1) == b"raw-nse"
        empty = await nse_unregister(ld(1, "raw-nse"), timeout=5)
        assert empty == b""  # google.protobuf.Empty
        gone = await asyncio.wait_for(watch.read(), 5)
        assert one(one(gone, 1), 1) == b"raw-nse" and fields(gone)[2] == [1]
        watch.cancel()

        # a bad request on the raw wire: url=4 missing → INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await nse_register(ld(1, "no-url"), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # bytes that are not a protobuf at all are refused without harm
        with pytest.raises(grpc.aio.AioRpcError):
            await nse_register(b"\xff\xff\xff\xff", timeout=5)
        assert [r async for r in nse_find(b"", timeout=5)] == []

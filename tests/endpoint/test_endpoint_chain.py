"""The endpoint end to end over real gRPC on unix sockets (no kernel): requests as a forwarder
sends them, Close, timeout, monitor, errors on the wire, and registration in a real registry."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from nsm.api import connection_pb2_grpc, networkservice_pb2_grpc
from nsm.api.connection_pb2 import (
    DELETE,
    INITIAL_STATE_TRANSFER,
    UPDATE,
    Connection,
    Mechanism,
    MonitorScopeSelector,
)
from nsm.api.networkservice_pb2 import NetworkServiceRequest
from nsm.api.registry_pb2 import NetworkService, NetworkServiceEndpoint
from nsm.chain import Ctx, Element, NextRequest
from nsm.elements.updatepath import ts
from nsm.endpoint.endpoint import Endpoint
from nsm.endpoint.kernel import ifname_for
from nsm.errors import InvalidArgument, NotFound, Unavailable
from nsm.lab import harness
from nsm.lab.harness import eventually
from nsm.mechanisms import NAME, NETNS_INODE_URL, REMOTE, VXLAN, kernel
from nsm.registry.client import RegistryClient
from nsm.registry.main import RegistryDaemon
from nsm.transport import dial

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(autouse=True)
async def no_leaked_tasks() -> AsyncIterator[None]:
    async with harness.no_leaked_tasks():
        yield


def forwarder_request(service: str = "blue", *, expires_in: float = 60.0,
                      prefs: list[Mechanism] | None = None) -> NetworkServiceRequest:
    """What a forwarder sends an endpoint: NSC, manager and forwarder segments, index 2,
    id = the forwarder's segment id, KERNEL/LOCAL without parameters."""
    conn = Connection(network_service=service, labels={"app": "x"},
                      network_service_endpoint_name="nse-1", payload="IP")
    for name in ("nsc-1", "mgr-1", "fwd-1"):
        seg = conn.path.path_segments.add(name=name, id=str(uuid.uuid4()))
        seg.expires.CopyFrom(ts(time.time() + expires_in))
    conn.path.index = 2
    conn.id = conn.path.path_segments[2].id
    r = NetworkServiceRequest(connection=conn)
    r.mechanism_preferences.extend(prefs if prefs is not None else [kernel()])
    return r


class Recorder(Element):
    """An SDK user's extra element."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    async def request(self, ctx: Ctx, request: NetworkServiceRequest, next: NextRequest) -> Connection:
        self.seen.append(request.connection.mechanism.parameters[NAME])
        return await next(ctx, request)


@pytest.fixture
async def nse(tmp_path: Path) -> AsyncIterator[tuple[Endpoint, networkservice_pb2_grpc.NetworkServiceStub,
                                                      grpc.aio.Channel]]:
    recorder = Recorder()
    endpoint = Endpoint(name="nse-1", services=["blue"], cidr="172.16.0.0/24",
                        listen=[f"unix://{tmp_path}/nse.sock"], elements=[recorder], grace=0.1)
    async with endpoint:
        channel = dial(endpoint.url)
        try:
            yield endpoint, networkservice_pb2_grpc.NetworkServiceStub(channel), channel
        finally:
            await channel.close()


async def test_request_as_a_forwarder_would(nse) -> None:  # type: ignore[no-untyped-def]
    endpoint, stub, _ = nse
    request = forwarder_request()
    fwd_id = request.connection.id
    conn = await stub.Request(request, timeout=5)
    assert conn.id == fwd_id and conn.path.index == 2
    segments = conn.path.path_segments
    assert [s.name for s in segments] == ["nsc-1", "mgr-1", "fwd-1", "nse-1"]
    nse_id = segments[3].id
    assert nse_id and nse_id != fwd_id
    assert segments[3].expires.ToNanoseconds() <= segments[2].expires.ToNanoseconds()
    params = conn.mechanism.parameters
    assert conn.mechanism.cls == "LOCAL" and conn.mechanism.type == "KERNEL"
    assert params[NAME] == ifname_for(nse_id) and len(params[NAME]) <= 15
    # Its own namespace, by identity (its PIDs may mean nothing to the forwarder).
    st = os.stat("/proc/self/ns/net")
    assert params[NETNS_INODE_URL] == f"inode://{st.st_dev}/{st.st_ino}"
    ip = conn.context.ip_context
    assert list(ip.dst_ip_addrs) == ["172.16.0.1/32"] and list(ip.src_ip_addrs) == ["172.16.0.2/32"]
    assert [r.prefix for r in ip.src_routes] == ["172.16.0.1/32"]
    assert [r.prefix for r in ip.dst_routes] == ["172.16.0.2/32"]
    assert conn.payload == "IP"

    # Refresh: the same connection back, fresh expiry on the forwarder's segment.
    again = NetworkServiceRequest(connection=conn)
    again.mechanism_preferences.append(kernel())
    again.connection.path.path_segments[2].expires.CopyFrom(ts(time.time() + 60))
    refreshed = await stub.Request(again, timeout=5)
    assert refreshed.mechanism.parameters[NAME] == params[NAME]
    assert list(refreshed.context.ip_context.src_ip_addrs) == ["172.16.0.2/32"]
    assert refreshed.path.path_segments[3].id == nse_id
    assert endpoint.ipam.connections == 1
    recorder = endpoint.chain.elements[-1]
    assert isinstance(recorder, Recorder) and recorder.seen == [params[NAME]] * 2

    await stub.Close(refreshed, timeout=5)
    assert endpoint.ipam.connections == 0 and not endpoint.monitor.connections
    await stub.Close(refreshed, timeout=5)  # idempotent


async def test_status_counts_what_the_endpoint_holds(nse) -> None:  # type: ignore[no-untyped-def]
    """What the daemon logs on SIGUSR1: each count goes up with a connection, back to 0 with
    its Close."""
    endpoint, stub, channel = nse
    idle = {"connections": 0, "timers": 0, "monitored": 0, "watchers": 0, "ipam_pairs": 0,
            "ipam_free": 254}
    assert endpoint.status() == idle
    conn = await stub.Request(forwarder_request(), timeout=5)
    watch = connection_pb2_grpc.MonitorConnectionStub(channel).MonitorConnections(
        MonitorScopeSelector())
    await watch.read()
    assert endpoint.status() == {"connections": 1, "timers": 1, "monitored": 1, "watchers": 1,
                                 "ipam_pairs": 1, "ipam_free": 252}
    watch.cancel()
    await stub.Close(conn, timeout=5)
    await eventually(lambda: endpoint.status() == idle)


async def test_concurrent_requests_get_distinct_pairs(nse) -> None:  # type: ignore[no-untyped-def]
    endpoint, stub, _ = nse
    conns = await asyncio.gather(*(stub.Request(forwarder_request(), timeout=5) for _ in range(20)))
    ips = [c.context.ip_context for c in conns]
    addrs = {a for ip in ips for a in [*ip.src_ip_addrs, *ip.dst_ip_addrs]}
    names = {c.mechanism.parameters[NAME] for c in conns}
    assert len(addrs) == 40 and len(names) == 20
    await asyncio.gather(*(stub.Close(c, timeout=5) for c in conns))
    assert endpoint.ipam.connections == 0


async def test_errors_on_the_wire(nse) -> None:  # type: ignore[no-untyped-def]
    endpoint, stub, _ = nse
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Request(forwarder_request(prefs=[Mechanism(cls=REMOTE, type=VXLAN)]), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "REMOTE/VXLAN" in (info.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Request(forwarder_request(service=""), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert endpoint.ipam.connections == 0 and len(endpoint.begin) == 0


async def test_expired_connection_is_closed_and_released(nse) -> None:  # type: ignore[no-untyped-def]
    endpoint, stub, _ = nse
    await stub.Request(forwarder_request(expires_in=0.4), timeout=5)
    assert endpoint.ipam.connections == 1
    await eventually(lambda: endpoint.ipam.connections == 0 and not endpoint.monitor.connections)


async def test_monitor_streams_connections(nse) -> None:  # type: ignore[no-untyped-def]
    _, stub, channel = nse
    first = await stub.Request(forwarder_request(), timeout=5)
    monitor = connection_pb2_grpc.MonitorConnectionStub(channel)
    stream = monitor.MonitorConnections(MonitorScopeSelector())
    try:
        initial = await stream.read()
        assert initial.type == INITIAL_STATE_TRANSFER and len(initial.connections) == 1
        second = await stub.Request(forwarder_request(), timeout=5)
        update = await stream.read()
        assert update.type == UPDATE
        await stub.Close(second, timeout=5)
        delete = await stream.read()
        assert delete.type == DELETE
    finally:
        stream.cancel()
    await stub.Close(first, timeout=5)


async def test_health_is_served(nse) -> None:  # type: ignore[no-untyped-def]
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    _, _, channel = nse
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("networkservice.NetworkService", "connection.MonitorConnection"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_bad_input_is_rejected_at_construction(tmp_path: Path) -> None:
    listen = [f"unix://{tmp_path}/nse.sock"]
    with pytest.raises(InvalidArgument, match="CIDR"):
        Endpoint(name="n", services=["s"], cidr="10.0.0.0/99", listen=listen)
    with pytest.raises(NotFound, match="does not exist"):
        Endpoint(name="n", services=["s"], cidr="10.0.0.0/24", listen=listen, netns=str(tmp_path / "nope"))
    with pytest.raises(InvalidArgument, match="not a network namespace"):
        Endpoint(name="n", services=["s"], cidr="10.0.0.0/24", listen=listen, netns=str(tmp_path))
    with pytest.raises(InvalidArgument, match="253"):
        Endpoint(name="n" * 254, services=["s"], cidr="10.0.0.0/24", listen=listen)
    with pytest.raises(InvalidArgument, match="URL"):
        Endpoint(name="n", services=["s"], cidr="10.0.0.0/24", listen=["http://x"])
    with pytest.raises(InvalidArgument, match="network service"):
        Endpoint(name="n", services=[], cidr="10.0.0.0/24", listen=listen)


# -- with a registry --------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def registry_at(sock: Path) -> AsyncIterator[RegistryClient]:
    async with RegistryDaemon([f"unix://{sock}"], grace=0.1) as daemon:
        channel = dial(daemon.url)
        try:
            yield RegistryClient(channel, timeout=5)
        finally:
            await channel.close()


async def test_registers_refreshes_and_unregisters(tmp_path: Path) -> None:
    async with registry_at(tmp_path / "reg.sock") as reg:
        await reg.register_ns(NetworkService(name="red", payload="ETHERNET"))
        endpoint = Endpoint(name="nse-r", services=["blue", "red"], cidr="10.1.0.0/16",
                            listen=[f"unix://{tmp_path}/nse.sock"], registry_url=f"unix://{tmp_path}/reg.sock",
                            labels={"app": "x", "zone": "z1"}, expiry=0.6, grace=0.1)
        async with endpoint:
            found = await reg.find_nse(NetworkServiceEndpoint(name="nse-r"))
            assert len(found) == 1
            nse = found[0]
            assert nse.url == f"unix://{tmp_path}/nse.sock"
            assert list(nse.network_service_names) == ["blue", "red"]
            for svc in ("blue", "red"):
                assert dict(nse.network_service_labels[svc].labels) == {"app": "x", "zone": "z1"}
            blue = await reg.get_ns("blue")
            assert blue is not None and blue.payload == "IP"
            red = await reg.get_ns("red")
            assert red is not None and red.payload == "ETHERNET"  # existing record left alone
            await asyncio.sleep(1.0)  # longer than the expiry: the refresher keeps it alive
            assert await reg.find_nse(NetworkServiceEndpoint(name="nse-r"))
        assert await reg.find_nse(NetworkServiceEndpoint(name="nse-r")) == []
        assert not (tmp_path / "nse.sock").exists()


async def test_waits_for_an_unreachable_registry(tmp_path: Path) -> None:
    sock = tmp_path / "reg.sock"
    endpoint = Endpoint(name="nse-w", services=["blue"], cidr="10.1.0.0/24",
                        listen=[f"unix://{tmp_path}/nse.sock"], registry_url=f"unix://{sock}", grace=0.1)
    starting = asyncio.create_task(endpoint.start())
    try:
        await asyncio.sleep(0.5)
        assert not starting.done()
        async with registry_at(sock) as reg:
            await asyncio.wait_for(starting, 10)
            assert await reg.find_nse(NetworkServiceEndpoint(name="nse-w"))
            await endpoint.stop()
            assert await reg.find_nse(NetworkServiceEndpoint(name="nse-w")) == []
    finally:
        starting.cancel()
        with contextlib.suppress(BaseException):
            await starting
        await endpoint.stop()


async def test_cancelling_a_start_that_waits_for_the_registry_cleans_up(tmp_path: Path) -> None:
    endpoint = Endpoint(name="nse-c", services=["blue"], cidr="10.1.0.0/24",
                        listen=[f"unix://{tmp_path}/nse.sock"], registry_url=f"unix://{tmp_path}/none.sock",
                        grace=0.1)
    starting = asyncio.create_task(endpoint.start())
    await asyncio.sleep(0.3)
    starting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await starting
    assert not (tmp_path / "nse.sock").exists()


async def test_registry_restart_brings_back_the_endpoint_and_its_service(tmp_path: Path) -> None:
    sock = tmp_path / "reg.sock"
    endpoint = Endpoint(name="nse-x", services=["blue"], cidr="10.1.0.0/24",
                        listen=[f"unix://{tmp_path}/nse.sock"], registry_url=f"unix://{sock}",
                        expiry=0.6, grace=0.1)
    async with registry_at(sock):
        await endpoint.start()
    try:
        async with registry_at(sock) as reg:  # a new, empty registry at the same address
            async def back() -> bool:
                try:
                    return bool(await reg.find_nse(NetworkServiceEndpoint(name="nse-x"))) and (
                        await reg.get_ns("blue") is not None)
                except Unavailable:  # our channel may share a connection still in backoff
                    return False

            deadline = time.monotonic() + 10
            while not await back():
                assert time.monotonic() < deadline, "not registered again"
                await asyncio.sleep(0.05)
            await endpoint.stop()
    finally:
        await endpoint.stop()

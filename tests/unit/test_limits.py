"""Bounded inputs: every limit of :mod:`nsm.limits` refused by Validate with INVALID_ARGUMENT
naming it (each case was accepted and copied to every hop before), MonitorConnections streams
per caller over real gRPC, caller keys, and the message size gRPC enforces."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from nsm import limits
from nsm.api.connection_pb2 import Connection, MonitorScopeSelector, PathSegment
from nsm.api.connection_pb2_grpc import MonitorConnectionStub, add_MonitorConnectionServicer_to_server
from nsm.api.networkservice_pb2 import NetworkServiceRequest
from nsm.chain import Chain, Ctx, Element, NextClose, NextRequest
from nsm.elements.monitor import Monitor
from nsm.elements.validate import Validate
from nsm.errors import InvalidArgument
from nsm.limits import Limits, StreamLimiter, caller_key
from nsm.mechanisms import kernel
from nsm.registry.server import validate_nse
from nsm.transport import Server, Service, dial

pytestmark = pytest.mark.timeout(20)


class Tail(Element):
    async def request(self, ctx: Ctx, request: NetworkServiceRequest, next: NextRequest) -> Connection:
        return request.connection

    async def close(self, ctx: Ctx, conn: Connection, next: NextClose) -> None:
        return None


def request() -> NetworkServiceRequest:
    r = NetworkServiceRequest(mechanism_preferences=[kernel("nsm-1", "file:///proc/self/ns/net")])
    r.connection.id = "c1"
    r.connection.network_service = "svc"
    r.connection.path.path_segments.add(name="nsc", id="c1")
    return r


def big(n: int) -> str:
    return "x" * n


#: case → (how the request is spoiled, what the message must say). Each one exceeds one limit.
CASES: dict[str, tuple[Callable[[NetworkServiceRequest], Any], str]] = {
    "labels-count": (lambda r: r.connection.labels.update({f"k{i}": "v" for i in range(65)}),
                     "labels: 65 entries; at most 64"),
    "label-key": (lambda r: r.connection.labels.update({big(257): "v"}), "labels key"),
    "label-value": (lambda r: r.connection.labels.update({"k": big(1025)}), "labels 'k' value"),
    "parameter-value-4.5MiB": (
        lambda r: r.mechanism_preferences[0].parameters.update({"x": big(9 * 512 * 1024)}),
        "mechanism preference 0 parameters 'x' value is 4718592 characters; at most 4096"),
    "parameters-count": (
        lambda r: r.mechanism_preferences[0].parameters.update({f"p{i}": "v" for i in range(33)}),
        "mechanism preference 0 parameters: 35 entries"),
    "mechanism-type": (lambda r: setattr(r.mechanism_preferences[0], "type", big(65)), "type is 65"),
    "connection-mechanism": (
        lambda r: r.connection.mechanism.parameters.update({f"p{i}": "v" for i in range(33)}),
        "mechanism parameters: 33 entries"),
    "preferences-count": (lambda r: r.mechanism_preferences.extend([kernel("a", "file:///x")] * 16),
                          "mechanism preferences: 17 entries; at most 16"),
    "excluded-prefixes-200k": (
        lambda r: r.connection.context.ip_context.excluded_prefixes.extend(["10.0.0.0/8"] * 200_000),
        "ip_context.excluded_prefixes: 200000 entries; at most 1024"),
    "src-addrs": (lambda r: r.connection.context.ip_context.src_ip_addrs.extend(["10.0.0.1/32"] * 65),
                  "ip_context.src_ip_addrs: 65 entries"),
    "dst-addrs": (lambda r: r.connection.context.ip_context.dst_ip_addrs.extend(["10.0.0.1/32"] * 65),
                  "ip_context.dst_ip_addrs: 65 entries"),
    "routes": (lambda r: r.connection.context.ip_context.dst_routes.extend(
        [r.connection.context.ip_context.dst_routes.add(prefix="10.0.0.0/8")] * 256),
               "ip_context.dst_routes: 257 entries"),
    "neighbors": (lambda r: [r.connection.context.ip_context.ip_neighbors.add(ip="10.0.0.1")
                             for _ in range(65)], "ip_context.ip_neighbors: 65 entries"),
    "prefix-string": (lambda r: r.connection.context.ip_context.excluded_prefixes.append(big(300)),
                      "ip_context.excluded_prefixes entry"),
    "dns-configs": (lambda r: [r.connection.context.dns_context.configs.add() for _ in range(17)],
                    "dns_context.configs: 17 entries"),
    "dns-servers": (lambda r: r.connection.context.dns_context.configs.add(
        dns_server_ips=["10.0.0.53"] * 17), "dns_context.configs.dns_server_ips: 17 entries"),
    "ethernet-mac": (lambda r: setattr(r.connection.context.ethernet_context, "src_mac", big(300)),
                     "ethernet_context entry"),
    "extra-context-count": (
        lambda r: r.connection.context.extra_context.update({f"k{i}": "v" for i in range(65)}),
        "extra_context: 65 entries"),
    "extra-context-4.5MiB": (lambda r: r.connection.context.extra_context.update({"k": big(9 * 512 * 1024)}),
                             "extra_context 'k' value"),
    "token": (lambda r: setattr(r.connection.path.path_segments[0], "token", big(8 * 1024 + 1)),
              "path segment 0 token is 8193 characters; at most 8192"),
    "segment-name": (lambda r: setattr(r.connection.path.path_segments[0], "name", big(257)),
                     "path segment 0 name"),
    "segment-id": (lambda r: setattr(r.connection.path.path_segments[0], "id", big(257)),
                   "path segment 0 id"),
    "segment-metrics": (lambda r: r.connection.path.path_segments[0].metrics.update(
        {f"m{i}": "v" for i in range(17)}), "path segment 0 metrics: 17 entries"),
    "path-length": (lambda r: r.connection.path.path_segments.extend([PathSegment(name="x")] * 32),
                    "path segments: 33 entries; at most 32"),
    # every field within its limit, the whole request not
    "request-bytes": (lambda r: [r.connection.path.path_segments.add(name=f"h{i}", token=big(8000))
                                 for i in range(31)] + [r.connection.labels.update(
                                     {f"k{i}": big(1000) for i in range(64)})],
                      "connection is"),
}


@pytest.mark.parametrize("case", sorted(CASES))
async def test_each_limit_is_invalid_argument_naming_it(case: str) -> None:
    spoil, message = CASES[case]
    r = request()
    spoil(r)
    with pytest.raises(InvalidArgument) as err:
        await Chain([Validate(), Tail()]).request(r)
    assert message in err.value.message, err.value.message
    assert len(err.value.message) < 400  # the value itself is not echoed


async def test_a_request_at_the_limits_is_accepted() -> None:
    r = request()
    r.connection.labels.update({f"k{i}": big(1000) for i in range(limits.MAX_LABELS)})
    r.mechanism_preferences[0].parameters.update({"extra": big(limits.MAX_PARAMETER_VALUE_LEN)})
    r.connection.context.ip_context.excluded_prefixes.extend(["10.0.0.0/8"] * limits.MAX_EXCLUDED_PREFIXES)
    r.connection.path.path_segments[0].token = big(limits.MAX_TOKEN_LEN)
    await Chain([Validate(), Tail()]).request(r)


def test_every_valid_message_fits_the_grpc_limit() -> None:
    assert limits.MAX_MESSAGE_BYTES <= 1024 * 1024
    assert limits.MAX_MESSAGE_BYTES >= 2 * max(limits.MAX_REQUEST_BYTES, limits.MAX_RECORD_BYTES)


def test_registry_record_limits() -> None:
    from nsm.api.registry_pb2 import NetworkServiceEndpoint
    nse = NetworkServiceEndpoint(name="e", url="unix:///x.sock", network_service_names=["s"] * 65)
    with pytest.raises(InvalidArgument, match="services: 65 entries"):
        validate_nse(nse)


class FakeContext:
    def __init__(self, peer: str) -> None:
        self._peer = peer

    def peer(self) -> str:
        return self._peer


def test_caller_key() -> None:
    assert caller_key(FakeContext("ipv4:10.0.0.1:5555")) == "ipv4:10.0.0.1"  # type: ignore[arg-type]
    assert caller_key(FakeContext("ipv6:[::1]:5555")) == "ipv6:[::1]"  # type: ignore[arg-type]
    assert caller_key(FakeContext("unix:/run/x.sock")) == "unix:"  # type: ignore[arg-type]
    assert caller_key(None) == "local"


def test_stream_limiter() -> None:
    limiter = StreamLimiter("x", per_caller=1, total=2)
    with limiter.hold("a"), limiter.hold("b"):
        with pytest.raises(Exception, match="all callers"), limiter.hold("c"):
            pass
    with limiter.hold("a"):
        with pytest.raises(Exception, match="caller a has 1 streams open"), limiter.hold("a"):
            pass
    assert limiter.count == 0


async def _monitor_server(tmp_path: Path, monitor: Monitor) -> Server:
    server = Server([f"unix://{tmp_path}/m.sock"])
    server.add(Service("connection.MonitorConnection", add_MonitorConnectionServicer_to_server, monitor))
    await server.start()
    return server


async def test_monitor_streams_per_caller_and_total(tmp_path: Path) -> None:
    monitor = Monitor(limits=Limits(monitor_streams_per_caller=2, monitor_streams=3))
    server = await _monitor_server(tmp_path, monitor)
    channel = dial(str(server.urls[0]))
    stub = MonitorConnectionStub(channel)
    calls = []
    try:
        for _ in range(2):
            call = stub.MonitorConnections(MonitorScopeSelector())
            await asyncio.wait_for(call.read(), 5)  # the initial state: the stream is open
            calls.append(call)
        refused = stub.MonitorConnections(MonitorScopeSelector())
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await asyncio.wait_for(refused.read(), 5)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit per caller" in (err.value.details() or "")
        calls.pop().cancel()
        for _ in range(50):
            if monitor.watcher_count() == 1:
                break
            await asyncio.sleep(0.02)
        again = stub.MonitorConnections(MonitorScopeSelector())
        await asyncio.wait_for(again.read(), 5)
        calls.append(again)
        selector = MonitorScopeSelector(path_segments=[PathSegment(name="x")] * 65)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await asyncio.wait_for(stub.MonitorConnections(selector).read(), 5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        for call in calls:
            call.cancel()
        await channel.close()
        await server.stop(0)


async def test_oversized_message_is_resource_exhausted_before_parsing(tmp_path: Path) -> None:
    monitor = Monitor()
    server = await _monitor_server(tmp_path, monitor)
    # a raw channel (ours refuse to send more than the limit)
    channel = grpc.aio.insecure_channel(f"unix:{tmp_path}/m.sock")
    try:
        selector = MonitorScopeSelector(network_services=["x" * (2 * 1024 * 1024)])
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await asyncio.wait_for(MonitorConnectionStub(channel).MonitorConnections(selector).read(), 5)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert monitor.watcher_count() == 0
    finally:
        await channel.close()
        await server.stop(0)

"""Bounded inputs at the registry, over real gRPC: oversized records and messages, watches and
registrations per caller, a watcher that does not read, and Find not slowed by open watches."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from typing import TYPE_CHECKING

import grpc
import pytest

from nsm.api import registry_pb2_grpc
from nsm.api.registry_pb2 import (
    NetworkService,
    NetworkServiceEndpoint,
    NetworkServiceEndpointQuery,
    NetworkServiceLabels,
)
from nsm.errors import InvalidArgument, ResourceExhausted
from nsm.limits import (
    MAX_LABELS,
    MAX_MESSAGE_BYTES,
    MAX_NSE_SERVICES,
    MAX_RECORD_BYTES,
    Limits,
)
from nsm.registry.main import RegistryDaemon
from nsm.registry.server import Registry
from nsm.transport import dial

if TYPE_CHECKING:
    from conftest import Eventually, StartRegistry

pytestmark = pytest.mark.timeout(60)

FIND = "/registry.NetworkServiceEndpointRegistry/Find"


def endpoint(name: str, labels: dict[str, str] | None = None, services: int = 1) -> NetworkServiceEndpoint:
    names = [f"svc{i}" for i in range(services)]
    return NetworkServiceEndpoint(
        name=name, network_service_names=names, url="unix:///run/nse.sock",
        network_service_labels={n: NetworkServiceLabels(labels=labels or {}) for n in names})


def watch_query() -> NetworkServiceEndpointQuery:
    return NetworkServiceEndpointQuery(network_service_endpoint=NetworkServiceEndpoint(), watch=True)


async def test_oversized_records_are_invalid_argument(start_registry: StartRegistry) -> None:
    reg = await start_registry()
    c = reg.client
    with pytest.raises(InvalidArgument, match="labels: 65 entries; at most 64"):
        await c.register_nse(endpoint("e", {f"k{i}": "v" for i in range(MAX_LABELS + 1)}))
    with pytest.raises(InvalidArgument, match=f"services: {MAX_NSE_SERVICES + 1} entries"):
        await c.register_nse(endpoint("e", services=MAX_NSE_SERVICES + 1))
    # every field within its own limit, the whole record not
    with pytest.raises(InvalidArgument, match=f"record is .* bytes; at most {MAX_RECORD_BYTES}"):
        await c.register_nse(endpoint("e", {f"k{i}": "v" * 1000 for i in range(60)}, services=2))
    with pytest.raises(InvalidArgument, match="matches: 65 entries"):
        await c.register_ns(NetworkService(name="s", matches=[{}] * 65))
    assert await c.find_nse() == [] and await c.find_ns() == []
    await c.register_nse(endpoint("ok", {f"k{i}": "v" * 900 for i in range(MAX_LABELS)}))  # at the limits


async def test_message_over_the_grpc_limit_is_refused_before_parsing(start_registry: StartRegistry) -> None:
    reg = await start_registry()
    # 4.5 MiB in one label, sent by a channel that would send it (ours refuse to send it)
    channel = grpc.aio.insecure_channel(reg.daemon.url.replace("unix://", "unix:"))
    try:
        stub = registry_pb2_grpc.NetworkServiceEndpointRegistryStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Register(endpoint("big", {"k": "x" * (9 * 512 * 1024)}), timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert str(MAX_MESSAGE_BYTES) in (err.value.details() or "")
    finally:
        await channel.close()
    assert await reg.client.find_nse() == []


async def test_watches_per_caller_and_in_all(start_registry: StartRegistry, eventually: Eventually) -> None:
    reg = await start_registry(registry=Registry(limits=Limits(watches_per_caller=3, watches=5)))
    calls = []
    try:
        for _ in range(3):
            calls.append(reg.client.watch_nse())
        await eventually(lambda: reg.nse_store.watcher_count == 3)
        with pytest.raises(ResourceExhausted, match=r"3 streams open \(the limit per caller"):
            async for _ in reg.client.watch_nse():
                pass
        # one gone, one more may come
        calls.pop().cancel()
        await eventually(lambda: reg.nse_store.watcher_count == 2)
        calls.append(reg.client.watch_nse())
        await eventually(lambda: reg.nse_store.watcher_count == 3)
        # a non-watching Find is not a watch
        assert await reg.client.find_nse() == []
    finally:
        for call in calls:
            call.cancel()
    await eventually(lambda: reg.nse_store.watcher_count == 0)


async def test_caller_at_its_watch_limit_does_not_affect_another(eventually: Eventually) -> None:
    """On TCP (insecure) a caller is its host: 127.0.0.1 at its limit, ::1 still watches."""
    registry = Registry(limits=Limits(watches_per_caller=2))
    daemon = RegistryDaemon(["tcp://127.0.0.1:0", "tcp://[::1]:0"], registry=registry, grace=0.2)
    stack = contextlib.AsyncExitStack()
    await stack.enter_async_context(daemon)
    v4, v6 = dial(daemon.urls[0]), dial(daemon.urls[1])
    stubs = [registry_pb2_grpc.NetworkServiceEndpointRegistryStub(ch) for ch in (v4, v6)]
    calls = [stubs[0].Find(watch_query()) for _ in range(2)]
    store = registry.nse_store
    try:
        await eventually(lambda: store.watcher_count == 2)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in stubs[0].Find(watch_query()):
                pass
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        other = stubs[1].Find(watch_query())
        calls.append(other)
        await eventually(lambda: store.watcher_count == 3)
        await stubs[1].Register(endpoint("e1"))
        response = await asyncio.wait_for(other.read(), 5)
        assert response.network_service_endpoint.name == "e1"
    finally:
        for call in calls:
            call.cancel()
        await v4.close()
        await v6.close()
        await stack.aclose()


async def test_registrations_per_caller(start_registry: StartRegistry) -> None:
    reg = await start_registry(registry=Registry(limits=Limits(registrations_per_caller=3)))
    c = reg.client
    for i in range(3):
        await c.register_nse(endpoint(f"e{i}"))
    await c.register_nse(endpoint("e0"))  # a refresh is not a new registration
    with pytest.raises(ResourceExhausted, match=r"registered 3 endpoints \(the limit per caller"):
        await c.register_nse(endpoint("e3"))
    await c.unregister_nse("e1")
    await c.register_nse(endpoint("e3"))
    for i in range(3):
        await c.register_ns(NetworkService(name=f"s{i}"))
    with pytest.raises(ResourceExhausted, match="registered 3 network services"):
        await c.register_ns(NetworkService(name="s3"))
    # records that expired no longer count
    await reg.daemon.registry.nse_store.delete("e0")
    await c.register_nse(endpoint("e4"))


async def test_watcher_that_does_not_read_is_dropped(
    start_registry: StartRegistry, eventually: Eventually
) -> None:
    registry = Registry(limits=Limits(watch_send_timeout=0.5, snapshots_in_flight=1))
    reg = await start_registry(registry=registry)
    for i in range(300):  # a snapshot (15 MB) bigger than what the flow-control windows hold
        await registry.register_nse(endpoint(f"e{i}", {f"k{j}": "v" * 1000 for j in range(50)}))
    stalled = reg.channel.unary_stream(FIND)(watch_query().SerializeToString())
    try:
        await asyncio.wait_for(stalled.read(), 5)  # it started, then reads nothing more
        await eventually(lambda: reg.nse_store.watcher_count == 0, timeout=10)
        # meanwhile it held the only snapshot slot; now another watcher gets its snapshot
        async with reg.client.watch_nse() as watch:
            names = [(await anext(watch))[0].name for _ in range(300)]
        assert len(names) == 300
        # what gRPC had buffered for it, then the end of the stream
        with pytest.raises(grpc.aio.AioRpcError) as err:
            while True:
                await asyncio.wait_for(stalled.read(), 5)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "read nothing for 0.5 s" in (err.value.details() or "")
    finally:
        stalled.cancel()


async def _find_all(stub: registry_pb2_grpc.NetworkServiceEndpointRegistryStub) -> float:
    started = time.monotonic()
    count = 0
    async for _ in stub.Find(NetworkServiceEndpointQuery(network_service_endpoint=NetworkServiceEndpoint()),
                             timeout=120):
        count += 1
    assert count == 200
    return time.monotonic() - started


#: Opens N watch streams (raw bytes, not parsed) to the registry at argv[1], reads them all.
WATCHERS = """
import asyncio, sys
import grpc
async def main(url, n):
    channels = [grpc.aio.insecure_channel(url) for _ in range(10)]
    query = bytes.fromhex(sys.argv[3])
    async def drain(channel):
        async for _ in channel.unary_stream(sys.argv[4])(query):
            pass
    tasks = [asyncio.create_task(drain(channels[i % 10])) for i in range(n)]
    print("open", flush=True)
    await asyncio.gather(*tasks, return_exceptions=True)
asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


async def test_open_watches_are_sent_their_snapshots_a_few_at_a_time(
        start_registry: StartRegistry, eventually: Eventually) -> None:
    """500 watch streams from another process, each sent a snapshot of 200 records: at most
    ``snapshots_in_flight`` are being sent theirs at any time, and a Find(all) among them gets
    its 200 records. Sending every snapshot at once gave a Find one turn in 500 (~100 times as
    long); what a Find takes among open watches is measured by ``bench.registry_watch``."""
    limits = Limits(watches_per_caller=1000, watches=1000, snapshots_in_flight=3)
    reg = await start_registry(registry=Registry(limits=limits))
    for i in range(200):
        await reg.daemon.registry.register_nse(endpoint(f"e{i}", {"pad": "x" * 1000}))
    stub = registry_pb2_grpc.NetworkServiceEndpointRegistryStub(reg.channel)
    target = reg.daemon.url.replace("unix://", "unix:")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WATCHERS, target, "500", watch_query().SerializeToString().hex(), FIND,
        stdout=asyncio.subprocess.PIPE)
    registry = reg.daemon.registry
    try:
        assert proc.stdout is not None
        assert await asyncio.wait_for(proc.stdout.readline(), 20) == b"open\n"
        await eventually(lambda: registry._watches.count == 500, timeout=20)
        await _find_all(stub)
        # every watcher has its snapshot
        await eventually(lambda: registry.snapshots_sending == 0, timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
    assert registry.snapshots_sending_peak == 3
    await eventually(lambda: reg.nse_store.watcher_count == 0, timeout=20)

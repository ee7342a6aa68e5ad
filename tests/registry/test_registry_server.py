"""The registry servicers over real gRPC on unix sockets."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, TypeVar

import grpc
import pytest

from nsm.api import registry_pb2_grpc
from nsm.api.registry_pb2 import (
    Destination,
    Match,
    NetworkService,
    NetworkServiceEndpoint,
    NetworkServiceEndpointQuery,
    NetworkServiceLabels,
)
from nsm.errors import Conflict, InvalidArgument, ResourceExhausted, Unavailable
from nsm.registry import server
from nsm.registry.client import RegistryClient, Watch
from nsm.registry.matching import expiration, timestamp_seconds
from nsm.registry.memory import MemoryStore
from nsm.registry.server import Registry
from nsm.registry.store import Entry
from nsm.transport import dial

if TYPE_CHECKING:
    from conftest import Eventually, Harness, StartRegistry

pytestmark = pytest.mark.timeout(30)

T = TypeVar("T")


def endpoint(
    name: str = "",
    services: dict[str, dict[str, str]] | None = None,
    url: str = "unix:///run/nse.sock",
) -> NetworkServiceEndpoint:
    services = {"svc": {}} if services is None else services
    return NetworkServiceEndpoint(
        name=name,
        network_service_names=list(services),
        network_service_labels={s: NetworkServiceLabels(labels=lb) for s, lb in services.items()},
        url=url,
    )


def set_expiration(nse: NetworkServiceEndpoint, when: float) -> NetworkServiceEndpoint:
    nse.expiration_time.seconds = int(when)
    nse.expiration_time.nanos = int((when % 1) * 1e9)
    return nse


async def next_event(watch: AsyncIterator[tuple[T, bool]], timeout: float = 3.0) -> tuple[T, bool]:
    return await asyncio.wait_for(anext(watch), timeout)


# --- network services ------------------------------------------------------------------------


async def test_ns_register_find_unregister(reg: Harness) -> None:
    c = reg.client
    stored = await c.register_ns(NetworkService(name="svc"))
    assert stored.name == "svc" and stored.payload == "IP"  # payload defaults to IP
    eth = await c.register_ns(
        NetworkService(
            name="l2", payload="ETHERNET",
            matches=[Match(source_selector={"a": "b"},
                           routes=[Destination(destination_selector={"c": "d"})])],
        )
    )
    assert eth.payload == "ETHERNET" and eth.matches[0].routes[0].destination_selector == {"c": "d"}
    assert sorted(ns.name for ns in await c.find_ns()) == ["l2", "svc"]
    assert [ns.name for ns in await c.find_ns(NetworkService(name="svc"))] == ["svc"]
    assert [ns.name for ns in await c.find_ns(NetworkService(payload="ETHERNET"))] == ["l2"]
    assert await c.find_ns(NetworkService(name="none")) == []
    assert (await c.get_ns("l2")) == eth
    assert await c.get_ns("none") is None
    await c.register_ns(NetworkService(name="svc", payload="ETHERNET"))  # replace
    assert (await c.get_ns("svc")).payload == "ETHERNET"  # type: ignore[union-attr]
    await c.unregister_ns("svc")
    await c.unregister_ns("svc")  # idempotent
    await c.unregister_ns(NetworkService(name="never-registered"))
    assert [ns.name for ns in await c.find_ns()] == ["l2"]


@pytest.mark.parametrize(
    "ns",
    [
        NetworkService(),
        NetworkService(name="svc", payload="ip"),
        NetworkService(name="svc", payload="TCP"),
        NetworkService(name="x" * 254),
        NetworkService(name="bad\nname"),
        NetworkService(name="bad\x00name"),
        NetworkService(name="svc", matches=[Match(source_selector={"k\x01": "v"})]),
    ],
)
async def test_ns_bad_input_is_invalid_argument(reg: Harness, ns: NetworkService) -> None:
    with pytest.raises(InvalidArgument):
        await reg.client.register_ns(ns)
    assert await reg.client.find_ns() == []


async def test_ns_name_of_253_chars_is_fine(reg: Harness) -> None:
    assert (await reg.client.register_ns(NetworkService(name="n" * 253))).name == "n" * 253


async def test_ns_watch(reg: Harness, eventually: Eventually) -> None:
    c = reg.client
    await c.register_ns(NetworkService(name="a"))
    async with c.watch_ns(NetworkService(name="a")) as watch:
        ns, deleted = await next_event(watch)
        assert (ns.name, deleted) == ("a", False)
        await c.register_ns(NetworkService(name="b"))  # not matching: not seen
        await c.register_ns(NetworkService(name="a", payload="ETHERNET"))
        ns, deleted = await next_event(watch)
        assert (ns.name, ns.payload, deleted) == ("a", "ETHERNET", False)
        await c.unregister_ns("a")
        ns, deleted = await next_event(watch)
        assert (ns.name, deleted) == ("a", True)
    await eventually(lambda: reg.ns_store.watcher_count == 0)


# --- network service endpoints ---------------------------------------------------------------


async def test_nse_register_find_unregister(reg: Harness) -> None:
    c = reg.client
    before = time.time()
    stored = await c.register_nse(endpoint("e1", {"svc": {"color": "red"}}))
    assert stored.name == "e1"
    assert stored.url == "unix:///run/nse.sock"
    exp = expiration(stored)
    assert exp is not None and before + 59 < exp < time.time() + 61  # default expiry 60 s
    assert timestamp_seconds(stored.initial_registration_time) == pytest.approx(time.time(), abs=2)
    await c.register_nse(endpoint("e2", {"svc": {"color": "blue"}, "other": {}}, "tcp://1.2.3.4:5"))

    assert sorted(e.name for e in await c.find_nse()) == ["e1", "e2"]
    assert [e.name for e in await c.find_nse(NetworkServiceEndpoint(name="e2"))] == ["e2"]
    assert [e.name for e in await c.find_nse(
        NetworkServiceEndpoint(network_service_names=["other"]))] == ["e2"]
    assert [e.name for e in await c.find_nse(NetworkServiceEndpoint(
        network_service_labels={"svc": NetworkServiceLabels(labels={"color": "red"})}))] == ["e1"]
    assert [e.name for e in await c.find_nse(
        NetworkServiceEndpoint(url="tcp://1.2.3.4:5"))] == ["e2"]
    assert await c.find_nse(NetworkServiceEndpoint(network_service_names=["none"])) == []

    await c.unregister_nse("e1")
    await c.unregister_nse(stored)  # idempotent
    await c.unregister_nse("never-registered")
    assert [e.name for e in await c.find_nse()] == ["e2"]


async def test_nse_name_is_generated_and_unique(reg: Harness) -> None:
    a = await reg.client.register_nse(endpoint())
    b = await reg.client.register_nse(endpoint())
    assert a.name.startswith("nse-") and b.name.startswith("nse-") and a.name != b.name
    assert sorted(e.name for e in await reg.client.find_nse()) == sorted([a.name, b.name])


async def test_refresh_keeps_initial_registration_time_and_extends_expiry(
    start_registry: StartRegistry,
) -> None:
    reg = await start_registry(expiry=0.6)
    c = reg.client
    first = await c.register_nse(endpoint("e1"))
    async with c.watch_nse(NetworkServiceEndpoint(name="e1")) as watch:
        assert (await next_event(watch))[1] is False
        await asyncio.sleep(0.3)
        second = await c.register_nse(endpoint("e1", {"svc": {"v": "2"}}))
        nse, deleted = await next_event(watch)
        assert not deleted and nse.network_service_labels["svc"].labels == {"v": "2"}
    assert second.initial_registration_time == first.initial_registration_time
    assert expiration(second) > expiration(first) + 0.25  # type: ignore[operator]
    await asyncio.sleep(0.45)  # past the first expiration, before the second
    assert [e.name for e in await c.find_nse()] == ["e1"]


async def test_requested_expiration_is_kept_or_capped(reg: Harness) -> None:
    soon = time.time() + 5.25
    kept = await reg.client.register_nse(set_expiration(endpoint("soon"), soon))
    assert expiration(kept) == pytest.approx(soon, abs=1e-6)
    capped = await reg.client.register_nse(set_expiration(endpoint("late"), time.time() + 3600))
    assert expiration(capped) < time.time() + 61  # type: ignore[operator]


@pytest.mark.parametrize(
    "nse",
    [
        endpoint(url=""),
        endpoint(url="http://x:1"),
        endpoint(url="unix://"),
        endpoint(url="tcp://host"),
        endpoint(url="tcp://host:99999"),
        endpoint(url="nonsense"),
        endpoint(url="unix:///a\nb"),
        endpoint(name="x" * 254),
        endpoint(name="tab\tname"),
        endpoint(name="del\x7fname"),
        endpoint(services={"": {}}),
        endpoint(services={"s\x1b": {}}),
        endpoint(services={"svc": {"k": "v\x00"}}),
        endpoint(services={"svc": {"": "v"}}),
        endpoint(services={"svc": {"k": "v" * 5000}}),
        set_expiration(endpoint("past"), time.time() - 1),
        set_expiration(endpoint("epoch"), 1),
    ],
)
async def test_nse_bad_input_is_invalid_argument(reg: Harness, nse: NetworkServiceEndpoint) -> None:
    with pytest.raises(InvalidArgument):
        await reg.client.register_nse(nse)
    assert await reg.client.find_nse() == []


async def test_unregister_without_name_is_invalid_argument(reg: Harness) -> None:
    with pytest.raises(InvalidArgument):
        await reg.client.unregister_nse("")
    with pytest.raises(InvalidArgument):
        await reg.client.unregister_ns("")


async def test_random_input_never_crashes(reg: Harness) -> None:
    rng = random.Random(1234)
    alphabet = "abc-./:_\x00\x01\n\x7f\u00e9\u2028\U0001f600 "

    def text(n: int) -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(n)))

    async def one() -> None:
        nse = NetworkServiceEndpoint(
            name=text(300) if rng.random() < 0.5 else text(8),
            network_service_names=[text(10) for _ in range(rng.randrange(3))],
            network_service_labels={text(6): NetworkServiceLabels(labels={text(5): text(5)})},
            url=rng.choice(
                ["unix:///s", "tcp://h:1", text(20), "tcp://[::1]:7", "unix:" + text(9)]
            ),
        )
        if rng.random() < 0.5:
            nse.expiration_time.seconds = rng.randrange(-(2**40), 2**40)
            nse.expiration_time.nanos = rng.randrange(-(2**31), 2**31)
        try:
            await reg.client.register_nse(nse)
        except InvalidArgument:
            pass
        try:
            await reg.client.register_ns(NetworkService(name=text(20), payload=text(4)))
        except InvalidArgument:
            pass
        await reg.client.find_nse(nse)

    await asyncio.gather(*(one() for _ in range(200)))
    for nse in await reg.client.find_nse():  # whatever got in is well-formed
        assert 0 <= nse.expiration_time.nanos < 1_000_000_000
        assert expiration(nse) <= time.time() + 61  # type: ignore[operator]


# --- watching --------------------------------------------------------------------------------


async def test_watch_gets_initial_state_then_live_updates(
    reg: Harness, eventually: Eventually
) -> None:
    c = reg.client
    await c.register_nse(endpoint("e1"))
    await c.register_nse(endpoint("x1", {"other": {}}))
    query = NetworkServiceEndpoint(network_service_names=["svc"])
    async with c.watch_nse(query) as watch:
        nse, deleted = await next_event(watch)
        assert (nse.name, deleted) == ("e1", False)
        assert reg.nse_store.watcher_count == 1
        await c.register_nse(endpoint("x2", {"other": {}}))  # not matching
        await c.register_nse(endpoint("e2"))
        await c.register_nse(endpoint("e1", url="tcp://10.0.0.1:1"))  # refresh/update
        await c.unregister_nse("x1")  # not matching
        await c.unregister_nse("e2")
        got = [await next_event(watch) for _ in range(3)]
        assert [(n.name, d) for n, d in got] == [("e2", False), ("e1", False), ("e2", True)]
        assert got[1][0].url == "tcp://10.0.0.1:1"
        # an update that no longer matches the query is a deletion for this watcher
        await c.register_nse(endpoint("e1", {"other": {}}))
        nse, deleted = await next_event(watch)
        assert (nse.name, deleted) == ("e1", True)
        await c.unregister_nse("e1")  # already gone for this watcher: no second deletion
        await c.register_nse(endpoint("e3"))
        nse, deleted = await next_event(watch)
        assert (nse.name, deleted) == ("e3", False)
    await eventually(lambda: reg.nse_store.watcher_count == 0)


async def test_cancelled_watcher_is_cleaned_up(reg: Harness, eventually: Eventually) -> None:
    stub = registry_pb2_grpc.NetworkServiceEndpointRegistryStub(reg.channel)
    calls = [stub.Find(NetworkServiceEndpointQuery(watch=True)) for _ in range(5)]
    await eventually(lambda: reg.nse_store.watcher_count == 5)
    for rpc in calls:
        rpc.cancel()
    await eventually(lambda: reg.nse_store.watcher_count == 0)


async def test_watcher_whose_client_goes_away_is_cleaned_up(
    reg: Harness, eventually: Eventually
) -> None:
    channel = dial(reg.daemon.url)
    watch = RegistryClient(channel).watch_nse()
    await reg.client.register_nse(endpoint("e1"))
    await next_event(watch)
    assert reg.nse_store.watcher_count == 1
    await channel.close()  # no cancel: the connection just goes away
    await eventually(lambda: reg.nse_store.watcher_count == 0)


async def test_non_watching_find_leaves_no_subscription(reg: Harness) -> None:
    await reg.client.register_nse(endpoint("e1"))
    for _ in range(3):
        assert len(await reg.client.find_nse()) == 1
    assert reg.nse_store.watcher_count == 0


async def test_expiry_removes_and_notifies_watchers(start_registry: StartRegistry) -> None:
    reg = await start_registry(expiry=0.5)
    c = reg.client
    async with c.watch_nse() as watch:
        short = await c.register_nse(set_expiration(endpoint("short"), time.time() + 0.3))
        longer = await c.register_nse(endpoint("longer"))  # default 0.5 s
        first = [(await next_event(watch))[0].name for _ in range(2)]
        assert first == ["short", "longer"]
        for expected in (short, longer):
            nse, deleted = await next_event(watch)
            late = time.time() - expiration(expected)  # type: ignore[operator]
            assert (nse.name, deleted) == (expected.name, True)
            assert -0.01 < late < 0.1, f"removed {late:.3f}s after expiry"
        assert await c.find_nse() == []
        assert len(reg.nse_store) == 0


class LateStore(MemoryStore[NetworkServiceEndpoint]):
    """A store whose expiry comes late (a busy replica, a shared store's lease not yet up)."""

    def _expire(self, name: str, revision: int) -> None:
        pass


async def test_expired_nse_is_not_found_even_before_removal() -> None:
    async with Registry(expiry=60, nse_store=LateStore()) as registry:
        nse = set_expiration(endpoint("e1"), time.time() + 0.05)
        await registry.register_nse(nse)
        await asyncio.sleep(0.1)
        assert len(registry.nse_store) == 1  # type: ignore[arg-type]  # still stored
        assert [n async for n in registry.find_nse(NetworkServiceEndpoint())] == []


class RacingStore(MemoryStore[NetworkServiceEndpoint]):
    """A store shared with another replica that writes the same endpoint right after our read
    (``race`` times), as two registries refreshing one endpoint might."""

    def __init__(self, race: int) -> None:
        super().__init__()
        self.race = race
        self.conflicts = 0

    async def get(self, name: str) -> Entry[NetworkServiceEndpoint] | None:
        entry = await super().get(name)
        if self.race > 0:
            self.race -= 1
            other = endpoint(name)
            set_expiration(other, time.time() + 30)
            other.initial_registration_time.seconds = 1_000_000  # the first one's, long ago
            await super().put(other)
        return entry

    async def put(self, record: NetworkServiceEndpoint, *, expires: float | None = None,
                  revision: int | None = None, owner: str | None = None
                  ) -> Entry[NetworkServiceEndpoint]:
        try:
            return await super().put(record, expires=expires, revision=revision, owner=owner)
        except Conflict:
            self.conflicts += 1
            raise


async def test_registration_that_loses_a_race_reads_again_and_keeps_the_other_write() -> None:
    store = RacingStore(race=2)
    async with Registry(expiry=60, nse_store=store) as registry:
        stored = await registry.register_nse(endpoint("e1"))
    assert store.conflicts == 2  # written back only once the record it read was current
    # what the other replica wrote is not lost: the first registration time is its
    assert stored.initial_registration_time.seconds == 1_000_000
    entry = await store.get("e1")
    assert entry is not None and entry.record == stored
    assert entry.expires == pytest.approx(expiration(stored))


async def test_registration_that_keeps_losing_races_is_unavailable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(server, "CAS_DEADLINE", 0.3)
    async with Registry(expiry=60, nse_store=RacingStore(race=10**6)) as registry:
        started = time.monotonic()
        with pytest.raises(Unavailable, match="keeps changing"):
            await registry.register_nse(endpoint("e1"))
        assert time.monotonic() - started < 2


async def test_slow_watcher_is_dropped_with_resource_exhausted() -> None:
    async with Registry(watch_queue=4) as registry:
        store = registry.nse_store
        watch = registry.find_nse(NetworkServiceEndpoint(), watch=True)
        fast = registry.find_nse(NetworkServiceEndpoint(), watch=True)
        await registry.register_nse(endpoint("e0"))
        assert (await anext(watch))[0].name == "e0"
        assert (await anext(fast))[0].name == "e0"
        started = time.monotonic()
        for i in range(1, 10):
            await registry.register_nse(endpoint(f"e{i}"))  # never waits for the slow one
            assert (await anext(fast))[0].name == f"e{i}"
        assert time.monotonic() - started < 1
        with pytest.raises(ResourceExhausted):
            await anext(watch)
        assert store.watcher_count == 1  # type: ignore[attr-defined]
        await fast.aclose()  # type: ignore[attr-defined]
        assert store.watcher_count == 0  # type: ignore[attr-defined]


async def test_slow_watcher_stream_ends_with_resource_exhausted(
    start_registry: StartRegistry, eventually: Eventually
) -> None:
    reg = await start_registry(watch_queue=2)
    # Hold the servicer back so events pile up in its queue: block its first write by
    # registering many records while it is still sending the snapshot of a big registry.
    for i in range(300):
        await reg.daemon.registry.register_nse(endpoint(f"e{i}", {"svc": {"pad": "x" * 1000}}))
    watch = reg.client.watch_nse()
    await eventually(lambda: reg.nse_store.watcher_count == 1)
    for i in range(50):
        await reg.daemon.registry.register_nse(endpoint(f"n{i}"))
    with pytest.raises(ResourceExhausted):
        async for _ in watch:
            pass
    await eventually(lambda: reg.nse_store.watcher_count == 0)


async def test_stopping_the_registry_ends_watch_streams_with_unavailable(
    start_registry: StartRegistry,
) -> None:
    reg = await start_registry()
    async with reg.client.watch_nse() as watch:
        await reg.client.register_nse(endpoint("e1"))
        await next_event(watch)
        await reg.daemon.registry.stop()
        with pytest.raises(Unavailable):
            await next_event(watch)
    assert reg.nse_store.watcher_count == 0
    # a new watch on a stopped registry is refused too
    with pytest.raises(Unavailable):
        async for _ in reg.client.watch_nse():
            pass


async def test_many_concurrent_watchers_all_see_every_change(
    reg: Harness, eventually: Eventually
) -> None:
    watches = [reg.client.watch_nse() for _ in range(20)]
    await eventually(lambda: reg.nse_store.watcher_count == 20)
    for i in range(10):
        await reg.client.register_nse(endpoint(f"e{i}"))

    async def names(watch: Watch[NetworkServiceEndpoint]) -> list[str]:
        return [(await next_event(watch))[0].name for _ in range(10)]

    results = await asyncio.gather(*(names(w) for w in watches))
    assert all(r == [f"e{i}" for i in range(10)] for r in results)
    for w in watches:
        w.cancel()
    await eventually(lambda: reg.nse_store.watcher_count == 0)


async def test_health_serves_registry_names(reg: Harness) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(reg.channel)
    for name in ("", "registry.NetworkServiceRegistry", "registry.NetworkServiceEndpointRegistry"):
        response = await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)

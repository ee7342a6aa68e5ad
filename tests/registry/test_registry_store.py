"""The in-memory store and its subscriptions (no gRPC)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest

from nsm.api.registry_pb2 import NetworkServiceEndpoint
from nsm.errors import Conflict, ResourceExhausted
from nsm.registry.memory import MemoryStore
from nsm.registry.store import ABSENT, Event, Store, Subscription

pytestmark = pytest.mark.timeout(10)


def rec(name: str, url: str = "unix:///a.sock") -> NetworkServiceEndpoint:
    return NetworkServiceEndpoint(name=name, url=url)


async def test_memory_store_satisfies_the_protocol() -> None:
    store: Store[NetworkServiceEndpoint] = MemoryStore()
    assert await store.list() == []


async def test_put_get_delete_list() -> None:
    store: MemoryStore[NetworkServiceEndpoint] = MemoryStore()
    original = rec("a")
    stored = await store.put(original)
    original.url = "unix:///changed.sock"  # the store kept a copy
    assert (await store.get("a")) == stored
    assert stored.record.url == "unix:///a.sock"
    await store.put(rec("b"))
    await store.put(rec("a", "unix:///a2.sock"))  # replace
    assert sorted((r.name, r.url) for r in await store.list()) == [
        ("a", "unix:///a2.sock"), ("b", "unix:///a.sock")
    ]
    assert len(store) == 2
    removed = await store.delete("a")
    assert removed is not None and removed.url == "unix:///a2.sock"
    assert await store.delete("a") is None  # idempotent
    assert await store.get("a") is None
    assert [r.name for r in await store.list()] == ["b"]


async def test_watch_gets_snapshot_then_changes_in_order() -> None:
    store: MemoryStore[NetworkServiceEndpoint] = MemoryStore()
    await store.put(rec("a"))
    async with await store.watch() as sub:
        assert [r.name for r in sub.snapshot] == ["a"]
        await store.put(rec("b"))
        await store.delete("a")
        await store.delete("zzz")  # nothing to delete: no event
        await store.put(rec("b", "unix:///b2.sock"))
        events = [await anext(sub) for _ in range(3)]
        assert [(e.record.name, e.deleted) for e in events] == [
            ("b", False), ("a", True), ("b", False)
        ]
        assert events[2].record.url == "unix:///b2.sock"
        assert store.watcher_count == 1
    assert store.watcher_count == 0


async def test_closed_subscription_ends_iteration_after_draining() -> None:
    store: MemoryStore[NetworkServiceEndpoint] = MemoryStore()
    sub = await store.watch()
    await store.put(rec("a"))
    sub.close()
    sub.close()  # idempotent
    assert [e.record.name async for e in sub] == ["a"]
    assert store.watcher_count == 0
    await store.put(rec("b"))  # no longer delivered
    assert sub.pending() == 0


async def test_store_close_wakes_waiting_watchers() -> None:
    store: MemoryStore[NetworkServiceEndpoint] = MemoryStore()
    subs = [await store.watch() for _ in range(3)]

    async def drain(
        sub: Subscription[NetworkServiceEndpoint],
    ) -> list[Event[NetworkServiceEndpoint]]:
        return [e async for e in sub]

    tasks = [asyncio.create_task(drain(s)) for s in subs]
    await asyncio.sleep(0.01)
    await store.close()
    assert await asyncio.gather(*tasks) == [[], [], []]
    assert store.watcher_count == 0


async def test_slow_watcher_overflows_without_blocking_others() -> None:
    store: MemoryStore[NetworkServiceEndpoint] = MemoryStore()
    slow = await store.watch(maxsize=3)
    fast = await store.watch(maxsize=100)
    for i in range(10):
        await store.put(rec(f"n{i}"))  # never blocks
    assert slow.overflowed and slow.closed
    assert store.watcher_count == 1  # the slow one was dropped
    with pytest.raises(ResourceExhausted):
        await anext(slow)
    assert [(await anext(fast)).record.name for _ in range(10)] == [f"n{i}" for i in range(10)]
    fast.close()


def test_subscription_needs_room() -> None:
    with pytest.raises(ValueError):
        Subscription([], maxsize=0)


# --- the Store contract: revisions, compare-and-set, expiry ---------------------------------
# Written against the interface, with the store made by ``STORES``: a later store (etcd,
# Kubernetes) joins the list and must pass the same tests.

STORES: dict[str, Callable[[], Store[NetworkServiceEndpoint]]] = {"memory": MemoryStore}


@pytest.fixture(params=sorted(STORES))
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store[NetworkServiceEndpoint]]:
    made = STORES[request.param]()
    try:
        yield made
    finally:
        await made.close()


async def test_every_write_gets_a_higher_revision(store: Store[NetworkServiceEndpoint]) -> None:
    a1 = await store.put(rec("a"))
    b1 = await store.put(rec("b"))
    a2 = await store.put(rec("a", "unix:///a2.sock"))
    assert 0 < a1.revision < b1.revision < a2.revision
    assert await store.get("a") == a2
    async with await store.watch() as sub:
        assert sub.revision >= a2.revision  # the snapshot's revision
        await store.delete("b")
        event = await anext(sub)
        assert (event.record.name, event.deleted) == ("b", True)
        assert event.revision > sub.revision


async def test_compare_and_set_by_revision(store: Store[NetworkServiceEndpoint]) -> None:
    created = await store.put(rec("a"), revision=ABSENT)  # create only if absent
    with pytest.raises(Conflict):
        await store.put(rec("a", "unix:///twice.sock"), revision=ABSENT)
    updated = await store.put(rec("a", "unix:///a2.sock"), revision=created.revision)
    async with await store.watch() as sub:
        with pytest.raises(Conflict):  # a writer that read before the update loses
            await store.put(rec("a", "unix:///stale.sock"), revision=created.revision)
        with pytest.raises(Conflict):
            await store.delete("a", revision=created.revision)
        with pytest.raises(Conflict):
            await store.put(rec("new"), revision=updated.revision)  # "new" does not exist
        entry = await store.get("a")
        assert entry is not None and entry.record.url == "unix:///a2.sock"
        assert entry.revision == updated.revision
        assert sub.pending() == 0  # a lost compare-and-set changes nothing and tells no one
        removed = await store.delete("a", revision=updated.revision)
        assert removed is not None and removed.url == "unix:///a2.sock"
    assert await store.delete("a", revision=updated.revision) is None  # gone: idempotent
    assert await store.get("a") is None


async def test_a_record_expires_at_its_time(store: Store[NetworkServiceEndpoint]) -> None:
    async with await store.watch() as sub:
        expires = time.time() + 0.2
        await store.put(rec("short"), expires=expires)
        await store.put(rec("forever"))
        assert [(await anext(sub)).record.name for _ in range(2)] == ["short", "forever"]
        event = await asyncio.wait_for(anext(sub), 2)
        late = time.time() - expires
        assert (event.record.name, event.deleted, event.expired) == ("short", True, True)
        assert 0 <= late < 0.1, f"removed {late:.3f}s after expiry"
        assert await store.get("short") is None
        assert [r.name for r in await store.list()] == ["forever"]


async def test_a_later_put_replaces_the_expiry(store: Store[NetworkServiceEndpoint]) -> None:
    async with await store.watch() as sub:
        await store.put(rec("a"), expires=time.time() + 0.1)
        await store.put(rec("a"), expires=time.time() + 0.4)  # refreshed before its time
        await store.put(rec("b"), expires=time.time() + 0.1)
        await store.put(rec("b"))  # no longer expires
        await asyncio.sleep(0.25)
        assert sorted(r.name for r in await store.list()) == ["a", "b"]
        entry = await store.get("a")
        assert entry is not None and entry.expires is not None
        await asyncio.sleep(0.3)
        assert [r.name for r in await store.list()] == ["b"]
        events = [await anext(sub) for _ in range(5)]
        assert [(e.record.name, e.deleted, e.expired) for e in events][-1] == ("a", True, True)
        assert sub.pending() == 0  # "b" never expired


async def test_a_deleted_record_does_not_expire_later(store: Store[NetworkServiceEndpoint]) -> None:
    await store.put(rec("a"), expires=time.time() + 0.1)
    await store.delete("a")
    async with await store.watch() as sub:
        await asyncio.sleep(0.2)
        assert sub.pending() == 0

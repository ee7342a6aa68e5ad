"""The in-memory store and its subscriptions (no gRPC)."""

from __future__ import annotations

import asyncio

import pytest

from nsm.api.registry_pb2 import NetworkServiceEndpoint
from nsm.errors import ResourceExhausted
from nsm.registry.memory import MemoryStore
from nsm.registry.store import Event, Store, Subscription

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
    assert stored.url == "unix:///a.sock"
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

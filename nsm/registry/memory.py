"""The embedded in-memory :class:`~nsm.registry.store.Store` (the registry's default)."""

from __future__ import annotations

import asyncio
import time
from typing import Generic

from nsm.log import get_logger
from nsm.registry.store import (
    DEFAULT_WATCH_QUEUE,
    Entry,
    Event,
    R,
    Subscription,
    check_revision,
)

log = get_logger(__name__)


class MemoryStore(Generic[R]):
    """Entries in a dict, change events pushed synchronously to every subscription, one event
    loop timer per record that expires.

    Nothing here awaits, so each operation (a compare-and-set included) is atomic with respect
    to other coroutines on the event loop, and a snapshot plus subscription is taken in one step.
    ``kind`` names the records in logs ("endpoint expired").
    """

    def __init__(self, *, kind: str = "record") -> None:
        self.kind = kind
        self._entries: dict[str, Entry[R]] = {}
        self._subscriptions: set[Subscription[R]] = set()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._revision = 0

    @property
    def watcher_count(self) -> int:
        """Live subscriptions (for tests and metrics)."""
        return len(self._subscriptions)

    def __len__(self) -> int:
        return len(self._entries)

    async def put(
        self, record: R, *, expires: float | None = None, revision: int | None = None,
        owner: str | None = None,
    ) -> Entry[R]:
        name: str = record.name  # type: ignore[attr-defined]
        check_revision(name, self._entries.get(name), revision)
        stored = type(record)()
        stored.CopyFrom(record)
        self._revision += 1
        entry = Entry(stored, self._revision, expires, owner)
        self._entries[name] = entry
        self._schedule(name, entry)
        self._publish(Event(stored, deleted=False, revision=self._revision))
        return entry

    async def get(self, name: str) -> Entry[R] | None:
        return self._entries.get(name)

    async def delete(self, name: str, *, revision: int | None = None) -> R | None:
        current = self._entries.get(name)
        if current is None:
            return None  # idempotent, whatever revision was asked for
        check_revision(name, current, revision)
        self._remove(name, expired=False)
        return current.record

    async def list(self) -> list[R]:
        return [entry.record for entry in self._entries.values()]

    async def watch(self, *, maxsize: int = DEFAULT_WATCH_QUEUE) -> Subscription[R]:
        sub: Subscription[R] = Subscription(
            [entry.record for entry in self._entries.values()], revision=self._revision, maxsize=maxsize,
            on_close=self._subscriptions.discard,
        )
        self._subscriptions.add(sub)
        return sub

    async def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for sub in list(self._subscriptions):
            sub.close()
        self._subscriptions.clear()

    # internals

    def _schedule(self, name: str, entry: Entry[R]) -> None:
        """(Re)arm the expiry timer of ``name`` for ``entry`` (none when it never expires)."""
        old = self._timers.pop(name, None)
        if old is not None:
            old.cancel()
        if entry.expires is not None:
            delay = max(entry.expires - time.time(), 0.0)
            self._timers[name] = asyncio.get_running_loop().call_later(
                delay, self._expire, name, entry.revision)

    def _expire(self, name: str, revision: int) -> None:
        self._timers.pop(name, None)
        entry = self._entries.get(name)
        if entry is None or entry.revision != revision or entry.expires is None:
            return  # written again since this timer was armed
        if entry.expires > time.time():  # the loop's clock ran ahead of the wall clock
            self._schedule(name, entry)
            return
        self._remove(name, expired=True)
        log.info(f"{self.kind} expired", name=name)

    def _remove(self, name: str, *, expired: bool) -> None:
        entry = self._entries.pop(name)
        timer = self._timers.pop(name, None)
        if timer is not None:
            timer.cancel()
        self._revision += 1
        self._publish(Event(entry.record, deleted=True, revision=self._revision, expired=expired))

    def _publish(self, event: Event[R]) -> None:
        # Iterate over a copy: an overflowing subscription removes itself.
        for sub in list(self._subscriptions):
            sub.push(event)

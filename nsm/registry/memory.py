"""The embedded in-memory :class:`~nsm.registry.store.Store` (the registry's default)."""

from __future__ import annotations

from typing import Generic

from nsm.registry.store import DEFAULT_WATCH_QUEUE, Event, R, Subscription


class MemoryStore(Generic[R]):
    """Records in a dict, change events pushed synchronously to every subscription.

    Nothing here awaits, so each operation is atomic with respect to other coroutines on the
    event loop, and a snapshot plus subscription is taken in one step.
    """

    def __init__(self) -> None:
        self._records: dict[str, R] = {}
        self._subscriptions: set[Subscription[R]] = set()

    @property
    def watcher_count(self) -> int:
        """Live subscriptions (for tests and metrics)."""
        return len(self._subscriptions)

    def __len__(self) -> int:
        return len(self._records)

    async def put(self, record: R) -> R:
        stored = type(record)()
        stored.CopyFrom(record)
        self._records[stored.name] = stored  # type: ignore[attr-defined]
        self._publish(Event(stored, deleted=False))
        return stored

    async def get(self, name: str) -> R | None:
        return self._records.get(name)

    async def delete(self, name: str) -> R | None:
        record = self._records.pop(name, None)
        if record is not None:
            self._publish(Event(record, deleted=True))
        return record

    async def list(self) -> list[R]:
        return list(self._records.values())

    async def watch(self, *, maxsize: int = DEFAULT_WATCH_QUEUE) -> Subscription[R]:
        sub: Subscription[R] = Subscription(
            list(self._records.values()), maxsize=maxsize, on_close=self._subscriptions.discard
        )
        self._subscriptions.add(sub)
        return sub

    async def close(self) -> None:
        for sub in list(self._subscriptions):
            sub.close()
        self._subscriptions.clear()

    def _publish(self, event: Event[R]) -> None:
        # Iterate over a copy: an overflowing subscription removes itself.
        for sub in list(self._subscriptions):
            sub.push(event)

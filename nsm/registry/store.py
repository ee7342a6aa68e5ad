"""The storage interface of the registry: named records plus a change feed.

A store holds one kind of record (``NetworkService`` or ``NetworkServiceEndpoint``) keyed by
its ``name``. It knows nothing about matching, validation or expiry: the registry does those,
so a distributed store only has to provide these few operations.

Records given to :meth:`Store.put` are copied; records handed out (by ``get``, ``list`` and
events) are shared between readers and must be treated as read-only.

:class:`Subscription` is the one watch mechanism: a bounded, non-blocking queue of
:class:`Event` per watcher that a store fills and a watcher drains. A store never waits for a
watcher; a watcher that falls more than ``maxsize`` events behind is dropped and its next read
raises :class:`~nsm.errors.ResourceExhausted`.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Generic, Protocol, TypeVar

from google.protobuf.message import Message

from nsm.errors import ResourceExhausted

R = TypeVar("R", bound=Message)

#: Default number of undelivered events a watcher may hold before it is dropped.
DEFAULT_WATCH_QUEUE = 1024


@dataclass(frozen=True, slots=True)
class Event(Generic[R]):
    """A change of one record: put (``deleted=False``) or removed (``deleted=True``)."""

    record: R
    deleted: bool


class Subscription(Generic[R]):
    """One watcher's view of a store: a snapshot taken atomically with the subscription,
    then every later change, in order.

    Iterate with ``async for event in sub``; the iteration ends after :meth:`close` and raises
    :class:`~nsm.errors.ResourceExhausted` if the watcher overflowed. Use it as an async context
    manager (or call :meth:`close`) so the store forgets it when the watcher goes away.
    """

    def __init__(
        self,
        snapshot: list[R],
        *,
        maxsize: int = DEFAULT_WATCH_QUEUE,
        on_close: Callable[[Subscription[R]], None] | None = None,
    ) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        self.snapshot = snapshot
        self.maxsize = maxsize
        self._events: collections.deque[Event[R]] = collections.deque()
        self._wakeup = asyncio.Event()
        self._on_close = on_close
        self._closed = False
        self._overflowed = False

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def overflowed(self) -> bool:
        return self._overflowed

    def push(self, event: Event[R]) -> bool:
        """Queue an event without ever blocking. Returns False when the subscription is (now)
        closed: either already closed, or this event overflowed its queue."""
        if self._closed:
            return False
        if len(self._events) >= self.maxsize:
            self._overflowed = True
            self._events.clear()
            self.close()
            return False
        self._events.append(event)
        self._wakeup.set()
        return True

    def close(self) -> None:
        """End the subscription (idempotent); a waiting reader wakes up and stops."""
        if self._closed:
            return
        self._closed = True
        self._wakeup.set()
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close(self)

    def pending(self) -> int:
        """Events queued and not yet read."""
        return len(self._events)

    def __aiter__(self) -> Subscription[R]:
        return self

    async def __anext__(self) -> Event[R]:
        while True:
            if self._overflowed:
                raise ResourceExhausted(
                    f"watcher fell more than {self.maxsize} events behind and was dropped"
                )
            if self._events:
                return self._events.popleft()
            if self._closed:
                raise StopAsyncIteration
            self._wakeup.clear()
            await self._wakeup.wait()

    async def __aenter__(self) -> Subscription[R]:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Store(Protocol[R]):
    """Named records of one kind, with a change feed. All methods are coroutines so that a
    networked store fits the same interface."""

    async def put(self, record: R) -> R:
        """Create or replace the record named ``record.name``; watchers get ``deleted=False``.
        Returns the stored record."""
        ...

    async def get(self, name: str) -> R | None:
        """The record named ``name``, or None."""
        ...

    async def delete(self, name: str) -> R | None:
        """Remove the record named ``name``; watchers get ``deleted=True``. Returns the removed
        record, or None if there was none (deleting is idempotent)."""
        ...

    async def list(self) -> list[R]:
        """Every record, in no particular order."""
        ...

    async def watch(self, *, maxsize: int = DEFAULT_WATCH_QUEUE) -> Subscription[R]:
        """Subscribe to changes. The returned subscription's ``snapshot`` holds every record at
        the moment of subscribing; its events are exactly the changes after that moment."""
        ...

    async def close(self) -> None:
        """End every subscription and release resources. Idempotent."""
        ...

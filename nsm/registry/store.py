"""The storage interface of the registry: named records with revisions, expiry and a change feed.

A store holds one kind of record (``NetworkService`` or ``NetworkServiceEndpoint``) keyed by its
``name``. It knows nothing about validation or matching (the registry does those, with the pure
rules of :mod:`nsm.registry.matching`); it does keep the two things a store shared by several
registry replicas must own itself, so that the servicers never hold a lock or a timer of their own:

- **expiry**: ``put(record, expires=t)`` makes the store remove the record at wall-clock time ``t``
  (seconds since the epoch) unless it is put again before; watchers get ``deleted=True,
  expired=True``. A later put replaces the expiry (``expires=None``: never expires).
- **compare-and-set**: every write gets a revision from one counter per store that only grows;
  ``put(record, revision=n)`` and ``delete(name, revision=n)`` happen only while the stored
  entry's revision is still ``n`` (``n=0``: only while there is no such record), and raise
  :class:`~nsm.errors.Conflict` otherwise. The registry reads an entry, computes the new record
  from it and writes it back with the revision it read, retrying on a conflict, so two replicas
  refreshing one endpoint never lose each other's work.

- **ownership**: ``put(record, owner=...)`` stores, with the record, the SPIFFE ID the registry
  decided owns it (the first registrant; :mod:`nsm.registry.authz`). It is not part of the
  record (a caller can neither set nor read it) and it ends with the entry: when the record
  expires or is deleted, the name is free again. etcd: the value holds ``{owner, record}``.

What a store implements (in memory: :mod:`nsm.registry.memory`; on etcd, for example):

- ``put(record, expires=, revision=, owner=)`` → :class:`Entry`: create or replace, atomically
  with the revision check. etcd: a txn comparing ``mod_revision`` (``create_revision == 0`` for 0) that
  puts the key under a lease of TTL ``expires - now``.
- ``get(name)`` → :class:`Entry` or None, with the revision to compare against. etcd: get, its
  ``mod_revision``.
- ``delete(name, revision=)``: remove (idempotent), optionally compared. etcd: a txn, delete.
- ``list()``: every record of the kind. etcd: a range over the kind's key prefix.
- ``watch()``: a :class:`Subscription` whose snapshot is every record at one revision N
  (``Subscription.revision``) and whose events are exactly the changes after N, in order, each
  with its revision. etcd: a range read at revision N, then a watch from N + 1; a lease's expiry
  arrives as a delete.
- ``close()``: end every subscription (and, in memory, stop the expiry timers).

On Kubernetes resources the same holds with ``metadata.resourceVersion`` as the revision (an
update carrying it is a compare-and-set), a list + watch from the list's resourceVersion, and
expiry done by whichever replica holds a lease (or by a controller).

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
from typing import Generic, Protocol, TypeVar

from google.protobuf.message import Message

from nsm.errors import Conflict, ResourceExhausted

R = TypeVar("R", bound=Message)

#: Default number of undelivered events a watcher may hold before it is dropped.
DEFAULT_WATCH_QUEUE = 1024


#: The ``revision`` to pass to :meth:`Store.put` to create a record only if it does not exist.
ABSENT = 0


@dataclass(frozen=True, slots=True)
class Entry(Generic[R]):
    """A stored record, the revision of its last write, when the store removes it (seconds
    since the epoch; None: never) and who owns it (a SPIFFE ID; None: nobody, as in insecure
    mode)."""

    record: R
    revision: int
    expires: float | None = None
    owner: str | None = None


@dataclass(frozen=True, slots=True)
class Event(Generic[R]):
    """A change of one record: put (``deleted=False``) or removed (``deleted=True``; with
    ``expired`` when its time ran out), at store revision ``revision``."""

    record: R
    deleted: bool
    revision: int = 0
    expired: bool = False


def check_revision(name: str, current: Entry[R] | None, revision: int | None) -> None:
    """Raise :class:`~nsm.errors.Conflict` unless a write conditioned on ``revision`` may replace
    ``current`` (the stored entry named ``name``, or None)."""
    if revision is None:
        return
    have = ABSENT if current is None else current.revision
    if have != revision:
        raise Conflict(f"record {name!r} is at revision {have}, not {revision}")


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
        revision: int = 0,
        maxsize: int = DEFAULT_WATCH_QUEUE,
        on_close: Callable[[Subscription[R]], None] | None = None,
    ) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        self.snapshot = snapshot
        self.revision = revision  # the store's revision the snapshot reflects
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

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()


class Store(Protocol[R]):
    """Named records of one kind with revisions, expiry and a change feed (the contract is in
    this module's docstring). All methods are coroutines so that a networked store fits."""

    async def put(
        self, record: R, *, expires: float | None = None, revision: int | None = None,
        owner: str | None = None,
    ) -> Entry[R]:
        """Create or replace the record named ``record.name``; watchers get ``deleted=False``.

        ``expires``: when the store removes it (seconds since the epoch; None: never).
        ``revision``: write only if the stored entry's revision is still this one (:data:`ABSENT`:
        only if there is none), else raise :class:`~nsm.errors.Conflict`; None: unconditionally.
        ``owner``: the entry's owner from now on (replaces the previous one; the registry passes
        the one it keeps). Returns the stored entry (a copy of ``record``, its new revision)."""
        ...

    async def get(self, name: str) -> Entry[R] | None:
        """The entry named ``name``, or None."""
        ...

    async def delete(self, name: str, *, revision: int | None = None) -> R | None:
        """Remove the record named ``name``; watchers get ``deleted=True``. Returns the removed
        record, or None if there was none (deleting is idempotent). ``revision`` as for
        :meth:`put` (a mismatch raises :class:`~nsm.errors.Conflict`)."""
        ...

    async def list(self) -> list[R]:
        """Every record, in no particular order."""
        ...

    async def watch(self, *, maxsize: int = DEFAULT_WATCH_QUEUE) -> Subscription[R]:
        """Subscribe to changes. The returned subscription's ``snapshot`` holds every record at
        revision ``revision``; its events are exactly the changes after that revision."""
        ...

    async def close(self) -> None:
        """End every subscription and release resources (timers, connections). Idempotent."""
        ...

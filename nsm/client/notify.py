"""notify (client side): every state change of every connection, to the user and the log.

A connection is ESTABLISHED by its first successful Request and REFRESHED by each later one. It
is DOWN when the chain gives its path up (expired without a refresh) or a heal starts
(:mod:`nsm.client.heal`: the reason says what broke and what the heal does), and HEALED by the
next successful Request after that. Each failed Request is FAILED (the caller gets
the error too; refreshes and heals are retried), and Close makes it CLOSED. Subscribers get a
:class:`StateChange` by callback (:meth:`Notify.subscribe`, called inside the event, before the
caller sees its result) or by async iteration (:meth:`Notify.changes`); each is also a log line.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from nsm.api.connection_pb2 import Connection
from nsm.api.networkservice_pb2 import NetworkServiceRequest
from nsm.chain import Ctx, Element, Key, NextClose, NextRequest
from nsm.client.begin import EVENT, Event, Kind
from nsm.errors import NsmError

#: Changes kept for an iterator that does not keep up; older ones are dropped.
QUEUE_SIZE = 1024


class State(enum.Enum):
    ESTABLISHED = "established"
    REFRESHED = "refreshed"
    DOWN = "down"
    HEALED = "healed"
    FAILED = "failed"
    CLOSED = "closed"


@dataclass(frozen=True)
class StateChange:
    """One change: the connection now (the last good one for DOWN and FAILED, None before the
    first), the error of FAILED (and of a CLOSED whose Close failed), why the chain acted."""

    state: State
    conn_id: str
    connection: Connection | None = None
    error: NsmError | None = None
    reason: str = ""


#: The last good connection, and whether it was reported DOWN since.
_LAST: Key[Connection] = Key("client.notify.last")
_DOWN: Key[bool] = Key("client.notify.down")
#: Log levels of the changes that are not warnings.
_QUIET = {State.REFRESHED: "debug", State.ESTABLISHED: "info", State.CLOSED: "info"}


class Notify(Element):
    def __init__(self) -> None:
        self._callbacks: list[Callable[[StateChange], None]] = []
        self._queues: set[asyncio.Queue[StateChange | None]] = set()

    def subscribe(self, callback: Callable[[StateChange], None]) -> Callable[[], None]:
        """Call ``callback`` with every change; returns the function that unsubscribes."""
        self._callbacks.append(callback)

        def unsubscribe() -> None:
            if callback in self._callbacks:
                self._callbacks.remove(callback)

        return unsubscribe

    async def changes(self, conn_id: str | None = None) -> AsyncIterator[StateChange]:
        """The changes from now on (of ``conn_id`` only, when given), until :meth:`shutdown`."""
        queue: asyncio.Queue[StateChange | None] = asyncio.Queue(QUEUE_SIZE)
        self._queues.add(queue)
        try:
            while (change := await queue.get()) is not None:
                if conn_id is None or change.conn_id == conn_id:
                    yield change
        finally:
            self._queues.discard(queue)

    def _emit(self, ctx: Ctx, state: State, conn: Connection | None, *, error: NsmError | None = None,
              reason: str = "") -> None:
        change = StateChange(state, ctx.conn_id, conn, error, reason)
        level = _QUIET.get(state, "warning")
        if state is State.FAILED and not ctx.internal:
            level = "info"  # the caller gets the error
        elif error is not None:
            level = "warning"  # a failed Close: the caller may well ignore it
        fields: dict[str, object] = {"reason": reason} if reason else {}
        if conn is not None:
            fields["endpoint"] = conn.network_service_endpoint_name
        if error is not None:
            fields.update(code=error.code.name, error=error.message)
        getattr(ctx.log, level)(f"connection {state.value}", **fields)
        for callback in list(self._callbacks):
            try:
                callback(change)
            except Exception as exc:  # a user callback must not break the connection
                ctx.log.warning("state change callback failed", error=repr(exc))
        for queue in self._queues:
            if queue.full():
                queue.get_nowait()
                ctx.log.warning("state change iterator fell behind: oldest change dropped")
            queue.put_nowait(change)

    async def request(self, ctx: Ctx, request: NetworkServiceRequest, next: NextRequest) -> Connection:
        event = ctx.meta.get(EVENT) or Event(Kind.REQUEST)
        before = ctx.meta.get(_LAST)
        gives_up = event.heal or event.kind in (Kind.FRESH, Kind.RESELECT)
        if gives_up and before is not None and not ctx.meta.get(_DOWN):
            ctx.meta.set(_DOWN, True)
            self._emit(ctx, State.DOWN, before, reason=event.reason)
        try:
            conn = await next(ctx, request)
        except NsmError as exc:
            self._emit(ctx, State.FAILED, before, error=exc, reason=event.reason)
            raise
        last = Connection()
        last.CopyFrom(conn)
        ctx.meta.set(_LAST, last)
        now = (State.ESTABLISHED if before is None else
               State.HEALED if ctx.meta.pop(_DOWN) else State.REFRESHED)
        self._emit(ctx, now, last, reason=event.reason)
        return conn

    async def close(self, ctx: Ctx, conn: Connection, next: NextClose) -> None:
        event = ctx.meta.get(EVENT)
        if event is not None and event.kind is Kind.RESELECT:  # the first half of a heal
            await next(ctx, conn)
            return
        reason = event.reason if event is not None else ""
        try:
            await next(ctx, conn)
        except NsmError as exc:
            self._emit(ctx, State.CLOSED, None, error=exc, reason=reason)
            raise
        self._emit(ctx, State.CLOSED, None, reason=reason)

    async def shutdown(self) -> None:
        """End every iterator."""
        for queue in self._queues:
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(None)

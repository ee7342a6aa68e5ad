"""begin (client side): one event at a time per connection id, and the events the chain starts
by itself (refresh, heal) built from what the caller last asked for.

The head of the client chain. Like the servers' :class:`nsm.elements.begin.Begin` it serialises
Requests and Closes per connection id, forgets a connection whose first Request failed and
closes with the last good connection. In addition it keeps the caller's request (the template of
later events) and hands every element an :class:`Events` for the connection (``ctx.meta`` key
:data:`EVENTS`), which starts a new event from here, serialised with all others of the
connection: the reference's ``begin.EventFactory``. ``ctx.meta`` key :data:`EVENT` says which
kind of event is in flight.

A Close from the caller cancels the refresh or heal events of the connection that are waiting or
in flight, so that closing never waits for a retry against a peer that is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from nsm.api.connection_pb2 import RESELECT_REQUESTED, UP, Connection
from nsm.api.networkservice_pb2 import NetworkServiceRequest
from nsm.chain import Chain, Ctx, Element, Key, Meta, NextClose, NextRequest, new_id
from nsm.errors import NsmError


class Kind(enum.Enum):
    """What an event does."""

    #: The caller's Request (the first, or again).
    REQUEST = "request"
    #: The last connection again, same path: a refresh, or a heal when only the control plane broke.
    REFRESH = "refresh"
    #: Afresh: same id, only this client's segment, no endpoint or mechanism chosen, the addresses
    #: kept (an endpoint that still knows them gives them back). After the connection expired.
    FRESH = "fresh"
    #: Close the old path first, then afresh with state RESELECT_REQUESTED and the old endpoint's
    #: name, which the manager tries last (heal: the endpoint or the data plane is gone).
    RESELECT = "reselect"
    #: Close.
    CLOSE = "close"


@dataclass(frozen=True)
class Event:
    """The event in flight: its kind, why it was started ("" for the caller's own) and whether
    it heals a connection found broken (:mod:`nsm.client.heal`; the connection is DOWN until it
    succeeds, whatever its kind)."""

    kind: Kind
    reason: str = ""
    heal: bool = False
    #: RESELECT: how long the Close of the old path may take before the new Request goes out
    #: anyway (None: as long as the chain's Close takes). A hop on the old path may be silent
    #: (a node cut off), and its Close would wait for a timeout meant for live peers.
    close_timeout: float | None = None


#: The event in flight for this connection.
EVENT: Key[Event] = Key("client.event")


class Events:
    """Starts new events for one connection from the head of the chain, one at a time with every
    other event of the connection.

    Call it from a task of your own (a timer, a monitor stream, a liveness probe), never from
    inside an event of the same connection: that event would wait for itself."""

    def __init__(self, begin: ClientBegin, conn_id: str) -> None:
        self._begin = begin
        self.conn_id = conn_id

    async def request(self, kind: Kind = Kind.REFRESH, *, reason: str = "",
                      heal: bool = False, close_timeout: float | None = None) -> Connection | None:
        """Re-send the connection (``kind`` REFRESH, FRESH or RESELECT); None when it has been
        closed meanwhile. ``heal``: the connection was found broken (reported DOWN until an
        event succeeds); ``close_timeout``: see :attr:`Event.close_timeout`. Raises the domain
        error of a failed Request."""
        if kind in (Kind.REQUEST, Kind.CLOSE):
            raise ValueError(f"an event of kind {kind.value} is not started by the chain")
        return await self._begin._internal(self.conn_id, Event(kind, reason, heal, close_timeout))

    def quiet(self) -> int | None:
        """None while an event of the connection is in flight (or waits for one); otherwise a
        number that changes each time one starts or ends. Whoever looks at the data plane from
        outside compares it before and after: an event in between (a hop rebuilding the
        interface, say) makes what was seen meanwhile say nothing about the connection."""
        return self._begin._quiet(self.conn_id)

    async def close(self, *, reason: str = "") -> None:
        """Close the connection (a no-op when it is closed already)."""
        await self._begin._internal(self.conn_id, Event(Kind.CLOSE, reason))


#: The :class:`Events` of this connection.
EVENTS: Key[Events] = Key("client.events")


def _copy(conn: Connection) -> Connection:
    out = Connection()
    out.CopyFrom(conn)
    return out


def refresh_request(template: NetworkServiceRequest, last: Connection) -> NetworkServiceRequest:
    """The last connection again (same id, path, endpoint, mechanism), with the template's
    labels and mechanism preferences; the client's segment is index 0 and the state UP (a
    refresh never asks for a reselect, whatever state the last answer carried)."""
    request = NetworkServiceRequest()
    request.connection.CopyFrom(last)
    request.connection.path.index = 0
    request.connection.state = UP
    request.connection.labels.update(template.connection.labels)
    request.mechanism_preferences.extend(template.mechanism_preferences)
    return request


def fresh_request(template: NetworkServiceRequest, last: Connection | None, *,
                  reselect: bool = False) -> NetworkServiceRequest:
    """The template from scratch: same id, no path (the client adds its own segment), no
    mechanism chosen, the last addresses kept. No endpoint chosen either; but with
    ``reselect`` (state RESELECT_REQUESTED) the last endpoint's name goes along: the manager
    chooses afresh and tries that one last (it broke; after a restart, or with its node lost,
    the manager has no other way to know it)."""
    request = NetworkServiceRequest()
    request.CopyFrom(template)
    conn = request.connection
    conn.ClearField("path")
    conn.ClearField("mechanism")
    conn.network_service_endpoint_name = (last.network_service_endpoint_name
                                          if reselect and last is not None else "")
    conn.state = RESELECT_REQUESTED if reselect else UP
    if last is not None and last.HasField("context"):
        conn.context.CopyFrom(last.context)
    return request


@dataclass
class _Entry:
    template: NetworkServiceRequest
    events: Events
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    meta: Meta = field(default_factory=Meta)
    last: Connection | None = None
    #: What :meth:`ClientBegin.last` hands out: one copy per successful event, so two looks with
    #: no event between them see the same object (callers compare identities to spot a change).
    view: Connection | None = None
    closed: bool = False
    #: Tasks inside an internal event of this connection (waiting for the lock or in flight).
    internal: set[asyncio.Task[Any]] = field(default_factory=set)
    #: Events started and ended (see :meth:`Events.quiet`).
    turns: int = 0

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """One event at a time (the lock), counted at its start and end."""
        async with self.lock:
            self.turns += 1
            try:
                yield
            finally:
                self.turns += 1


class ClientBegin(Element):
    """The head of the client chain (see the module)."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self._chain: Chain | None = None
        self._next: NextRequest | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def ids(self) -> list[str]:
        return [i for i, e in self._entries.items() if e.last is not None]

    def last(self, conn_id: str) -> Connection | None:
        """A copy of the last good connection with this id (the same object until the next
        successful event; do not change it), None when there is none."""
        entry = self._entries.get(conn_id)
        if entry is None or entry.last is None:
            return None
        if entry.view is None:
            entry.view = _copy(entry.last)
        return entry.view

    def events(self, conn_id: str) -> Events | None:
        entry = self._entries.get(conn_id)
        return entry.events if entry is not None else None

    async def request(self, ctx: Ctx, request: NetworkServiceRequest, next: NextRequest) -> Connection:
        self._chain, self._next = ctx.chain, next
        if not request.connection.id:
            request.connection.id = new_id()
        conn_id = request.connection.id
        template = NetworkServiceRequest()
        template.CopyFrom(request)
        while True:
            entry = self._entries.get(conn_id)
            if entry is None:
                entry = self._entries[conn_id] = _Entry(template=template, events=Events(self, conn_id))
            async with entry.turn():
                if entry.closed:  # closed while we waited: start afresh
                    continue
                conn = await self._run(ctx, entry, Event(Kind.REQUEST), request)
                entry.template = template  # what later events re-send
                return conn

    async def close(self, ctx: Ctx, conn: Connection, next: NextClose) -> None:
        entry = self._entries.get(conn.id)
        if entry is None:
            return
        current = asyncio.current_task()
        for task in list(entry.internal):
            if task is not current:
                task.cancel()
        async with entry.turn():
            await self._close(ctx, entry, Event(Kind.CLOSE), next)

    async def refresh(self, conn_id: str) -> Connection | None:
        """The caller's refresh: the last connection again, now; None when there is none."""
        return await self._internal(conn_id, Event(Kind.REFRESH), caller=True)

    async def _internal(self, conn_id: str, event: Event, *, caller: bool = False) -> Connection | None:
        """An event built from the template and the last connection; started by the chain
        unless ``caller`` (a caller's is not cancelled by Close, and reports its own errors)."""
        entry = self._entries.get(conn_id)
        chain, next = self._chain, self._next
        if entry is None or chain is None or next is None:
            return None
        task = None if caller else asyncio.current_task()
        if task is not None:
            entry.internal.add(task)
        try:
            async with entry.turn():
                if entry.closed or entry.last is None:
                    return None
                ctx = chain.context(internal=not caller)
                if event.kind is Kind.CLOSE:
                    await self._close(ctx, entry, event, lambda c, conn: chain.close_after(self, c, conn))
                    return None
                if event.kind is Kind.REFRESH:
                    request = refresh_request(entry.template, entry.last)
                else:
                    if event.kind is Kind.RESELECT:
                        self._enter(ctx, entry, event)
                        try:
                            async with asyncio.timeout(event.close_timeout):
                                await chain.close_after(self, ctx, _copy(entry.last))
                        except NsmError as exc:  # the old path may be half gone: go on
                            ctx.log.debug("close before reselect failed", error=exc.message)
                        except TimeoutError:  # a silent hop: what it holds expires there
                            ctx.log.info("close before reselect did not end in time: going on",
                                         timeout=event.close_timeout)
                    request = fresh_request(entry.template, entry.last,
                                            reselect=event.kind is Kind.RESELECT)
                return await self._run(ctx, entry, event, request)
        finally:
            if task is not None:
                entry.internal.discard(task)

    def _quiet(self, conn_id: str) -> int | None:
        entry = self._entries.get(conn_id)
        if entry is None:
            return 0
        return None if entry.lock.locked() else entry.turns

    def _enter(self, ctx: Ctx, entry: _Entry, event: Event) -> None:
        conn_id = entry.events.conn_id
        ctx.conn_id, ctx.meta = conn_id, entry.meta
        ctx.log = ctx.log.bind(conn=conn_id, service=entry.template.connection.network_service)
        ctx.meta.set(EVENTS, entry.events)
        ctx.meta.set(EVENT, event)

    async def _run(self, ctx: Ctx, entry: _Entry, event: Event, request: NetworkServiceRequest) -> Connection:
        assert self._next is not None
        self._enter(ctx, entry, event)
        try:
            conn = await self._next(ctx, request)
        except BaseException:
            if entry.last is None:
                entry.closed = True
                self._entries.pop(entry.events.conn_id, None)
            raise
        entry.last, entry.view = _copy(conn), None
        return conn

    async def _close(self, ctx: Ctx, entry: _Entry, event: Event, next: NextClose) -> None:
        if entry.closed or entry.last is None:
            return
        self._enter(ctx, entry, event)
        try:
            await next(ctx, _copy(entry.last))
        finally:
            entry.closed = True
            self._entries.pop(entry.events.conn_id, None)

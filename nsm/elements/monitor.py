"""monitor: keeps this hop's view of its connections and streams changes to watchers
(``connection.MonitorConnection/MonitorConnections``).

A watcher first gets an INITIAL_STATE_TRANSFER of every matching connection, then UPDATE and
DELETE events. Each watcher has a bounded queue; one that falls behind is dropped rather than
slowing the data path.

Every event carries this hop's view of the connection: its own segment id as the connection id
and the path index at its own segment. A successful Request makes the connection UP (also in
what goes back up); :meth:`Monitor.set_state` changes the state later (the next hop went away:
DOWN, see :mod:`nsm.elements.monitornext`) and publishes an UPDATE when it changed; Close,
also the one an expiry starts from the chain's head, publishes DELETE.

Who sees what (policy ``monitor_owner``, when secure): a watcher sees only the connections it
is on — the ones it holds (it made their Request here) and the ones whose path up to this hop
carries a token of its identity (the tokens were checked at the Request); the identities in
``Policies.observers`` see every connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from nsm.api import connection_pb2_grpc
from nsm.api.connection_pb2 import (
    DELETE,
    INITIAL_STATE_TRANSFER,
    UP,
    UPDATE,
    Connection,
    ConnectionEvent,
    MonitorScopeSelector,
    State,
)
from nsm.api.networkservice_pb2 import NetworkServiceRequest
from nsm.chain import Ctx, Element, NextClose, NextRequest
from nsm.errors import NsmError, ResourceExhausted, grpc_errors
from nsm.limits import Limits, StreamLimiter, caller_key, check_selector
from nsm.security.policy import Policies
from nsm.security.tls import Security
from nsm.security.tokens import claims_of

QUEUE_SIZE = 1024


def matches(selector: MonitorScopeSelector, conn: Connection) -> bool:
    if selector.network_services and conn.network_service not in selector.network_services:
        return False
    for want in selector.path_segments:
        if not any(
            (want.id and seg.id == want.id) or (not want.id and want.name and seg.name == want.name)
            for seg in conn.path.path_segments
        ):
            return False
    return True


class _Watcher:
    def __init__(self, selector: MonitorScopeSelector, viewer: str | None = None) -> None:
        self.selector = selector
        #: The watcher's SPIFFE ID when it sees only its own connections (None: every one).
        self.viewer = viewer
        self.queue: asyncio.Queue[ConnectionEvent | None] = asyncio.Queue(QUEUE_SIZE)
        self.overflowed = False


class Monitor(Element, connection_pb2_grpc.MonitorConnectionServicer):
    """Both the chain element and the MonitorConnection servicer of one daemon.

    Streams are limited per caller (:func:`nsm.limits.caller_key`: its SPIFFE ID when secure)
    and in all (``limits``); past either, RESOURCE_EXHAUSTED."""

    def __init__(self, security: Security | None = None, policies: Policies | None = None, *,
                 limits: Limits | None = None) -> None:
        self.security = security or Security.insecure()
        self.policies = policies or Policies()
        self._conns: dict[str, Connection] = {}
        self._watchers: set[_Watcher] = set()
        #: Who may see each connection (its holder, the signers on its path), when secure.
        self._holders: dict[str, str] = {}
        self._viewers: dict[str, frozenset[str]] = {}
        limits = limits or Limits()
        self._streams = StreamLimiter("MonitorConnections", limits.monitor_streams_per_caller,
                                      limits.monitor_streams)

    @property
    def connections(self) -> dict[str, Connection]:
        return dict(self._conns)

    def watcher_count(self) -> int:
        return len(self._watchers)

    def _visible(self, viewer: str | None, view: Connection) -> bool:
        if viewer is None or self._holders.get(view.id) == viewer:
            return True
        viewers = self._viewers.get(view.id)
        if viewers is None:
            subs = set()
            for segment in view.path.path_segments[:view.path.index]:
                try:
                    subs.add(claims_of(segment.token).sub)
                except NsmError:
                    continue
            viewers = self._viewers[view.id] = frozenset(subs)
        return viewer in viewers

    def _viewer(self, context: grpc.aio.ServicerContext) -> str | None:
        """The watcher's identity when it may see only its own connections; None when it sees
        every one (insecure, policy off, an observer)."""
        if not self.security.enabled or not self.policies.monitor_owner:
            return None
        peer = self.security.peer_id(context)
        return None if peer is None or str(peer) in self.policies.observers else str(peer)

    def _publish(self, kind: int, conn: Connection) -> None:
        for w in list(self._watchers):
            if w.overflowed or not matches(w.selector, conn) or not self._visible(w.viewer, conn):
                continue
            event = ConnectionEvent(type=kind)  # type: ignore[arg-type]
            event.connections[conn.id].CopyFrom(conn)
            try:
                w.queue.put_nowait(event)
            except asyncio.QueueFull:
                w.overflowed = True
                self._watchers.discard(w)
                w.queue.get_nowait()
                w.queue.put_nowait(None)

    async def request(self, ctx: Ctx, request: NetworkServiceRequest, next: NextRequest) -> Connection:
        conn = await next(ctx, request)
        conn.state = UP  # whatever the caller asked for (a heal, a reselect), it is up now
        # This hop's view: its own segment id, path index at its own segment.
        view = Connection()
        view.CopyFrom(conn)
        view.path.index = request.connection.path.index
        view.id = request.connection.id
        self._conns[view.id] = view
        self._viewers.pop(view.id, None)
        if ctx.peer is not None:
            self._holders[view.id] = str(ctx.peer)
        self._publish(UPDATE, view)
        return conn

    def set_state(self, conn_id: str, state: State) -> bool:
        """Set the state of the connection this hop knows as ``conn_id`` (its own segment id)
        and publish an UPDATE, once per change. False when unknown or already in that state."""
        view = self._conns.get(conn_id)
        if view is None or view.state == state:
            return False
        changed = Connection()
        changed.CopyFrom(view)
        changed.state = state
        self._conns[conn_id] = changed
        self._publish(UPDATE, changed)
        return True

    def state(self, conn_id: str) -> State | None:
        """The state of a connection this hop knows, or None."""
        view = self._conns.get(conn_id)
        return None if view is None else view.state

    async def close(self, ctx: Ctx, conn: Connection, next: NextClose) -> None:
        try:
            await next(ctx, conn)
        finally:
            view = self._conns.pop(conn.id, None)
            if view is not None:
                self._publish(DELETE, view)
            self._holders.pop(conn.id, None)
            self._viewers.pop(conn.id, None)

    @grpc_errors
    async def MonitorConnections(
        self, request: MonitorScopeSelector, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ConnectionEvent]:
        check_selector(request)
        with self._streams.hold(caller_key(context, self.security)):
            watcher = _Watcher(request, self._viewer(context))
            initial = ConnectionEvent(type=INITIAL_STATE_TRANSFER)
            for conn_id, conn in self._conns.items():
                if matches(request, conn) and self._visible(watcher.viewer, conn):
                    initial.connections[conn_id].CopyFrom(conn)
            self._watchers.add(watcher)
            try:
                yield initial
                while True:
                    event = await watcher.queue.get()
                    if event is None:
                        raise ResourceExhausted("monitor watcher fell behind and was dropped")
                    yield event
            finally:
                self._watchers.discard(watcher)

"""monitor: keeps this hop's view of its connections and streams changes to watchers
(``connection.MonitorConnection/MonitorConnections``).

A watcher first gets an INITIAL_STATE_TRANSFER of every matching connection, then UPDATE and
DELETE events. Each watcher has a bounded queue; one that falls behind is dropped rather than
slowing the data path.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from nsm.api import connection_pb2_grpc
from nsm.api.connection_pb2 import (
    DELETE,
    INITIAL_STATE_TRANSFER,
    UPDATE,
    Connection,
    ConnectionEvent,
    MonitorScopeSelector,
)
from nsm.api.networkservice_pb2 import NetworkServiceRequest
from nsm.chain import Ctx, Element, NextClose, NextRequest
from nsm.errors import ResourceExhausted, grpc_errors

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
    def __init__(self, selector: MonitorScopeSelector) -> None:
        self.selector = selector
        self.queue: asyncio.Queue[ConnectionEvent | None] = asyncio.Queue(QUEUE_SIZE)
        self.overflowed = False


class Monitor(Element, connection_pb2_grpc.MonitorConnectionServicer):
    """Both the chain element and the MonitorConnection servicer of one daemon."""

    def __init__(self) -> None:
        self._conns: dict[str, Connection] = {}
        self._watchers: set[_Watcher] = set()

    @property
    def connections(self) -> dict[str, Connection]:
        return dict(self._conns)

    def watcher_count(self) -> int:
        return len(self._watchers)

    def _publish(self, kind: int, conn: Connection) -> None:
        for w in list(self._watchers):
            if w.overflowed or not matches(w.selector, conn):
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
        # This hop's view: its own segment id, path index at its own segment.
        view = Connection()
        view.CopyFrom(conn)
        view.path.index = request.connection.path.index
        view.id = request.connection.id
        self._conns[view.id] = view
        self._publish(UPDATE, view)
        return conn

    async def close(self, ctx: Ctx, conn: Connection, next: NextClose) -> None:
        try:
            await next(ctx, conn)
        finally:
            view = self._conns.pop(conn.id, None)
            if view is not None:
                self._publish(DELETE, view)

    @grpc_errors
    async def MonitorConnections(
        self, request: MonitorScopeSelector, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ConnectionEvent]:
        watcher = _Watcher(request)
        initial = ConnectionEvent(type=INITIAL_STATE_TRANSFER)
        for conn_id, conn in self._conns.items():
            if matches(request, conn):
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

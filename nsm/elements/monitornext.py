"""monitornext: a passthrough hop watches its next hop and reports its connections DOWN upstream
when the next hop loses them or goes away (placed just before ``Connect``).

After each successful Request the connection is watched at the URL the Request went to
(:data:`nsm.elements.connect.SENT_URL`), under the id the next hop gave its own path segment
(the key of the connection in the next hop's ``MonitorConnections`` events).

- **One stream per next hop**, shared by every connection to it, with one fixed selector: the
  path segment *name* of this hop. The next hop then sends exactly the connections that came
  through this hop (every one of them carries this hop's segment), and this hop picks its own by
  the next hop's segment id. Adding or removing a connection never re-opens the stream, so 500
  connections to one hop cost one stream, one INITIAL_STATE_TRANSFER per (re)connect and one
  event per change (a selector listing segment ids would need a new stream, and a new snapshot of
  every connection, at every Request and Close; an empty selector would bring the next hop's
  connections from every other hop too).
- **DOWN**: the next hop reports the connection DOWN or DELETE (not during this hop's own Close,
  which stops watching first), or does not know it when the stream (re)connects, or the stream
  breaks (the next hop died or stopped: UNAVAILABLE, any other error, or the stream's end) →
  :meth:`Monitor.set_state` ``DOWN``: one UPDATE upstream per transition, with this hop's view.
- **UP again**: a later successful Request (refresh, heal) through this hop (the Monitor element
  publishes it), or the next hop showing the connection UP again once the stream is back.
- The stream reconnects with :class:`nsm.retry.Backoff`, through the daemon's
  :class:`nsm.transport.Channels`. A watcher the next hop dropped for falling behind
  (RESOURCE_EXHAUSTED) or a next hop without a monitor (UNIMPLEMENTED) is not a fault: the next
  snapshot tells.
- Close (also at expiry) stops watching the connection; the stream to a next hop that no
  connection uses any more is cancelled at once, and every stream at :meth:`shutdown`.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import grpc

from nsm.api import connection_pb2
from nsm.api.connection_pb2 import (
    DELETE,
    DOWN,
    INITIAL_STATE_TRANSFER,
    UP,
    Connection,
    ConnectionEvent,
)
from nsm.api.connection_pb2_grpc import MonitorConnectionStub
from nsm.api.networkservice_pb2 import NetworkServiceRequest
from nsm.chain import Ctx, Element, Key, NextClose, NextRequest
from nsm.elements.connect import SENT_URL
from nsm.elements.monitor import Monitor
from nsm.log import get_logger
from nsm.retry import Backoff
from nsm.transport import Channels

#: Stream errors that say nothing about the next hop's connections (reconnect, then the snapshot).
NOT_A_FAULT = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNIMPLEMENTED})


@dataclass(eq=False)
class _Watched:
    url: str
    conn_id: str  # this hop's id of the connection (the Monitor's key)
    next_id: str  # the next hop's segment id (its key in its events)
    seen: int  # the stream attempt during which the last Request through us succeeded
    down: bool = False  # reported DOWN by this element


@dataclass(eq=False)
class _Hop:
    url: str
    conns: dict[str, _Watched] = field(default_factory=dict)  # by next_id
    attempt: int = 0
    task: asyncio.Task[None] | None = None


_WATCH: Key[_Watched] = Key("monitornext.watch")


class MonitorNext(Element):
    def __init__(self, channels: Channels, monitor: Monitor, *, name: str,
                 min_delay: float = 0.1, max_delay: float = 2.0) -> None:
        self.channels = channels
        self.monitor = monitor
        self.selector = connection_pb2.MonitorScopeSelector(
            path_segments=[connection_pb2.PathSegment(name=name)])
        self.min_delay = min_delay
        self.max_delay = max_delay
        self.log = get_logger("nsm.monitornext").bind(name=name)
        self._hops: dict[str, _Hop] = {}

    def streams(self) -> int:
        """Next hops watched now (one stream task each)."""
        return sum(1 for hop in self._hops.values() if hop.task is not None and not hop.task.done())

    def watched(self) -> int:
        """Connections watched now, over every next hop."""
        return sum(len(hop.conns) for hop in self._hops.values())

    def status(self) -> dict[str, int]:
        """:meth:`streams` and :meth:`watched` (for a daemon's status)."""
        return {"next_streams": self.streams(), "next_watched": self.watched()}

    # -- the chain ------------------------------------------------------------------------

    async def request(self, ctx: Ctx, request: NetworkServiceRequest, next: NextRequest) -> Connection:
        own_id, index = request.connection.id, request.connection.path.index
        conn = await next(ctx, request)
        url = ctx.meta.get(SENT_URL) or ""
        segments = conn.path.path_segments
        next_id = segments[index + 1].id if index + 1 < len(segments) else ""
        old = ctx.meta.get(_WATCH)
        hop = self._hops.get(url)
        if (old is not None and hop is not None and hop.conns.get(next_id) is old
                and old.conn_id == own_id):
            old.down = False  # up again: the Monitor element publishes it on the way back
            old.seen = hop.attempt
            return conn
        if old is not None:
            ctx.meta.pop(_WATCH)
            await self._unwatch(old)
        if url and next_id:
            ctx.meta.set(_WATCH, self._watch(url, own_id, next_id))
        return conn

    async def close(self, ctx: Ctx, conn: Connection, next: NextClose) -> None:
        watched = ctx.meta.pop(_WATCH)
        if watched is not None:
            await self._unwatch(watched)  # first: what the next hop reports now is our own doing
        await next(ctx, conn)

    async def shutdown(self) -> None:
        hops, self._hops = list(self._hops.values()), {}
        for hop in hops:
            await _cancel(hop.task)

    # -- watching -------------------------------------------------------------------------

    def _watch(self, url: str, conn_id: str, next_id: str) -> _Watched:
        hop = self._hops.get(url)
        if hop is None:
            hop = self._hops[url] = _Hop(url)
            hop.task = asyncio.get_running_loop().create_task(self._run(hop),
                                                              name=f"monitornext:{url}")
        watched = _Watched(url, conn_id, next_id, seen=hop.attempt)
        hop.conns[next_id] = watched
        return watched

    async def _unwatch(self, watched: _Watched) -> None:
        hop = self._hops.get(watched.url)
        if hop is None or hop.conns.get(watched.next_id) is not watched:
            return
        del hop.conns[watched.next_id]
        if not hop.conns:
            del self._hops[watched.url]
            await _cancel(hop.task)

    async def _run(self, hop: _Hop) -> None:
        backoff = Backoff(self.min_delay, self.max_delay)
        lost = False
        while True:
            hop.attempt += 1
            attempt = hop.attempt
            call = MonitorConnectionStub(self.channels.get(hop.url)).MonitorConnections(self.selector)
            reason, fault = "the stream ended", True
            try:
                while (event := await call.read()) is not grpc.aio.EOF:
                    assert isinstance(event, ConnectionEvent)
                    if event.type == INITIAL_STATE_TRANSFER:
                        self._snapshot(hop, event, attempt)
                        if lost:
                            self.log.info("watching the next hop again", next_hop=hop.url)
                        lost = False
                        backoff.reset()
                    else:
                        self._changed(hop, event)
            except grpc.aio.AioRpcError as exc:
                reason = f"{exc.code().name}: {exc.details()}"
                fault = exc.code() not in NOT_A_FAULT
            finally:
                call.cancel()
            if fault:
                count = sum(self._down(w, "the stream to the next hop broke", quiet=True)
                            for w in list(hop.conns.values()))
                if not lost:
                    self.log.warning("lost the next hop's monitor stream: its connections are DOWN",
                                     next_hop=hop.url, reason=reason, connections=count)
                lost = True
            await backoff.sleep()

    def _snapshot(self, hop: _Hop, event: ConnectionEvent, attempt: int) -> None:
        for watched in list(hop.conns.values()):
            conn = event.connections.get(watched.next_id)
            if conn is None:
                # Only if our last Request there was before this stream began (else the
                # snapshot may predate it, and its UPDATE follows).
                if watched.seen < attempt:
                    self._down(watched, "the next hop does not know the connection")
            else:
                self._state(watched, conn)

    def _changed(self, hop: _Hop, event: ConnectionEvent) -> None:
        for key, conn in event.connections.items():
            watched = hop.conns.get(key)
            if watched is None:
                continue
            if event.type == DELETE:
                self._down(watched, "the next hop closed the connection")
            else:
                self._state(watched, conn)

    def _state(self, watched: _Watched, conn: Connection) -> None:
        if conn.state == DOWN:
            self._down(watched, "the next hop reports the connection DOWN")
        elif conn.state == UP and watched.down:
            watched.down = False
            if self.monitor.set_state(watched.conn_id, UP):
                self.log.info("connection UP again at the next hop", conn=watched.conn_id,
                              next_hop=watched.url)

    def _down(self, watched: _Watched, why: str, *, quiet: bool = False) -> bool:
        if watched.down:
            return False
        watched.down = True
        if not self.monitor.set_state(watched.conn_id, DOWN):
            return False
        (self.log.debug if quiet else self.log.info)(
            "connection DOWN", conn=watched.conn_id, next_hop=watched.url, why=why)
        return True


async def _cancel(task: asyncio.Task[None] | None) -> None:
    if task is None or task is asyncio.current_task():
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task

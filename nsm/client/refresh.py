"""refresh (client side): keeps each connection alive by re-sending it before it expires.

After every successful Request a timer is (re)armed at ``fraction`` (a third) of the time left
before the earliest expiry on the connection's path: this client's segment, or a hop's that caps
the lifetime shorter (every hop times the connection out at its previous hop's expiry). When
it fires, the connection is re-sent from the head of the chain (:class:`~nsm.client.begin.Events`,
kind REFRESH). A failed refresh is retried with backoff (:class:`nsm.retry.Backoff`), never later
than the expiry; once the connection has expired it is requested afresh (kind FRESH: same id,
only its own segment, addresses kept) until that succeeds. Close cancels the timer.
"""

from __future__ import annotations

import asyncio
import time

from nsm.api.connection_pb2 import Connection
from nsm.api.networkservice_pb2 import NetworkServiceRequest
from nsm.chain import Ctx, Element, Key, NextClose, NextRequest
from nsm.client.begin import EVENT, EVENTS, Events, Kind
from nsm.elements.updatepath import expiry_of
from nsm.log import Logger
from nsm.retry import MAX_DELAY, MIN_DELAY, Backoff

#: Refresh when this fraction of the time left before expiry has passed.
REFRESH_FRACTION = 1 / 3

_TIMER: Key[asyncio.Task[None]] = Key("client.refresh.timer")


def _expiry(conn: Connection, request: NetworkServiceRequest) -> float | None:
    """The earliest expiry on the path the Request got back (else on the one it sent)."""
    for path in (conn.path, request.connection.path):
        found = [e for e in map(expiry_of, path.path_segments) if e is not None]
        if found:
            return min(found)
    return None


class Refresh(Element):
    def __init__(self, *, fraction: float = REFRESH_FRACTION, min_backoff: float = MIN_DELAY,
                 max_backoff: float = MAX_DELAY) -> None:
        if not 0 < fraction < 1:
            raise ValueError(f"refresh fraction must be between 0 and 1, not {fraction}")
        Backoff(min_backoff, max_backoff)  # checks the bounds now, not in a timer
        self.fraction = fraction
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self._tasks: set[asyncio.Task[None]] = set()

    def pending(self) -> int:
        """How many timers are armed (one per live connection)."""
        return sum(1 for task in self._tasks if not task.done() and not task.cancelling())

    async def request(self, ctx: Ctx, request: NetworkServiceRequest, next: NextRequest) -> Connection:
        conn = await next(ctx, request)
        self._cancel(ctx)
        events, expires = ctx.meta.get(EVENTS), _expiry(conn, request)
        if events is not None and expires is not None:
            task = asyncio.get_running_loop().create_task(
                self._refresh(events, expires, ctx.log), name=f"nsc-refresh:{ctx.conn_id}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            ctx.meta.set(_TIMER, task)
        return conn

    async def close(self, ctx: Ctx, conn: Connection, next: NextClose) -> None:
        event = ctx.meta.get(EVENT)
        if event is None or event.kind is not Kind.RESELECT:  # a reselect's Request re-arms
            self._cancel(ctx)
        await next(ctx, conn)

    def _cancel(self, ctx: Ctx) -> None:
        task = ctx.meta.pop(_TIMER)
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    async def _refresh(self, events: Events, expires: float, log: Logger) -> None:
        backoff = Backoff(self.min_backoff, self.max_backoff)
        delay = max(0.0, (expires - time.time()) * self.fraction)
        while True:
            await asyncio.sleep(delay)
            left = expires - time.time()
            kind = Kind.REFRESH if left > 0 else Kind.FRESH
            try:
                # On success the event armed the next timer (and left this task alone).
                await events.request(kind, reason="" if left > 0 else "expired")
                return
            except Exception as exc:  # reported by the chain (a FAILED state change)
                delay = backoff.next_delay()
                left = expires - time.time()
                if left > 0:
                    delay = min(delay, left)  # one more try at the expiry, then afresh
                log.debug("refresh retry", kind=kind.value, retry_in=round(delay, 3), error=repr(exc))

    async def shutdown(self) -> None:
        tasks, self._tasks = self._tasks, set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

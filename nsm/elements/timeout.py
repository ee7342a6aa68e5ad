"""timeout: closes a connection whose caller stopped refreshing it.

After each successful Request, a timer is (re)armed for the expiry of the previous hop's path
segment (the caller's token lifetime), or this hop's own when it is the first or the caller's
segment carries none (so a caller that dies without Close never leaks it here). When it fires the
connection is closed from the head of the chain, so every element below undoes its work.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from nsm.api.connection_pb2 import Connection
from nsm.api.networkservice_pb2 import NetworkServiceRequest
from nsm.chain import Ctx, Element, Key, NextClose, NextRequest
from nsm.elements.updatepath import expiry_of

_TIMER: Key[asyncio.Task[None]] = Key("timeout.timer")


class Timeout(Element):
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def pending(self) -> int:
        return len(self._tasks)

    async def request(self, ctx: Ctx, request: NetworkServiceRequest, next: NextRequest) -> Connection:
        conn = await next(ctx, request)
        path = request.connection.path
        segments = path.path_segments
        index = path.index
        expires = None
        for i in (index - 1, index):  # the caller's segment, else this hop's own
            if expires is None and 0 <= i < len(segments):
                expires = expiry_of(segments[i])
        self._cancel(ctx)
        if expires is not None:
            conn_id = ctx.conn_id
            chain = ctx.chain
            log = ctx.log

            async def fire() -> None:
                await asyncio.sleep(max(0.0, expires - time.time()))
                log.info("connection expired: closing", expired_at=expires)
                try:
                    await chain.close_id(conn_id)
                except Exception as exc:  # close errors are logged, never raised into a timer
                    log.warning("close after expiry failed", error=str(exc))

            task = asyncio.get_running_loop().create_task(fire(), name=f"timeout:{conn_id}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            ctx.meta.set(_TIMER, task)
        return conn

    def _cancel(self, ctx: Ctx) -> None:
        task = ctx.meta.pop(_TIMER)
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    async def close(self, ctx: Ctx, conn: Connection, next: NextClose) -> None:
        self._cancel(ctx)
        await next(ctx, conn)

    async def shutdown(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

"""hooks (client side): where watching a live connection plugs into the client chain.

The healing (:class:`nsm.client.heal.Heal`: a monitor stream to the manager, a liveness probe
from the client's namespace) is a :class:`Hook`, and so is anything else given as ``hooks``: an
element between refresh and the tail that learns of every successful Request of a connection
(first, refresh, heal), every failed one and every Close, and starts new events of its own
through :class:`~nsm.client.begin.Events`::

    class Heal(Hook):
        async def on_update(self, ctx, conn):
            events = ctx.meta.get(EVENTS)       # start/re-aim a watcher task that, on trouble, does
            ...                                 # await events.request(Kind.REFRESH, reason=...) or
                                                # await events.request(Kind.RESELECT, reason=...)
        async def on_close(self, ctx, conn):
            ...                                 # stop the watcher (unless EVENT is a RESELECT)

The methods run inside the connection's event: start background work as tasks of your own and
never await an event of the same connection from here (it would wait for itself). Release the
tasks in :meth:`~nsm.chain.Element.shutdown`.
"""

from __future__ import annotations

from nsm.api.connection_pb2 import Connection
from nsm.api.networkservice_pb2 import NetworkServiceRequest
from nsm.chain import Ctx, Element, NextClose, NextRequest
from nsm.errors import NsmError


class Hook(Element):
    """Calls :meth:`on_update`, :meth:`on_failure` and :meth:`on_close`; passes everything on."""

    async def on_update(self, ctx: Ctx, conn: Connection) -> None:
        """After each successful Request of the connection (``ctx.meta`` key EVENT says which)."""

    async def on_failure(self, ctx: Ctx, error: NsmError) -> None:
        """After a failed Request (a failed first Request leaves no connection behind)."""

    async def on_close(self, ctx: Ctx, conn: Connection) -> None:
        """After Close, whether it succeeded downstream or not."""

    async def request(self, ctx: Ctx, request: NetworkServiceRequest, next: NextRequest) -> Connection:
        try:
            conn = await next(ctx, request)
        except NsmError as exc:
            await self.on_failure(ctx, exc)
            raise
        await self.on_update(ctx, conn)
        return conn

    async def close(self, ctx: Ctx, conn: Connection, next: NextClose) -> None:
        try:
            await next(ctx, conn)
        finally:
            await self.on_close(ctx, conn)

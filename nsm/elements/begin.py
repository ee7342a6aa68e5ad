"""begin: serializes events per connection id and owns per-connection metadata.

- Requests and Closes for one connection id run one at a time; different ids run concurrently.
- A first Request that fails leaves no metadata behind.
- Close uses the last good connection this hop returned (not whatever the caller sent), and an
  unknown id closes successfully (Close is idempotent). A role may handle the Close of an id it
  holds nothing for (``unknown_close``: the forwarder removes what an earlier run of it left for
  that connection); it runs like any Close of that id, one at a time with its Requests, with the
  caller's connection and fresh metadata.
- A Close refused (PERMISSION_DENIED: the caller does not hold the connection) leaves the
  connection as it was.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from nsm.api.connection_pb2 import Connection
from nsm.api.networkservice_pb2 import NetworkServiceRequest
from nsm.chain import Ctx, Element, Meta, NextClose, NextRequest, new_id
from nsm.errors import PermissionDenied


@dataclass
class _Entry:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    meta: Meta = field(default_factory=Meta)
    last: Connection | None = None
    closed: bool = False


class Begin(Element):
    def __init__(self, *, unknown_close: NextClose | None = None) -> None:
        self._entries: dict[str, _Entry] = {}
        self.unknown_close = unknown_close

    def __len__(self) -> int:
        return len(self._entries)

    def ids(self) -> list[str]:
        return list(self._entries)

    def last(self, conn_id: str) -> Connection | None:
        entry = self._entries.get(conn_id)
        return entry.last if entry else None

    async def request(self, ctx: Ctx, request: NetworkServiceRequest, next: NextRequest) -> Connection:
        if not request.connection.id:
            request.connection.id = new_id()
        conn_id = request.connection.id
        while True:
            entry = self._entries.setdefault(conn_id, _Entry())
            async with entry.lock:
                if entry.closed:  # closed while we waited: start afresh
                    continue
                ctx.conn_id, ctx.meta = conn_id, entry.meta
                ctx.log = ctx.log.bind(conn=conn_id)
                try:
                    conn = await next(ctx, request)
                except BaseException:
                    if entry.last is None:
                        entry.closed = True
                        self._entries.pop(conn_id, None)
                    raise
                entry.last = Connection()
                entry.last.CopyFrom(conn)
                return conn

    async def close(self, ctx: Ctx, conn: Connection, next: NextClose) -> None:
        entry = self._entries.get(conn.id)
        unknown = entry is None
        if entry is None:
            if self.unknown_close is None or not conn.id:
                return
            entry = self._entries.setdefault(conn.id, _Entry())
        async with entry.lock:
            if entry.closed or (entry.last is None and not unknown):
                return
            ctx.conn_id, ctx.meta = conn.id, entry.meta
            ctx.log = ctx.log.bind(conn=conn.id)
            refused = False
            try:
                if entry.last is None:
                    assert self.unknown_close is not None
                    await self.unknown_close(ctx, conn)
                else:
                    last = Connection()
                    last.CopyFrom(entry.last)
                    await next(ctx, last)
            except PermissionDenied:
                refused = entry.last is not None
                raise
            finally:
                if not refused:
                    entry.closed = True
                    if self._entries.get(conn.id) is entry:
                        del self._entries[conn.id]

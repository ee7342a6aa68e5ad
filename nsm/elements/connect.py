"""connect: sends the Request/Close on to the next hop over gRPC (the tail of manager and
forwarder chains).

Which URL to dial and which headers to send are decided by the elements before it (through
the per-connection metadata); the URL is remembered so that Close goes where Request went.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc

from nsm.api.connection_pb2 import Connection
from nsm.api.networkservice_pb2 import NetworkServiceRequest
from nsm.api.networkservice_pb2_grpc import NetworkServiceStub
from nsm.chain import Ctx, Element, Key, NextClose, NextRequest
from nsm.errors import Unavailable, from_rpc_error
from nsm.transport import Channels

#: The next hop's URL, set by the element that chose it.
NEXT_URL: Key[str] = Key("connect.url")
#: Extra gRPC headers for the next hop, set by the element that chose it.
NEXT_HEADERS: Key[dict[str, str]] = Key("connect.headers")
#: Where the Request went, so that Close goes there too; set here, or by an element that takes
#: over a connection this hop did not send (the forwarder, for one an earlier run of it left).
SENT_URL: Key[str] = Key("connect.sent-url")


class Connect(Element):
    def __init__(self, channels: Channels, *, timeout: float = 15.0,
                 close_timeout: float = 5.0,
                 url: Callable[[Ctx, NetworkServiceRequest], str] | None = None) -> None:
        self.channels = channels
        self.timeout = timeout
        self.close_timeout = close_timeout
        self._url = url

    async def request(self, ctx: Ctx, request: NetworkServiceRequest, next: NextRequest) -> Connection:
        url = self._url(ctx, request) if self._url else ctx.meta.get(NEXT_URL)
        if not url:
            raise Unavailable("no next hop chosen for this connection")
        headers = ctx.meta.get(NEXT_HEADERS) or {}
        stub = NetworkServiceStub(self.channels.get(url))
        try:
            conn: Connection = await stub.Request(
                request, timeout=self.timeout, metadata=tuple(headers.items()) or None)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, f"{url}") from exc
        ctx.meta.set(SENT_URL, url)
        return conn

    async def close(self, ctx: Ctx, conn: Connection, next: NextClose) -> None:
        url = ctx.meta.get(SENT_URL)
        if not url:
            return
        headers = ctx.meta.get(NEXT_HEADERS) or {}
        stub = NetworkServiceStub(self.channels.get(url))
        try:
            await stub.Close(conn, timeout=self.close_timeout,
                             metadata=tuple(headers.items()) or None)
        except grpc.aio.AioRpcError as exc:
            # The next hop cleans up at its own expiry; our side of the close goes on.
            ctx.log.warning("close on next hop failed", url=url, code=exc.code().name,
                            details=exc.details())

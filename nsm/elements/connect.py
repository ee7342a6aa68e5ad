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
#: The URL the last successful Request went to (where Close goes; what is monitored).
SENT_URL: Key[str] = Key("connect.sent-url")


class Connect(Element):
    def __init__(self, channels: Channels, *, timeout: float = 15.0,
                 close_timeout: float = 5.0,
                 url: Callable[[Ctx, NetworkServiceRequest], str] | None = None) -> None:
        self.channels = channels
        self.timeout = timeout
        self.close_timeout = close_timeout
        self._url = url

    async def _channel(self, url: str) -> grpc.aio.Channel:
        """The channel to ``url``; one that failed to connect and waits out its reconnect
        backoff (up to 2 s) is replaced by a new one, which connects at once: a restarted peer
        is used as soon as it listens."""
        channel = self.channels.get(url)
        if channel.get_state() == grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            await self.channels.drop(url)
            channel = self.channels.get(url)
        return channel

    async def request(self, ctx: Ctx, request: NetworkServiceRequest, next: NextRequest) -> Connection:
        url = self._url(ctx, request) if self._url else ctx.meta.get(NEXT_URL)
        if not url:
            raise Unavailable("no next hop chosen for this connection")
        stub = NetworkServiceStub(await self._channel(url))
        try:
            conn: Connection = await stub.Request(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, f"{url}") from exc
        ctx.meta.set(SENT_URL, url)
        return conn

    async def close(self, ctx: Ctx, conn: Connection, next: NextClose) -> None:
        url = ctx.meta.get(SENT_URL)
        if not url:
            return
        stub = NetworkServiceStub(await self._channel(url))
        try:
            await stub.Close(conn, timeout=self.close_timeout)
        except grpc.aio.AioRpcError as exc:
            # The next hop cleans up at its own expiry; our side of the close goes on.
            ctx.log.warning("close on next hop failed", url=url, code=exc.code().name,
                            details=exc.details())

"""connect: sends the Request/Close on to the next hop over gRPC (the tail of manager and
forwarder chains).

Which URL to dial and which headers to send are decided by the elements before it (through
the per-connection metadata); the URL is remembered so that Close goes where Request went.
A hop whose next hop is the endpoint (``to_endpoint(ctx)``) reports an endpoint it cannot reach
as :class:`~nsm.errors.EndpointUnreachable`, so that a healing client can tell an endpoint gone
from a hop on the way that restarts.

When secure, each Request and Close carries this hop's token for its own segment, signed for the
identity the next hop proved, and the answer's next segment must be signed by that hop
(:class:`~nsm.elements.tokens.HopTokens`); an answer that fails that check is closed again.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

from nsm.api.connection_pb2 import Connection
from nsm.api.networkservice_pb2 import NetworkServiceRequest
from nsm.api.networkservice_pb2_grpc import NetworkServiceStub
from nsm.chain import Ctx, Element, Key, NextClose, NextRequest
from nsm.elements.tokens import HopTokens
from nsm.errors import EndpointUnreachable, NsmError, Unavailable, from_rpc_error, reason_of
from nsm.security.policy import Policies
from nsm.transport import Channels

T = TypeVar("T")

#: The next hop's URL, set by the element that chose it.
NEXT_URL: Key[str] = Key("connect.url")
#: The URL the last successful Request went to (where Close goes; what is monitored); set here,
#: or by an element that takes over a connection this hop did not send (the forwarder, for one
#: an earlier run of it left).
SENT_URL: Key[str] = Key("connect.sent-url")


class Connect(Element):
    def __init__(self, channels: Channels, *, timeout: float = 15.0,
                 close_timeout: float = 5.0,
                 url: Callable[[Ctx, NetworkServiceRequest], str] | None = None,
                 to_endpoint: Callable[[Ctx], bool] | None = None,
                 policies: Policies | None = None) -> None:
        self.channels = channels
        self.tokens = HopTokens(channels, policies or Policies())
        self.timeout = timeout
        self.close_timeout = close_timeout
        self._url = url
        self._to_endpoint = to_endpoint

    async def _call(self, url: str, rpc: Callable[[NetworkServiceStub], Awaitable[T]]) -> T:
        """One RPC to ``url``. When it fails because the channel could not connect (the peer was
        down a moment ago and the channel waits out its reconnect backoff, up to 2 s), it is
        tried once more on a new channel, which connects at once: a restarted peer is used as
        soon as it listens. (The identity proof a secure call starts with fails the same way.)"""
        channel = self.channels.get(url)
        try:
            return await rpc(NetworkServiceStub(channel))
        except (grpc.aio.AioRpcError, Unavailable) as exc:
            code = exc.code() if isinstance(exc, grpc.aio.AioRpcError) else exc.code
            if (code != grpc.StatusCode.UNAVAILABLE
                    or channel.get_state() == grpc.ChannelConnectivity.READY):
                raise
        return await rpc(NetworkServiceStub(self.channels.renew(url, channel)))

    def _unreachable(self, ctx: Ctx, url: str, details: str) -> EndpointUnreachable | None:
        if self._to_endpoint is not None and self._to_endpoint(ctx):
            return EndpointUnreachable(f"{url}: the endpoint cannot be reached: {details}")
        return None

    async def request(self, ctx: Ctx, request: NetworkServiceRequest, next: NextRequest) -> Connection:
        url = self._url(ctx, request) if self._url else ctx.meta.get(NEXT_URL)
        if not url:
            raise Unavailable("no next hop chosen for this connection")

        async def send(stub: NetworkServiceStub) -> Connection:
            metadata = await self.tokens.sign(url, request.connection)
            answer: Connection = await stub.Request(request, timeout=self.timeout, metadata=metadata)
            return answer

        try:
            conn = await self._call(url, send)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE and not reason_of(exc):
                unreachable = self._unreachable(ctx, url, exc.details() or exc.code().name)
                if unreachable is not None:
                    raise unreachable from exc
            raise from_rpc_error(exc, f"{url}") from exc
        except Unavailable as exc:  # the next hop's identity proof could not be made
            unreachable = self._unreachable(ctx, url, exc.message)
            if unreachable is not None and not exc.reason:
                raise unreachable from exc
            raise
        try:
            await self.tokens.check(url, conn, request.connection.path.index)
        except NsmError:
            await self._close(ctx, url, conn)
            raise
        ctx.meta.set(SENT_URL, url)
        return conn

    async def close(self, ctx: Ctx, conn: Connection, next: NextClose) -> None:
        url = ctx.meta.get(SENT_URL)
        if url:
            await self._close(ctx, url, conn)

    async def _close(self, ctx: Ctx, url: str, conn: Connection) -> None:
        async def send(stub: NetworkServiceStub) -> None:
            metadata = await self.tokens.sign(url, conn, close=True)
            await stub.Close(conn, timeout=self.close_timeout, metadata=metadata)

        try:
            await self._call(url, send)
        except grpc.aio.AioRpcError as exc:
            # The next hop cleans up at its own expiry; our side of the close goes on.
            ctx.log.warning("close on next hop failed", url=url, code=exc.code().name,
                            details=exc.details())
        except NsmError as exc:  # the next hop could not prove who it is
            ctx.log.warning("close on next hop failed", url=url, code=exc.code.name,
                            details=exc.message)

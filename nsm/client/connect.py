"""connect (client side): the tail of the client chain, the Request/Close RPC to the manager.

One channel per manager URL (:class:`nsm.transport.Channels`), shared by every connection of the
chain. A gRPC error becomes the matching domain error, its message unchanged; unlike the servers'
:class:`nsm.elements.connect.Connect` a failed Close is raised (to the caller who closed).
When secure, every Request and Close carries the client's token for its segment (signed for
the identity the manager proved) and the manager's answer must carry the manager's token
(``next_token_signed``): :class:`nsm.elements.tokens.HopTokens`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

import grpc

from nsm.api import networkservice_pb2_grpc
from nsm.api.connection_pb2 import Connection
from nsm.api.networkservice_pb2 import NetworkServiceRequest
from nsm.chain import Ctx, Element, NextClose, NextRequest
from nsm.elements.tokens import HopTokens
from nsm.errors import NsmError, Unavailable, call
from nsm.security import prove
from nsm.security.policy import Policies
from nsm.transport import Channels

DEFAULT_TIMEOUT = 15.0


async def request_once(channel: grpc.aio.Channel, request: NetworkServiceRequest, *,
                       timeout: float | None = DEFAULT_TIMEOUT,
                       metadata: Sequence[tuple[str, str]] | None = None) -> Connection:
    """One Request RPC; a gRPC error becomes the matching domain error."""
    stub = networkservice_pb2_grpc.NetworkServiceStub(channel)
    conn: Connection = await call(stub.Request(request, timeout=timeout, metadata=metadata), "")
    return conn


async def close_once(channel: grpc.aio.Channel, conn: Connection, *,
                     timeout: float | None = DEFAULT_TIMEOUT,
                     metadata: Sequence[tuple[str, str]] | None = None) -> None:
    """One Close RPC; a gRPC error becomes the matching domain error."""
    stub = networkservice_pb2_grpc.NetworkServiceStub(channel)
    await call(stub.Close(conn, timeout=timeout, metadata=metadata), "")


class ManagerConnect(Element):
    """Sends every Request and Close to the manager at ``url``, each bounded by ``timeout``."""

    def __init__(self, channels: Channels, url: str, *, timeout: float = DEFAULT_TIMEOUT,
                 policies: Policies | None = None) -> None:
        self.channels = channels
        self.url = url
        self.timeout = timeout
        self.tokens = HopTokens(channels, policies or Policies())

    async def request(self, ctx: Ctx, request: NetworkServiceRequest, next: NextRequest) -> Connection:
        try:
            conn, learnt = await self._request(request)
        except Unavailable as exc:
            if not (self.channels.named(self.url) and prove.name_refused(exc.message)):
                raise
            # The manager's certificate lacks its identity's DNS name: nothing reached it; it
            # proves who it is by a round trip instead.
            self.channels.fall_back(self.url)
            conn, learnt = await self._request(request)
        try:
            if learnt is not None:
                await learnt
            await self.tokens.check(self.url, conn, request.connection.path.index)
        except NsmError:
            with contextlib.suppress(NsmError):
                await self.close_connection(conn)
            raise
        return conn

    async def _request(self, request: NetworkServiceRequest
                       ) -> tuple[Connection, asyncio.Future[None] | None]:
        """One Request with this client's token: the answer and, when the handshake proves the
        manager's identity (:meth:`~nsm.transport.Channels.expect`), the check of the
        certificate the manager sends first (its token verifies with it), made while the
        Request is under way (None otherwise)."""
        metadata = await self.tokens.sign(self.url, request.connection)
        named = self.channels.named(self.url)
        if named:
            metadata.append((prove.WANT_HEADER, "1"))
        stub = networkservice_pb2_grpc.NetworkServiceStub(self.channels.get(self.url))
        rpc = stub.Request(request, timeout=self.timeout, metadata=metadata)
        learnt = asyncio.ensure_future(self._learn(rpc)) if named else None
        try:
            conn: Connection = await call(rpc, "")
        except BaseException:
            if learnt is not None:
                learnt.cancel()
                await asyncio.gather(learnt, return_exceptions=True)
            raise
        return conn, learnt

    async def _learn(self, rpc: Any) -> None:
        try:
            metadata = await rpc.initial_metadata()
        except grpc.aio.AioRpcError:
            return  # the call failed: its own error is what the caller reports
        self.channels.learn(self.url, metadata)

    async def close(self, ctx: Ctx, conn: Connection, next: NextClose) -> None:
        await self.close_connection(conn)

    async def close_connection(self, conn: Connection) -> None:
        """Close ``conn`` at the manager (with this client's token when secure)."""
        metadata = await self.tokens.sign(self.url, conn, close=True)
        await close_once(self.channels.get(self.url), conn, timeout=self.timeout, metadata=metadata)

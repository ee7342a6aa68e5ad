"""The NSM chain: a connection Request/Close passes through a list of small elements.

Each element does its part and calls ``next``; the tail returns the connection unchanged.
Each role (manager, forwarder, endpoint) composes its chain in one place from these elements.

An element::

    class Example(Element):
        async def request(self, ctx, request, next):
            ...                      # before the rest of the chain
            conn = await next(ctx, request)
            ...                      # after (undo here if a later step fails)
            return conn

        async def close(self, ctx, conn, next):
            await next(ctx, conn)

Per-connection state lives in ``ctx.meta`` (a dict owned by the ``Begin`` element, keyed by the
connection id, dropped on Close); each element uses its own private key object.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from nsm.api.connection_pb2 import Connection
from nsm.api.networkservice_pb2 import NetworkServiceRequest
from nsm.log import Logger, get_logger

if TYPE_CHECKING:
    from cryptography import x509

    from nsm.security.ids import SpiffeId

NextRequest = Callable[["Ctx", NetworkServiceRequest], Awaitable[Connection]]
NextClose = Callable[["Ctx", Connection], Awaitable[None]]

T = TypeVar("T")


class Key(Generic[T]):
    """A private, typed key into a connection's metadata."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Key({self.name})"


class Meta:
    """Per-connection metadata: a typed map from private keys to values."""

    def __init__(self) -> None:
        self._values: dict[Key[Any], Any] = {}

    def get(self, key: Key[T]) -> T | None:
        return self._values.get(key)

    def set(self, key: Key[T], value: T) -> None:
        self._values[key] = value

    def pop(self, key: Key[T]) -> T | None:
        return self._values.pop(key, None)

    def __contains__(self, key: Key[Any]) -> bool:
        return key in self._values


@dataclass
class Ctx:
    """The context of one event (Request or Close) travelling down a chain."""

    chain: Chain
    headers: Mapping[str, str] = field(default_factory=dict)
    conn_id: str = ""
    meta: Meta = field(default_factory=Meta)
    log: Logger = field(default_factory=lambda: get_logger("nsm.chain"))
    #: True when the event was started by the chain itself (timeout, heal) not by a peer.
    internal: bool = False
    #: The caller's SPIFFE ID from its TLS certificate (None when insecure or internal).
    peer: SpiffeId | None = None
    #: The caller's leaf certificate (None when insecure or internal).
    peer_cert: x509.Certificate | None = None


class Element:
    """Base element: passes everything through."""

    async def request(self, ctx: Ctx, request: NetworkServiceRequest, next: NextRequest) -> Connection:
        return await next(ctx, request)

    async def close(self, ctx: Ctx, conn: Connection, next: NextClose) -> None:
        await next(ctx, conn)

    async def shutdown(self) -> None:
        """Release background tasks and resources when the daemon stops."""


async def _tail_request(ctx: Ctx, request: NetworkServiceRequest) -> Connection:
    return request.connection


async def _tail_close(ctx: Ctx, conn: Connection) -> None:
    return None


class Chain:
    """An ordered list of elements with Request and Close entry points."""

    def __init__(self, elements: Sequence[Element], *, name: str = "chain") -> None:
        self.elements = list(elements)
        self.name = name
        self.log = get_logger(f"nsm.{name}")
        self._rest_close: dict[int, NextClose] = {}
        self._request = self._build_request(0)
        self._close = self._build_close(0)

    def _build_request(self, i: int) -> NextRequest:
        if i == len(self.elements):
            return _tail_request
        element, rest = self.elements[i], self._build_request(i + 1)

        async def call(ctx: Ctx, request: NetworkServiceRequest) -> Connection:
            return await element.request(ctx, request, rest)

        return call

    def _build_close(self, i: int) -> NextClose:
        if i == len(self.elements):
            return _tail_close
        element, rest = self.elements[i], self._build_close(i + 1)
        self._rest_close[id(element)] = rest

        async def call(ctx: Ctx, conn: Connection) -> None:
            await element.close(ctx, conn, rest)

        return call

    def context(self, headers: Mapping[str, str] | None = None, *, internal: bool = False,
                peer: SpiffeId | None = None, peer_cert: x509.Certificate | None = None) -> Ctx:
        return Ctx(chain=self, headers=dict(headers or {}), log=self.log, internal=internal,
                   peer=peer, peer_cert=peer_cert)

    async def request(self, request: NetworkServiceRequest, ctx: Ctx | None = None) -> Connection:
        return await self._request(ctx or self.context(), request)

    async def close(self, conn: Connection, ctx: Ctx | None = None) -> None:
        await self._close(ctx or self.context(), conn)

    async def close_after(self, element: Element, ctx: Ctx, conn: Connection) -> None:
        """Close through the elements after ``element``: how an element undoes what the rest
        of the chain built when its own step fails after ``next`` succeeded."""
        await self._rest_close[id(element)](ctx, conn)

    async def close_id(self, conn_id: str) -> None:
        """Close a connection by id from the head of the chain (used by timeout and heal);
        ``Begin`` substitutes the last good connection it returned."""
        await self._close(self.context(internal=True), Connection(id=conn_id))

    async def shutdown(self) -> None:
        for element in self.elements:
            await element.shutdown()


def new_id() -> str:
    return str(uuid.uuid4())

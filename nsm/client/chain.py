"""The client chain, and :class:`Connections`: many connections through one manager over it.

The client is the first hop of every path: its segment ``{name, id = connection id, expires =
now + lifetime}`` is segment 0. Its chain, in order::

    ClientBegin → Validate → Notify → UpdatePath(name) → Refresh → Heal → (hooks) → ProveNetns
    → ManagerConnect

The SDK's :class:`~nsm.client.sdk.Client` (one connection), ``nsm nsc`` and a long-lived agent
holding many connections all run it through :class:`Connections`, which heals every connection
(:mod:`nsm.client.heal`: one monitor stream to the manager for all of them, a data-plane check of
each) unless told ``heal=None``::

    async with Connections(manager_url="unix:///run/nsm/nsm.sock", name="agent") as conns:
        conn = await conns.request(new_request(service="blue", name=conns.name, mechanisms=[...]))
        async for change in conns.changes():    # established, refreshed, down, healed, ...
            ...
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from types import TracebackType

import grpc

from nsm.api.connection_pb2 import UP, Connection, Mechanism
from nsm.api.networkservice_pb2 import NetworkServiceRequest
from nsm.chain import Chain, Element
from nsm.client.begin import ClientBegin, refresh_request
from nsm.client.connect import DEFAULT_TIMEOUT, ManagerConnect
from nsm.client.heal import Heal, HealOptions, find_connection
from nsm.client.netns import ProveNetns
from nsm.client.notify import Notify, StateChange
from nsm.client.refresh import Refresh
from nsm.elements.updatepath import DEFAULT_LIFETIME, UpdatePath, ts
from nsm.elements.validate import Validate
from nsm.errors import InvalidArgument, NsmError
from nsm.log import get_logger
from nsm.names import check_name
from nsm.retry import MAX_DELAY, MIN_DELAY
from nsm.security.tls import Security
from nsm.transport import Channels, parse_url

log = get_logger("nsm.client")

MIN_BACKOFF = MIN_DELAY
MAX_BACKOFF = MAX_DELAY


def client_chain(*, name: str, lifetime: float, connect: Element, begin: ClientBegin,
                 notify: Notify, refresh: Refresh, heal: Heal | None = None,
                 hooks: Sequence[Element] = (), prove: Element | None = None) -> Chain:
    """The client's chain, top-down."""
    return Chain([
        begin,                                # one event at a time per connection id; refresh/heal events
        Validate(),                           # bad input never reaches the wire
        notify,                               # every state change: callbacks, iterators, a log line
        UpdatePath(name, lifetime=lifetime),  # segment 0 is ours, with a fresh expiry every time
        refresh,                              # re-sent at 1/3 of the time left; afresh once expired
        *([heal] if heal is not None else []),  # monitor stream, data-plane liveness: refresh/reselect
        *hooks,                               # whatever else watches live connections
        *([prove] if prove is not None else []),  # proof listeners in the namespaces named
        connect,                              # the RPC to the manager
    ], name="client")


def adopt_request(template: NetworkServiceRequest, found: Connection) -> NetworkServiceRequest:
    """A restarted client's request for a connection the manager still has (``found``, as
    :func:`~nsm.client.heal.find_connection` gives it): that connection again on its own path
    (a refresh: every hop keeps what it built), with the template's labels, mechanism
    preferences and, when of the same kind, its mechanism (this process's namespace URL)."""
    request = refresh_request(template, found)
    request.connection.state = UP
    prefs = template.mechanism_preferences
    if prefs and (prefs[0].cls, prefs[0].type) == (found.mechanism.cls, found.mechanism.type):
        request.connection.mechanism.CopyFrom(prefs[0])
    return request


def new_request(
    *,
    service: str,
    name: str,
    mechanisms: Sequence[Mechanism],
    labels: Mapping[str, str] | None = None,
    lifetime: float = DEFAULT_LIFETIME,
    conn_id: str | None = None,
) -> NetworkServiceRequest:
    """A first Request from a client: one path segment (this client's), index 0."""
    conn_id = conn_id or str(uuid.uuid4())
    conn = Connection(id=conn_id, network_service=service, labels=dict(labels or {}))
    conn.path.index = 0
    segment = conn.path.path_segments.add(name=name, id=conn_id)
    segment.expires.CopyFrom(ts(time.time() + lifetime))
    request = NetworkServiceRequest(connection=conn)
    request.mechanism_preferences.extend(mechanisms)
    return request


class Connections:
    """Connections to network services through the manager at ``manager_url``, over one client
    chain and one channel. Each connection (by id) is refreshed until it is closed, and requested
    afresh when it expired anyway.

    ``name`` is this client's path segment name (default ``nsc-<random>``), ``lifetime`` the
    expiry written into it (every hop closes a connection not refreshed by then),
    ``request_timeout`` bounds each RPC, ``min_backoff``/``max_backoff`` the retries of refreshes,
    ``heal`` how connections heal (:class:`~nsm.client.heal.HealOptions`; None: not at all),
    ``hooks`` are more elements that watch live connections (:class:`~nsm.client.hooks.Hook`),
    ``on_change`` gets every :class:`~nsm.client.notify.StateChange`; ``security`` is this
    client's identity: while a connection names a namespace, a proof listener inside it tells
    the forwarder the namespace is this client's (:mod:`nsm.client.netns`); ``manager_id``,
    when given, is the SPIFFE ID the manager must have (any other is refused), proven by the
    TLS handshake itself (:meth:`~nsm.transport.Channels.expect`), which spares every new
    client a round trip before its first Request."""

    def __init__(
        self,
        *,
        manager_url: str,
        name: str | None = None,
        lifetime: float = DEFAULT_LIFETIME,
        request_timeout: float = DEFAULT_TIMEOUT,
        min_backoff: float = MIN_BACKOFF,
        max_backoff: float = MAX_BACKOFF,
        heal: HealOptions | None = HealOptions(),
        hooks: Sequence[Element] = (),
        on_change: Callable[[StateChange], None] | None = None,
        security: Security | None = None,
        manager_id: str | None = None,
    ) -> None:
        self.manager_url = str(parse_url(manager_url))
        #: This client's identity and credentials (started by the first Request when it is
        #: not yet); plaintext when None.
        self.security = security or Security.insecure()
        self.name = check_name(name or f"nsc-{uuid.uuid4().hex[:8]}", "client name")
        if not lifetime > 0:
            raise InvalidArgument(f"lifetime must be positive, not {lifetime}")
        if not request_timeout > 0:
            raise InvalidArgument(f"request timeout must be positive, not {request_timeout}")
        if not 0 < min_backoff <= max_backoff:
            raise InvalidArgument(f"backoff needs 0 < min <= max, not {min_backoff}..{max_backoff}")
        self.lifetime = float(lifetime)
        self.request_timeout = float(request_timeout)
        self._channels = Channels(security=self.security)
        if manager_id:
            # Its handshake proves the manager's identity: no round trip before the first Request.
            self._channels.expect(self.manager_url, manager_id)
        self._begin = ClientBegin()
        self._notify = Notify()
        if on_change is not None:
            self._notify.subscribe(on_change)
        #: The heal element (None when not healing).
        self.heal = (Heal(name=self.name, channel=self._channel, options=heal)
                     if heal is not None else None)
        self._connect = ManagerConnect(self._channels, self.manager_url, timeout=self.request_timeout)
        self.chain = client_chain(
            name=self.name, lifetime=self.lifetime, begin=self._begin, notify=self._notify,
            refresh=Refresh(min_backoff=min_backoff, max_backoff=max_backoff), heal=self.heal,
            hooks=hooks, prove=ProveNetns(self.security) if self.security.enabled else None,
            connect=self._connect)

    def _channel(self) -> grpc.aio.Channel:
        return self._channels.get(self.manager_url)

    # -- connections ---------------------------------------------------------------------------

    async def request(self, request: NetworkServiceRequest) -> Connection:
        """Request the connection ``request.connection.id`` (a new id when empty; see
        :func:`new_request`), or request it again; it is refreshed from then on. Later refreshes
        and heals re-send this request's labels and mechanism preferences. Raises the domain
        error of a failed Request (a failed first Request leaves nothing behind)."""
        segments = request.connection.path.path_segments
        if segments and segments[0].name != self.name:
            raise InvalidArgument(f"path segment 0 is {segments[0].name!r}, not this client's "
                                  f"{self.name!r}")
        await self.security.start()
        # The channel connects and the manager proves who it is (its token's audience) while
        # the chain gets ready.
        self._channels.prove_soon(self.manager_url)
        return await self.chain.request(request)

    async def find(self, conn_id: str) -> Connection | None:
        """The manager's live connection ``conn_id`` of this client (by its monitor), as this
        client sees it; None when the manager does not know it."""
        await self.security.start()
        return await find_connection(self._channel(), name=self.name, conn_id=conn_id,
                                     timeout=self.request_timeout)

    async def adopt(self, request: NetworkServiceRequest,
                    present: Callable[[Connection], Awaitable[bool]] | None = None) -> Connection | None:
        """After a restart: when the manager still has this client's connection
        ``request.connection.id`` and ``present(found)`` (e.g. its interface is still in the
        namespace), request that connection again on its own path (:func:`adopt_request`) instead
        of building a second one, and keep it from then on. None when there is nothing to adopt,
        also when adopting failed (the found connection is then closed, best effort, so that a
        fresh Request can build it again)."""
        conn_id = request.connection.id
        if not conn_id or self.connection(conn_id) is not None:
            return None
        try:
            found = await self.find(conn_id)
        except NsmError as exc:
            log.info("cannot ask the manager for a connection to adopt", conn=conn_id,
                     code=exc.code.name, error=exc.message)
            return None
        if found is None or (present is not None and not await present(found)):
            return None
        try:
            conn = await self.request(adopt_request(request, found))
        except NsmError as exc:
            log.warning("adopting the live connection failed; closing it", conn=conn_id,
                        code=exc.code.name, error=exc.message)
            with contextlib.suppress(NsmError):
                await self._connect.close_connection(found)
            return None
        log.info("adopted the live connection", conn=conn_id,
                 endpoint=conn.network_service_endpoint_name)
        return conn

    async def refresh(self, conn_id: str) -> Connection | None:
        """Re-send the connection now (same path); None when there is no such connection.
        Raises the domain error of a failed Request (the connection is kept and retried)."""
        return await self._begin.refresh(conn_id)

    async def close(self, conn_id: str) -> None:
        """Stop refreshing and Close the connection (Close errors are raised; the connection is
        forgotten either way). Unknown ids close successfully."""
        await self.chain.close(Connection(id=conn_id))

    def connection(self, conn_id: str) -> Connection | None:
        """A copy of the last good connection with this id."""
        return self._begin.last(conn_id)

    def ids(self) -> list[str]:
        """The ids of the live connections."""
        return self._begin.ids()

    # -- state changes -------------------------------------------------------------------------

    def subscribe(self, callback: Callable[[StateChange], None]) -> Callable[[], None]:
        """Call ``callback`` with every state change; returns the function that unsubscribes."""
        return self._notify.subscribe(callback)

    def changes(self, conn_id: str | None = None) -> AsyncIterator[StateChange]:
        """State changes from now on (of one connection when ``conn_id``), until shutdown."""
        return self._notify.changes(conn_id)

    # -- lifecycle -----------------------------------------------------------------------------

    async def shutdown(self, *, close: bool = False) -> None:
        """Stop every refresh and close the channel; with ``close``, Close every connection first
        (errors logged). Without it the connections live on at the next hops until they expire.
        The object can request again afterwards."""
        try:
            if close:
                results = await asyncio.gather(*(self.close(i) for i in self.ids()),
                                               return_exceptions=True)
                for result in results:
                    if isinstance(result, BaseException) and not isinstance(result, NsmError):
                        raise result
        finally:
            await self.chain.shutdown()
            await self._channels.close()

    async def __aenter__(self) -> Connections:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.shutdown(close=True)

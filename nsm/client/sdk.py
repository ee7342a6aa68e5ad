"""The client SDK: request a network service from the node's manager and keep the connection.

::

    client = Client(manager_url="unix:///run/nsm/nsm.sock", service="blue",
                    netns="/var/run/netns/pod1", ifname="nsm-1")
    async with client.connect() as conn:
        print(conn.context.ip_context.src_ip_addrs)

or ``await client.request()`` ... ``await client.close()``.

A :class:`Client` is one connection over its own :class:`~nsm.client.chain.Connections` (the
client chain): refreshed at a third of the time left before its segment expires, retried with
backoff, requested afresh when it expired anyway (same id, only its own segment, its addresses
kept), and healed when it breaks (:mod:`nsm.client.heal`: the manager's monitor stream and a
data-plane check from ``netns``; ``heal=None`` turns it off). A client given a stable
``conn_id`` that finds the manager still holding that connection, with its interface in
``netns``, adopts it (``adopt``) instead of building a second one. Every state change reaches
``on_change`` and :meth:`Client.changes`; every new connection ``on_update``.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence

from nsm.api.connection_pb2 import Connection, Mechanism
from nsm.api.networkservice_pb2 import NetworkServiceRequest
from nsm.chain import Element
from nsm.client.chain import DEFAULT_LIFETIME, MAX_BACKOFF, MIN_BACKOFF, Connections, new_request
from nsm.client.connect import DEFAULT_TIMEOUT, close_once, request_once
from nsm.client.heal import HealOptions, interface_present
from nsm.client.notify import State, StateChange
from nsm.client.refresh import REFRESH_FRACTION
from nsm.elements.updatepath import expiry_of
from nsm.elements.validate import validate_connection
from nsm.errors import NsmError
from nsm.kernel.netns import own_netns_url, resolve_netns
from nsm.log import get_logger
from nsm.mechanisms import NAME, kernel, netns_url, validate_ifname, validate_mechanism
from nsm.security.tls import Security

__all__ = ["DEFAULT_IFNAME", "DEFAULT_LIFETIME", "DEFAULT_TIMEOUT", "MAX_BACKOFF", "MIN_BACKOFF",
           "REFRESH_FRACTION", "Client", "close_once", "new_request", "request_once"]

log = get_logger("nsm.client")

DEFAULT_IFNAME = "nsm-1"
_UPDATES = (State.ESTABLISHED, State.REFRESHED, State.HEALED)


class Client:
    """A connection to one network service, requested through the manager at ``manager_url``.

    ``lifetime`` (seconds) is the expiry this client writes into its own path segment: every hop
    closes the connection if it is not refreshed by then. ``on_update`` is called with each new
    connection (first request, refreshes, heals), ``on_change`` with each state change;
    ``heal`` says how it heals (None: not at all), ``hooks`` watch the live connection too
    (:class:`~nsm.client.hooks.Hook`). ``adopt`` (default: when ``conn_id`` is given): the first
    :meth:`request` takes over the manager's live connection ``conn_id`` when its interface is
    in ``netns`` (a restarted client), instead of requesting afresh. ``security``: this
    client's identity (mTLS, and the proof that ``netns`` is its own: a listener inside it while
    connected); ``manager_id``: the SPIFFE ID the manager must have, proven by the TLS handshake
    (no identity round trip before the first Request; see :class:`~nsm.client.chain.Connections`).
    """

    def __init__(
        self,
        *,
        manager_url: str,
        service: str,
        netns: str | None = None,
        ifname: str = DEFAULT_IFNAME,
        labels: Mapping[str, str] | None = None,
        name: str | None = None,
        lifetime: float = DEFAULT_LIFETIME,
        mechanisms: Sequence[Mechanism] | None = None,
        request_timeout: float = DEFAULT_TIMEOUT,
        conn_id: str | None = None,
        on_update: Callable[[Connection], None] | None = None,
        on_change: Callable[[StateChange], None] | None = None,
        min_backoff: float = MIN_BACKOFF,
        max_backoff: float = MAX_BACKOFF,
        heal: HealOptions | None = HealOptions(),
        hooks: Sequence[Element] = (),
        adopt: bool | None = None,
        security: Security | None = None,
        manager_id: str | None = None,
    ) -> None:
        self.service = service
        self.ifname = validate_ifname(ifname, "client interface name")
        self.netns = resolve_netns(netns)
        self.labels = dict(labels or {})
        self.connections = Connections(manager_url=manager_url, name=name, lifetime=lifetime,
                                       request_timeout=request_timeout, min_backoff=min_backoff,
                                       max_backoff=max_backoff, heal=heal, hooks=hooks,
                                       on_change=self._changed, security=security,
                                       manager_id=manager_id)
        self.manager_url = self.connections.manager_url
        self.name = self.connections.name
        self.lifetime = self.connections.lifetime
        self.request_timeout = self.connections.request_timeout
        self.min_backoff, self.max_backoff = min_backoff, max_backoff
        # Its own namespace by identity (in a pod its PIDs mean nothing to the forwarder).
        self.netns_url = own_netns_url() if netns is None else netns_url(self.netns)
        self.mechanisms = list(mechanisms) if mechanisms else [kernel(self.ifname, self.netns_url)]
        for m in self.mechanisms:
            validate_mechanism(m)
        self.conn_id = conn_id or str(uuid.uuid4())
        self.adopt = bool(conn_id) if adopt is None else adopt
        self.on_update = on_update
        self.on_change = on_change
        # Check the whole first request once, so that bad input never reaches the wire.
        validate_connection(self._fresh().connection)
        self._log = log.bind(service=service, conn=self.conn_id)

    def _fresh(self) -> NetworkServiceRequest:
        return new_request(service=self.service, name=self.name, mechanisms=self.mechanisms,
                           labels=self.labels, lifetime=self.lifetime, conn_id=self.conn_id)

    def _changed(self, change: StateChange) -> None:
        if change.conn_id != self.conn_id:
            return
        try:
            if self.on_change is not None:
                self.on_change(change)
            if self.on_update is not None and change.connection is not None and change.state in _UPDATES:
                self.on_update(change.connection)
        except Exception as exc:  # a user callback must not break the connection
            self._log.warning("callback failed", error=repr(exc))

    @property
    def connection(self) -> Connection | None:
        """The last good connection, None before the first Request and after Close."""
        return self.connections.connection(self.conn_id)

    def expires_at(self) -> float | None:
        """When the connection expires at the next hop (our segment's expiry)."""
        conn = self.connection
        if conn is None or not conn.path.path_segments:
            return None
        return expiry_of(conn.path.path_segments[0])

    def changes(self) -> AsyncIterator[StateChange]:
        """This connection's state changes from now on, until :meth:`close`."""
        return self.connections.changes(self.conn_id)

    async def request(self) -> Connection:
        """Request the connection (or refresh it now when already connected; or adopt the live
        one, see ``adopt``); it is refreshed and healed in the background from then on. Raises
        the domain error of a failed Request."""
        if self.connection is not None:
            conn = await self.connections.refresh(self.conn_id)
            if conn is not None:
                return conn
        if self.adopt:
            adopted = await self.connections.adopt(self._fresh(), self._ours)
            if adopted is not None:
                return adopted
        return await self.connections.request(self._fresh())

    async def _ours(self, found: Connection) -> bool:
        """Whether a connection the manager still has is this client's: its interface is here."""
        name = found.mechanism.parameters.get(NAME) or self.ifname
        return name == self.ifname and await interface_present(self.netns, self.ifname)

    async def close(self, *, raise_errors: bool = False) -> None:
        """Stop refreshing and Close the connection (errors are logged, raised only when
        ``raise_errors``). Closes the channel too; the client can request again afterwards."""
        try:
            await self.connections.close(self.conn_id)
        except NsmError:
            if raise_errors:
                raise
        finally:
            await self.connections.shutdown()

    @contextlib.asynccontextmanager
    async def connect(self) -> AsyncIterator[Connection]:
        """``async with client.connect() as conn:`` request, then close on exit."""
        try:
            conn = await self.request()
        except BaseException:
            await self.close()
            raise
        try:
            yield conn
        finally:
            await self.close()

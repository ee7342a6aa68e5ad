"""The client SDK: request a network service from the node's manager and keep the connection.

::

    client = Client(manager_url="unix:///run/nsm/nsm.sock", service="blue",
                    netns="/var/run/netns/pod1", ifname="nsm-1")
    async with client.connect() as conn:
        print(conn.context.ip_context.src_ip_addrs)

or ``await client.request()`` ... ``await client.close()``.

The client is the first hop of the path: its segment ``{name, id = connection id,
expires = now + lifetime}`` is segment 0. After a successful Request a background task refreshes
the connection at a third of the time left before its segment expires (the managers time a
connection out at that instant), retrying failures with backoff. When the connection has expired
anyway, it requests afresh (heal): same connection id, a path with only its own segment, no
endpoint or mechanism chosen, its addresses kept so an endpoint that still knows them keeps them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence

import grpc

from nsm.api import networkservice_pb2_grpc
from nsm.api.connection_pb2 import Connection, Mechanism
from nsm.api.networkservice_pb2 import NetworkServiceRequest
from nsm.elements.updatepath import expiry_of, ts
from nsm.elements.validate import validate_connection
from nsm.errors import InvalidArgument, NsmError, call
from nsm.kernel.netns import netns_path as named_netns
from nsm.log import get_logger
from nsm.mechanisms import kernel, netns_path, netns_url, validate_ifname, validate_mechanism
from nsm.transport import dial, parse_url

log = get_logger("nsm.client")

DEFAULT_IFNAME = "nsm-1"
DEFAULT_LIFETIME = 600.0
DEFAULT_TIMEOUT = 15.0
#: Refresh when a third of the time left before expiry has passed.
REFRESH_FRACTION = 1 / 3
MIN_BACKOFF = 0.1
MAX_BACKOFF = 5.0


def own_netns() -> str:
    """This process's network namespace as a path other processes can open."""
    return f"/proc/{os.getpid()}/ns/net"


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


class Client:
    """A connection to one network service, requested through the manager at ``manager_url``.

    ``lifetime`` (seconds) is the expiry this client writes into its own path segment: every hop
    closes the connection if it is not refreshed by then. ``on_update`` is called with each new
    connection (first request, refreshes, heals).
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
        min_backoff: float = MIN_BACKOFF,
        max_backoff: float = MAX_BACKOFF,
    ) -> None:
        self.manager_url = str(parse_url(manager_url))
        self.service = service
        self.ifname = validate_ifname(ifname, "client interface name")
        self.netns = self._check_netns(netns)
        self.labels = dict(labels or {})
        self.name = name or f"nsc-{uuid.uuid4().hex[:8]}"
        if len(self.name) > 253 or not self.name.isprintable() or any(c.isspace() for c in self.name):
            raise InvalidArgument(f"client name {self.name[:40]!r} is too long or has spaces")
        if not lifetime > 0:
            raise InvalidArgument(f"lifetime must be positive, not {lifetime}")
        if not request_timeout > 0:
            raise InvalidArgument(f"request timeout must be positive, not {request_timeout}")
        self.lifetime = float(lifetime)
        self.request_timeout = float(request_timeout)
        self.mechanisms = list(mechanisms) if mechanisms else [kernel(self.ifname, netns_url(self.netns))]
        for m in self.mechanisms:
            validate_mechanism(m)
        self.conn_id = conn_id or str(uuid.uuid4())
        self.on_update = on_update
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        # Check the whole first request once, so that bad input never reaches the wire.
        validate_connection(self._fresh().connection)
        self.connection: Connection | None = None
        self._channel: grpc.aio.Channel | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._log = log.bind(service=service, conn=self.conn_id)

    @staticmethod
    def _check_netns(netns: str | None) -> str:
        """A path, a ``file://`` URL or a name under /var/run/netns; it must exist."""
        if not netns:
            path = own_netns()
        elif "/" in netns or ":" in netns:
            path = netns_path(netns)
        else:
            path = named_netns(netns)
        if not os.path.exists(path):
            raise InvalidArgument(f"network namespace {path} does not exist")
        return path

    # -- requests -----------------------------------------------------------------------------

    def _fresh(self) -> NetworkServiceRequest:
        return new_request(service=self.service, name=self.name, mechanisms=self.mechanisms,
                           labels=self.labels, lifetime=self.lifetime, conn_id=self.conn_id)

    def _refresh_request(self, last: Connection) -> NetworkServiceRequest:
        """The last connection again (same id, path, endpoint), with a fresh expiry on our segment."""
        request = NetworkServiceRequest()
        request.connection.CopyFrom(last)
        conn = request.connection
        conn.id = self.conn_id
        conn.path.index = 0
        if not conn.path.path_segments:
            conn.path.path_segments.add(name=self.name, id=self.conn_id)
        conn.path.path_segments[0].expires.CopyFrom(ts(time.time() + self.lifetime))
        conn.labels.update(self.labels)
        request.mechanism_preferences.extend(self.mechanisms)
        return request

    def _heal_request(self, last: Connection) -> NetworkServiceRequest:
        """From scratch, but keep the id and the addresses (an endpoint may give them back)."""
        request = self._fresh()
        if last.HasField("context"):
            request.connection.context.CopyFrom(last.context)
        return request

    def _channel_for(self) -> grpc.aio.Channel:
        if self._channel is None:
            self._channel = dial(self.manager_url)
        return self._channel

    async def _send(self, request: NetworkServiceRequest) -> Connection:
        conn = await request_once(self._channel_for(), request, timeout=self.request_timeout)
        self.connection = conn
        if self.on_update is not None:
            try:
                self.on_update(conn)
            except Exception as exc:  # a user callback must not break the connection
                self._log.warning("on_update callback failed", error=repr(exc))
        return conn

    async def request(self) -> Connection:
        """Request the connection (or refresh it now when already connected); starts the
        background refresh. Raises the domain error of a failed Request."""
        async with self._lock:
            if self.connection is None:
                conn = await self._send(self._fresh())
                self._log.info("connection established", endpoint=conn.network_service_endpoint_name)
            else:
                conn = await self._send(self._refresh_request(self.connection))
            self._start_refresh()
            return conn

    def expires_at(self) -> float | None:
        """When the connection expires at the next hop (our segment's expiry)."""
        if self.connection is None or not self.connection.path.path_segments:
            return None
        return expiry_of(self.connection.path.path_segments[0])

    # -- refresh and heal ---------------------------------------------------------------------

    def _start_refresh(self) -> None:
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.get_running_loop().create_task(
                self._refresh_loop(), name=f"nsc-refresh:{self.conn_id}")

    def _delay(self) -> float:
        expires = self.expires_at()
        if expires is None:
            return self.lifetime * REFRESH_FRACTION
        return max(0.0, (expires - time.time()) * REFRESH_FRACTION)

    async def _refresh_loop(self) -> None:
        delay = self._delay()
        backoff = self.min_backoff
        while True:
            await asyncio.sleep(delay)
            async with self._lock:
                last = self.connection
                if last is None:
                    return
                expires = self.expires_at() or 0.0
                expired = time.time() >= expires
                request = self._heal_request(last) if expired else self._refresh_request(last)
                try:
                    conn = await self._send(request)
                except NsmError as exc:
                    left = expires - time.time()
                    delay = backoff if expired or left <= 0 else min(backoff, left)
                    self._log.warning("heal failed, retrying" if expired else "refresh failed, retrying",
                                      code=exc.code.name, error=exc.message, retry_in=round(delay, 3))
                    backoff = min(backoff * 2, self.max_backoff)
                    continue
                if expired:
                    self._log.info("connection healed", endpoint=conn.network_service_endpoint_name)
                else:
                    self._log.debug("connection refreshed")
                backoff = self.min_backoff
                delay = self._delay()

    async def _stop_refresh(self) -> None:
        task, self._refresher = self._refresher, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- close --------------------------------------------------------------------------------

    async def close(self, *, raise_errors: bool = False) -> None:
        """Stop refreshing and Close the connection (errors are logged, raised only when
        ``raise_errors``). Closes the channel too; the client can request again afterwards."""
        await self._stop_refresh()
        try:
            async with self._lock:
                last, self.connection = self.connection, None
                if last is not None:
                    try:
                        await close_once(self._channel_for(), last, timeout=self.request_timeout)
                        self._log.info("connection closed")
                    except NsmError as exc:
                        self._log.warning("close failed", code=exc.code.name, error=exc.message)
                        if raise_errors:
                            raise
        finally:
            channel, self._channel = self._channel, None
            if channel is not None:
                await channel.close()

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

"""The one way to the registry: :class:`RegistryClient` (async calls over the stubs, raising
domain errors, one default deadline), used by the manager's cache and proxy, endpoints and
forwarders, and :class:`NseRefresher` (keeps one NSE, and the NetworkService records it offers,
registered until stopped). Retries use :mod:`nsm.retry` and :data:`nsm.errors.RETRYABLE`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Generic, TypeVar

import grpc

from nsm.api import registry_pb2, registry_pb2_grpc
from nsm.api.registry_pb2 import NetworkService, NetworkServiceEndpoint, NetworkServiceQuery
from nsm.errors import NsmError, call, from_rpc_error
from nsm.log import get_logger
from nsm.registry.authz import REGISTRANT_HEADER
from nsm.registry.matching import expiration
from nsm.retry import MAX_DELAY, MIN_DELAY, Backoff, retry
from nsm.security.tls import Security
from nsm.transport import watch_reconnects

log = get_logger(__name__)

T = TypeVar("T")

#: Default deadline of unary calls and non-watching Finds, in seconds.
DEFAULT_TIMEOUT = 10.0


class Watch(Generic[T]):
    """A live ``Find(watch=true)`` stream: an async iterator of ``(record, deleted)``.

    Ends normally when the registry ends the stream; raises the domain error of a failed
    stream (:class:`~nsm.errors.Unavailable` when the registry goes away,
    :class:`~nsm.errors.ResourceExhausted` when this watcher fell behind), after which the
    caller watches again. Use ``async with`` (or :meth:`cancel`) to end it early.
    """

    def __init__(self, rpc: Any, extract: Callable[[Any], T], where: str) -> None:
        self._rpc = rpc
        self._extract = extract
        self._where = where
        self._cancelled = False

    def __aiter__(self) -> Watch[T]:
        return self

    async def __anext__(self) -> tuple[T, bool]:
        if self._cancelled:
            raise StopAsyncIteration
        try:
            response = await self._rpc.read()
        except grpc.aio.AioRpcError as exc:
            if self._cancelled:
                raise StopAsyncIteration from None
            raise from_rpc_error(exc, self._where) from exc
        except asyncio.CancelledError:
            if self._cancelled:  # grpc reports our own cancel() as CancelledError
                raise StopAsyncIteration from None
            raise
        if response is grpc.aio.EOF:
            raise StopAsyncIteration
        return self._extract(response), response.deleted

    def cancel(self) -> None:
        """End the stream (idempotent)."""
        if not self._cancelled:
            self._cancelled = True
            self._rpc.cancel()

    async def __aenter__(self) -> Watch[T]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.cancel()


def _name_of(record: NetworkService | NetworkServiceEndpoint | str) -> str:
    return record if isinstance(record, str) else record.name


def _on_behalf(registrant: str | None) -> tuple[tuple[str, str], ...] | None:
    return None if registrant is None else ((REGISTRANT_HEADER, registrant),)


class RegistryClient:
    """The registry's two services over one channel (the registry itself, or a manager that
    proxies it). Every method raises domain errors (:mod:`nsm.errors`) instead of gRPC ones.
    ``timeout`` bounds unary calls and non-watching Finds (None: no deadline); a call's own
    ``timeout`` overrides it. ``security``: the one the channel was dialled with (None:
    insecure).

    ``registrant`` (registrations and unregistrations): the SPIFFE ID a manager's registry
    proxy acts for (metadata :data:`~nsm.registry.authz.REGISTRANT_HEADER`; the registry
    trusts it only from a manager)."""

    def __init__(self, channel: grpc.aio.Channel, *, timeout: float | None = DEFAULT_TIMEOUT,
                 security: Security | None = None):
        self.channel = channel
        self.security = security or Security.insecure()
        self._ns = registry_pb2_grpc.NetworkServiceRegistryStub(channel)
        self._nse = registry_pb2_grpc.NetworkServiceEndpointRegistryStub(channel)
        self.timeout = timeout

    def _deadline(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    async def _unary(self, method: Any, request: Any, timeout: float | None, where: str,
                     registrant: str | None = None) -> Any:
        return await call(method(request, timeout=self._deadline(timeout),
                                 metadata=_on_behalf(registrant)), where)

    async def _stream(self, rpc: Any, where: str) -> AsyncIterator[Any]:
        """The responses of a server stream; the call is cancelled when the consumer stops."""
        try:
            async for response in rpc:
                yield response
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, where) from exc
        finally:
            rpc.cancel()

    # network services

    async def register_ns(
        self, ns: NetworkService, *, timeout: float | None = None, registrant: str | None = None
    ) -> NetworkService:
        result: NetworkService = await self._unary(
            self._ns.Register, ns, timeout, "registry register ns", registrant)
        return result

    async def unregister_ns(
        self, ns: NetworkService | str, *, timeout: float | None = None,
        registrant: str | None = None,
    ) -> None:
        await self._unary(self._ns.Unregister, NetworkService(name=_name_of(ns)), timeout,
                          "registry unregister ns", registrant)

    def query_ns(
        self, query: NetworkServiceQuery, *, timeout: float | None = None
    ) -> AsyncIterator[registry_pb2.NetworkServiceResponse]:
        """The raw responses to a Find, as a proxy passes them on: a watching query has no
        deadline and lasts until the consumer stops iterating."""
        rpc = self._ns.Find(query, timeout=None if query.watch else self._deadline(timeout))
        return self._stream(rpc, "registry watch ns" if query.watch else "registry find ns")

    async def find_ns(
        self, query: NetworkService | None = None, *, timeout: float | None = None
    ) -> list[NetworkService]:
        """Services matching ``query`` (every one when None)."""
        request = NetworkServiceQuery(network_service=query or NetworkService())
        return [r.network_service async for r in self.query_ns(request, timeout=timeout)]

    async def get_ns(self, name: str, *, timeout: float | None = None) -> NetworkService | None:
        """The service named ``name``, or None."""
        found = await self.find_ns(NetworkService(name=name), timeout=timeout)
        return next((ns for ns in found if ns.name == name), None)

    def watch_ns(self, query: NetworkService | None = None) -> Watch[NetworkService]:
        """Matching services, then live changes, as ``(service, deleted)``."""
        request = NetworkServiceQuery(network_service=query or NetworkService(), watch=True)
        return Watch(self._ns.Find(request), lambda r: r.network_service, "registry watch ns")

    # network service endpoints

    async def register_nse(
        self, nse: NetworkServiceEndpoint, *, timeout: float | None = None,
        registrant: str | None = None,
    ) -> NetworkServiceEndpoint:
        """Register (or refresh) an NSE; returns the stored record with its name, expiration
        and initial registration time."""
        result: NetworkServiceEndpoint = await self._unary(
            self._nse.Register, nse, timeout, "registry register nse", registrant)
        return result

    async def unregister_nse(
        self, nse: NetworkServiceEndpoint | str, *, timeout: float | None = None,
        registrant: str | None = None,
    ) -> None:
        await self._unary(self._nse.Unregister, NetworkServiceEndpoint(name=_name_of(nse)),
                          timeout, "registry unregister nse", registrant)

    def query_nse(
        self, query: registry_pb2.NetworkServiceEndpointQuery, *, timeout: float | None = None
    ) -> AsyncIterator[registry_pb2.NetworkServiceEndpointResponse]:
        """The raw responses to a Find (see :meth:`query_ns`)."""
        rpc = self._nse.Find(query, timeout=None if query.watch else self._deadline(timeout))
        return self._stream(rpc, "registry watch nse" if query.watch else "registry find nse")

    async def find_nse(
        self, query: NetworkServiceEndpoint | None = None, *, timeout: float | None = None
    ) -> list[NetworkServiceEndpoint]:
        """Unexpired endpoints matching ``query`` (every one when None)."""
        request = registry_pb2.NetworkServiceEndpointQuery(
            network_service_endpoint=query or NetworkServiceEndpoint())
        return [r.network_service_endpoint async for r in self.query_nse(request, timeout=timeout)
                if not r.deleted]

    async def get_nse(
        self, name: str, *, timeout: float | None = None
    ) -> NetworkServiceEndpoint | None:
        """The unexpired endpoint named ``name``, or None."""
        found = await self.find_nse(NetworkServiceEndpoint(name=name), timeout=timeout)
        return next((nse for nse in found if nse.name == name), None)

    def watch_nse(
        self, query: NetworkServiceEndpoint | None = None
    ) -> Watch[NetworkServiceEndpoint]:
        """Matching endpoints, then live changes (register/refresh → ``deleted=False``,
        unregister/expiry → ``deleted=True``), as ``(nse, deleted)``."""
        request = registry_pb2.NetworkServiceEndpointQuery(
            network_service_endpoint=query or NetworkServiceEndpoint(), watch=True
        )
        return Watch(
            self._nse.Find(request), lambda r: r.network_service_endpoint, "registry watch nse"
        )


class NseRefresher:
    """Keeps an NSE registered, and the NetworkService records it offers: registers them,
    registers again at 1/3 of the granted lifetime until stopped, then unregisters the NSE.

    ``async with NseRefresher(client, nse, services=[...]) as refresher:`` (or ``await start()``
    / ``await stop()``). :meth:`start` returns once the first registration succeeded, retrying
    the errors of :data:`nsm.errors.RETRYABLE` (registry not up yet) with :func:`nsm.retry.retry`;
    an invalid NSE raises at once. Later refreshes retry every error with the same backoff
    (``min_backoff`` doubling up to ``max_backoff``) and log, so a registry restart is survived:
    the NSE is registered again as soon as the registry answers.

    ``services``: NetworkService records to register when missing (before the NSE, since clients
    ask for the service first), and again whenever they have disappeared (an in-memory registry
    restarted). An existing record is left alone and is what is registered again later.

    It also registers again at once when its channel comes back after losing its connection
    (``reregister_on_reconnect``): the peer — the registry, or the node's manager that proxies
    it — may have restarted and forgotten the registration, and waiting for the next refresh
    (a third of the lifetime, 20 s by default) would leave the endpoint unreachable that long.

    ``expiry``: the lifetime to ask for on each registration (None: the registry's default).
    """

    def __init__(
        self,
        client: RegistryClient,
        nse: NetworkServiceEndpoint,
        *,
        expiry: float | None = None,
        services: Sequence[NetworkService] = (),
        min_backoff: float = MIN_DELAY,
        max_backoff: float = MAX_DELAY,
        unregister_timeout: float = 2.0,
        reregister_on_reconnect: bool = True,
    ) -> None:
        if expiry is not None and not expiry > 0:
            raise ValueError("expiry must be positive")
        self._client = client
        self._template = NetworkServiceEndpoint()
        self._template.CopyFrom(nse)
        self._template.ClearField("expiration_time")
        self._template.ClearField("initial_registration_time")
        self._expiry = expiry
        self._services: dict[str, NetworkService] = {}
        for service in services:
            kept = NetworkService()
            kept.CopyFrom(service)
            self._services[service.name] = kept
        self._backoff = Backoff(min_backoff, max_backoff)
        self._unregister_timeout = unregister_timeout
        self._registered: NetworkServiceEndpoint | None = None
        self._task: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._reconnected = asyncio.Event()
        self._reregister_on_reconnect = reregister_on_reconnect
        self._log = log.bind(nse=nse.name or "?")

    @property
    def nse(self) -> NetworkServiceEndpoint:
        """The record as last granted by the registry."""
        if self._registered is None:
            raise RuntimeError("NseRefresher not started")
        return self._registered

    @property
    def name(self) -> str:
        return self.nse.name

    @property
    def services(self) -> dict[str, NetworkService]:
        """The NetworkService records kept registered, by name (as last seen in the registry)."""
        return dict(self._services)

    async def start(self) -> NetworkServiceEndpoint:
        if self._task is not None:
            return self.nse
        if self._reregister_on_reconnect and self._watcher is None:
            # Watching from before the first registration: a connection lost right after it
            # (the peer restarting) is seen as lost, so its return counts as a reconnect.
            self._watcher = asyncio.create_task(
                self._watch_channel(), name=f"nse-watch-{self._template.name or '?'}")
        try:
            await retry(self._register, what="registering endpoint", log=self._log,
                        backoff=self._backoff)
        except BaseException:
            await self._cancel()
            raise
        self._backoff.reset()
        self._reconnected.clear()  # the first connection, not a reconnect
        self._log = log.bind(nse=self.name)
        self._log.info("endpoint registered", url=self.nse.url)
        self._task = asyncio.create_task(self._refresh_loop(), name=f"nse-refresh-{self.name}")
        return self.nse

    async def stop(self) -> None:
        """Stop refreshing and unregister (best effort, bounded by ``unregister_timeout``)."""
        if self._task is None:
            await self._cancel()  # a start that failed or was cancelled
            return
        await self._cancel()
        try:
            await self._client.unregister_nse(self.name, timeout=self._unregister_timeout)
            self._log.info("endpoint unregistered")
        except NsmError as exc:
            self._log.warning("unregistering endpoint failed", error=exc.message)

    async def _cancel(self) -> None:
        """End the refresh loop and the channel watcher."""
        tasks = [t for t in (self._task, self._watcher) if t is not None]
        self._task = self._watcher = None
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def __aenter__(self) -> NseRefresher:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def _register(self) -> None:
        """The services (when missing), then the NSE."""
        timeout = self._client.timeout
        if self._registered is not None:  # a refresh must not outwait the registration
            bound = max(self._interval(), 0.5)
            timeout = bound if timeout is None else min(timeout, bound)
        for name, record in self._services.items():
            found = await self._client.get_ns(name, timeout=timeout)
            if found is None:
                found = await self._client.register_ns(record, timeout=timeout)
                self._log.info("network service registered", service=name,
                               payload=found.payload)
            self._services[name] = found
        request = NetworkServiceEndpoint()
        request.CopyFrom(self._template)
        if self._registered is not None:
            request.name = self._registered.name  # keep a generated name
        if self._expiry is not None:
            deadline = time.time() + self._expiry
            request.expiration_time.seconds = int(deadline)
            request.expiration_time.nanos = int((deadline % 1) * 1e9)
        self._registered = await self._client.register_nse(request, timeout=timeout)

    def _interval(self) -> float:
        """A third of the lifetime left on the current registration."""
        exp = expiration(self.nse)
        lifetime = (exp - time.time()) if exp is not None else (self._expiry or 60.0)
        return max(lifetime / 3, 0.01)

    async def _watch_channel(self) -> None:
        """Wake the refresh loop when the channel is READY again after losing its connection."""

        def back() -> None:
            self._log.info("registry connection is back: registering again")
            self._reconnected.set()

        await watch_reconnects(self._client.channel, back)

    async def _sleep(self, delay: float) -> None:
        """Sleep ``delay`` s, or less if the channel reconnected meanwhile."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._reconnected.wait(), delay)
        self._reconnected.clear()

    async def _refresh_loop(self) -> None:
        delay = self._interval()
        while True:
            await self._sleep(delay)
            try:
                await self._register()
            except Exception as exc:  # never stop refreshing: log and retry
                delay = self._backoff.next_delay()
                error = exc.message if isinstance(exc, NsmError) else repr(exc)
                self._log.warning("refreshing endpoint failed, retrying", error=error,
                                  retry_in=round(delay, 3))
                continue
            self._backoff.reset()
            delay = self._interval()


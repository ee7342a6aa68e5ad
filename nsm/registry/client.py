"""Client helpers for the registry: :class:`RegistryClient` (thin async calls over the stubs,
raising domain errors) and :class:`NseRefresher` (keeps one NSE registered until stopped).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Generic, TypeVar

import grpc

from nsm.api import registry_pb2_grpc
from nsm.api.registry_pb2 import (
    NetworkService,
    NetworkServiceEndpoint,
    NetworkServiceEndpointQuery,
    NetworkServiceQuery,
)
from nsm.errors import (
    DeadlineExceeded,
    NsmError,
    ResourceExhausted,
    Unavailable,
    call,
    from_rpc_error,
)
from nsm.log import get_logger
from nsm.registry.matching import expiration
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

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cancel()


def _name_of(record: NetworkService | NetworkServiceEndpoint | str) -> str:
    return record if isinstance(record, str) else record.name


class RegistryClient:
    """The registry's two services over one channel. Every method raises domain errors
    (:mod:`nsm.errors`) instead of gRPC ones. ``timeout`` bounds unary calls and
    non-watching Finds (None: no deadline)."""

    def __init__(self, channel: grpc.aio.Channel, *, timeout: float | None = DEFAULT_TIMEOUT):
        self.channel = channel
        self._ns = registry_pb2_grpc.NetworkServiceRegistryStub(channel)
        self._nse = registry_pb2_grpc.NetworkServiceEndpointRegistryStub(channel)
        self.timeout = timeout

    def _deadline(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    # network services

    async def register_ns(
        self, ns: NetworkService, *, timeout: float | None = None
    ) -> NetworkService:
        result: NetworkService = await call(
            self._ns.Register(ns, timeout=self._deadline(timeout)), "registry register ns"
        )
        return result

    async def unregister_ns(
        self, ns: NetworkService | str, *, timeout: float | None = None
    ) -> None:
        request = NetworkService(name=_name_of(ns))
        await call(
            self._ns.Unregister(request, timeout=self._deadline(timeout)),
            "registry unregister ns",
        )

    async def find_ns(
        self, query: NetworkService | None = None, *, timeout: float | None = None
    ) -> list[NetworkService]:
        """Services matching ``query`` (every one when None)."""
        request = NetworkServiceQuery(network_service=query or NetworkService(), watch=False)
        rpc = self._ns.Find(request, timeout=self._deadline(timeout))
        try:
            return [response.network_service async for response in rpc]
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, "registry find ns") from exc

    async def get_ns(self, name: str, *, timeout: float | None = None) -> NetworkService | None:
        """The service named ``name``, or None."""
        found = await self.find_ns(NetworkService(name=name), timeout=timeout)
        return found[0] if found else None

    def watch_ns(self, query: NetworkService | None = None) -> Watch[NetworkService]:
        """Matching services, then live changes, as ``(service, deleted)``."""
        request = NetworkServiceQuery(network_service=query or NetworkService(), watch=True)
        return Watch(self._ns.Find(request), lambda r: r.network_service, "registry watch ns")

    # network service endpoints

    async def register_nse(
        self, nse: NetworkServiceEndpoint, *, timeout: float | None = None
    ) -> NetworkServiceEndpoint:
        """Register (or refresh) an NSE; returns the stored record with its name, expiration
        and initial registration time."""
        result: NetworkServiceEndpoint = await call(
            self._nse.Register(nse, timeout=self._deadline(timeout)), "registry register nse"
        )
        return result

    async def unregister_nse(
        self, nse: NetworkServiceEndpoint | str, *, timeout: float | None = None
    ) -> None:
        request = NetworkServiceEndpoint(name=_name_of(nse))
        await call(
            self._nse.Unregister(request, timeout=self._deadline(timeout)),
            "registry unregister nse",
        )

    async def find_nse(
        self, query: NetworkServiceEndpoint | None = None, *, timeout: float | None = None
    ) -> list[NetworkServiceEndpoint]:
        """Unexpired endpoints matching ``query`` (every one when None)."""
        request = NetworkServiceEndpointQuery(
            network_service_endpoint=query or NetworkServiceEndpoint(), watch=False
        )
        rpc = self._nse.Find(request, timeout=self._deadline(timeout))
        try:
            return [response.network_service_endpoint async for response in rpc]
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, "registry find nse") from exc

    def watch_nse(
        self, query: NetworkServiceEndpoint | None = None
    ) -> Watch[NetworkServiceEndpoint]:
        """Matching endpoints, then live changes (register/refresh → ``deleted=False``,
        unregister/expiry → ``deleted=True``), as ``(nse, deleted)``."""
        request = NetworkServiceEndpointQuery(
            network_service_endpoint=query or NetworkServiceEndpoint(), watch=True
        )
        return Watch(
            self._nse.Find(request), lambda r: r.network_service_endpoint, "registry watch nse"
        )


#: Errors worth retrying when first registering (the registry may just be starting).
TRANSIENT_ERRORS: tuple[type[NsmError], ...] = (Unavailable, DeadlineExceeded, ResourceExhausted)


class NseRefresher:
    """Keeps an NSE registered: registers it, re-registers at 1/3 of its granted lifetime
    until stopped, then unregisters it.

    ``async with NseRefresher(client, nse) as refresher:`` (or ``await start()`` /
    ``await stop()``). :meth:`start` returns once the first registration succeeded, retrying
    transient errors (registry not up yet) with backoff; an invalid NSE raises at once.
    Later refreshes retry every error with exponential backoff (``min_backoff`` doubling up
    to ``max_backoff``) and log, so a registry restart is survived: the NSE is registered
    again as soon as the registry answers.

    It also re-registers at once when its channel comes back after losing its connection
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
        min_backoff: float = 0.1,
        max_backoff: float = 5.0,
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
        self._min_backoff = min_backoff
        self._max_backoff = max_backoff
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

    async def start(self) -> NetworkServiceEndpoint:
        if self._task is not None:
            return self.nse
        backoff = self._min_backoff
        while True:
            try:
                await self._register()
                break
            except TRANSIENT_ERRORS as exc:
                self._log.warning("registry not reachable, retrying", error=exc.message,
                                  retry_in=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._max_backoff)
        self._log = log.bind(nse=self.name)
        self._log.info("endpoint registered", url=self.nse.url)
        self._task = asyncio.create_task(self._refresh_loop(), name=f"nse-refresh-{self.name}")
        if self._reregister_on_reconnect:
            self._watcher = asyncio.create_task(self._watch_channel(),
                                                name=f"nse-watch-{self.name}")
        return self.nse

    async def stop(self) -> None:
        """Stop refreshing and unregister (best effort, bounded by ``unregister_timeout``)."""
        task, self._task = self._task, None
        if task is None:
            return
        watcher, self._watcher = self._watcher, None
        for t in (task, watcher):
            if t is not None:
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t
        try:
            await self._client.unregister_nse(self.name, timeout=self._unregister_timeout)
            self._log.info("endpoint unregistered")
        except NsmError as exc:
            self._log.warning("unregistering endpoint failed", error=exc.message)

    async def __aenter__(self) -> NseRefresher:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _register(self) -> None:
        request = NetworkServiceEndpoint()
        request.CopyFrom(self._template)
        if self._registered is not None:
            request.name = self._registered.name  # keep a generated name
        if self._expiry is not None:
            deadline = time.time() + self._expiry
            request.expiration_time.seconds = int(deadline)
            request.expiration_time.nanos = int((deadline % 1) * 1e9)
        timeout = self._client.timeout
        if self._registered is not None:  # a refresh must not outwait the registration
            bound = max(self._interval(), 0.5)
            timeout = bound if timeout is None else min(timeout, bound)
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
        backoff = self._min_backoff
        while True:
            await self._sleep(delay)
            try:
                await self._register()
            except Exception as exc:  # never stop refreshing: log and retry
                error = exc.message if isinstance(exc, NsmError) else repr(exc)
                self._log.warning("refreshing endpoint failed, retrying", error=error,
                                  retry_in=backoff)
                delay, backoff = backoff, min(backoff * 2, self._max_backoff)
                continue
            delay, backoff = self._interval(), self._min_backoff

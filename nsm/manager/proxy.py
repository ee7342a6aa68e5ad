"""The manager's registry proxy: endpoints and forwarders of a node register through it.

An endpoint's registration is forwarded to the registry with the URL replaced by this manager's
advertised (tcp) URL, when it has one, so that managers on other nodes reach the endpoint through
this one; the endpoint's own URL is remembered in :class:`LocalEndpoints`, which is also how the
manager knows that an endpoint is on its node (it registered through this manager), whatever the
URL scheme. The endpoint is also labelled ``nodeName=<this node>`` for each of its services (for
selectors). Forwarder registrations, services, finds and unregistrations pass through unchanged.

The proxies remember the last record they forwarded for every service and endpoint (until it is
unregistered or expires), and :meth:`Replay.replay` registers them all again: the manager calls
it when its registry channel reconnects, so a restarted (in-memory) registry knows this node's
endpoints within a second or two instead of at their next refresh. Endpoints whose records have
expired are not brought back.

An endpoint that dies without unregistering (SIGKILL, its pod deleted) is unregistered by the
proxy it registered through, about a second after it became unreachable
(:class:`~nsm.manager.alive.EndpointLiveness`), instead of lingering until its registration
expires.

Every call to the registry goes through the one :class:`~nsm.registry.client.RegistryClient`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TypeVar

import grpc
from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import Message

from nsm.api import registry_pb2, registry_pb2_grpc
from nsm.api.registry_pb2 import NetworkService, NetworkServiceEndpoint
from nsm.errors import NsmError, grpc_errors
from nsm.log import get_logger
from nsm.manager.alive import DEFAULT_GRACE, EndpointLiveness
from nsm.registry.client import RegistryClient
from nsm.registry.matching import expiration
from nsm.security.tls import Security
from nsm.transport import normalize_url, parse_url
from nsm.wellknown import FORWARDER_SERVICE, NODE_LABEL

log = get_logger("nsm.manager.proxy")

M = TypeVar("M", bound=Message)


class LocalEndpoints:
    """Endpoints registered through this manager, so on its node: NSE name → the URL it really
    listens on."""

    def __init__(self) -> None:
        self._urls: dict[str, str] = {}

    def set(self, name: str, url: str) -> None:
        self._urls[name] = url

    def get(self, name: str) -> str | None:
        """The endpoint's own URL when it registered through this manager, else None."""
        return self._urls.get(name)

    def drop(self, name: str) -> None:
        self._urls.pop(name, None)

    def __len__(self) -> int:
        return len(self._urls)


async def _register_all(register: Callable[[M], Awaitable[M]], records: dict[str, M]) -> int:
    """Register every record again; how many succeeded (failures are logged)."""
    done = 0
    for name, record in list(records.items()):
        try:
            await register(record)
            done += 1
        except NsmError as exc:
            log.warning("registering again after a reconnect failed", name=name,
                        error=exc.message)
    return done


class Replay:
    """The records forwarded to the registry through this manager, by name."""

    def __init__(self, registry: RegistryClient) -> None:
        self.registry = registry
        self.services: dict[str, NetworkService] = {}
        self.endpoints: dict[str, NetworkServiceEndpoint] = {}

    async def replay(self) -> tuple[int, int]:
        """Register every remembered service and unexpired endpoint again; (services,
        endpoints) registered. Failures are logged (the endpoint's own refresh follows)."""
        now = time.time()
        for name, nse in list(self.endpoints.items()):
            exp = expiration(nse)
            if exp is not None and exp <= now:
                del self.endpoints[name]
        return (await _register_all(self.registry.register_ns, self.services),
                await _register_all(self.registry.register_nse, self.endpoints))


class NsProxy(registry_pb2_grpc.NetworkServiceRegistryServicer):
    def __init__(self, registry: RegistryClient, replay: Replay | None = None) -> None:
        self.registry = registry
        self.replay = replay or Replay(registry)

    @grpc_errors
    async def Register(self, request: NetworkService, context: grpc.aio.ServicerContext) -> NetworkService:
        result = await self.registry.register_ns(request)
        self.replay.services[result.name] = result
        return result

    @grpc_errors
    async def Find(self, request: registry_pb2.NetworkServiceQuery, context: grpc.aio.ServicerContext
                   ) -> AsyncIterator[registry_pb2.NetworkServiceResponse]:
        async for response in self.registry.query_ns(request):
            yield response

    @grpc_errors
    async def Unregister(self, request: NetworkService, context: grpc.aio.ServicerContext) -> Empty:
        await self.registry.unregister_ns(request.name)
        self.replay.services.pop(request.name, None)
        return Empty()


class NseProxy(registry_pb2_grpc.NetworkServiceEndpointRegistryServicer):
    """``advertise()``: the URL this manager registers its endpoints under (None: none; the
    endpoint is registered with its own URL); ``own_urls()``: every URL of this manager.

    Finds answer the records of endpoints registered through this manager with their real URL
    (what the node's forwarder dials), and leave out records that name this manager but that it
    does not know (yet: after a restart, until the endpoint registers again), so a forwarder
    never mistakes its manager for an endpoint.

    ``gone_grace``: an endpoint registered here that stays unreachable this long after it was
    reached is unregistered (:meth:`gone`); None: never (its registration expires). Stop the
    watches with :meth:`shutdown`."""

    def __init__(self, registry: RegistryClient, *, local: LocalEndpoints,
                 advertise: Callable[[], str | None], own_urls: Callable[[], Iterable[str]] = list,
                 node: str = "", replay: Replay | None = None,
                 gone_grace: float | None = DEFAULT_GRACE, security: Security | None = None) -> None:
        self.security = security or Security.insecure()
        self.registry = registry
        self.replay = replay or Replay(registry)
        self.local = local
        self.advertise = advertise
        self.own_urls = own_urls
        self.node = node
        self.liveness = (EndpointLiveness(self.gone, grace=gone_grace, security=self.security)
                         if gone_grace is not None else None)

    async def gone(self, name: str) -> None:
        """The endpoint ``name`` died without unregistering: unregister it on its behalf."""
        try:
            await self.registry.unregister_nse(name)
        except NsmError as exc:
            log.warning("unregistering a dead endpoint failed: its registration will expire",
                        nse=name, error=exc.message)
        self.local.drop(name)
        self.replay.endpoints.pop(name, None)

    async def shutdown(self) -> None:
        if self.liveness is not None:
            await self.liveness.shutdown()

    def _local_view(self, nse: NetworkServiceEndpoint) -> NetworkServiceEndpoint | None:
        real = self.local.get(nse.name)
        if real is not None:
            out = NetworkServiceEndpoint()
            out.CopyFrom(nse)
            out.url = real
            return out
        if nse.url and normalize_url(nse.url) in {normalize_url(u) for u in self.own_urls()}:
            return None
        return nse

    @grpc_errors
    async def Register(self, request: NetworkServiceEndpoint,
                       context: grpc.aio.ServicerContext) -> NetworkServiceEndpoint:
        if FORWARDER_SERVICE in request.network_service_names:
            result = await self.registry.register_nse(request)
            self._remember(result)
            return result
        real = str(parse_url(request.url))
        if self.liveness is not None:
            await self.liveness.settle(request.name)  # a removal of its dead predecessor first
        out = NetworkServiceEndpoint()
        out.CopyFrom(request)
        advertised = self.advertise()
        if advertised is not None:
            out.url = advertised
        if self.node:  # endpoints are labelled with their node, for selectors and forwarders
            for service in out.network_service_names:
                labels = out.network_service_labels[service].labels
                labels.setdefault(NODE_LABEL, self.node)
        # Known here before the registry announces it: a forwarder watching through us must
        # see the real URL from the first event on.
        known = self.local.get(request.name)
        self.local.set(request.name, real)
        try:
            result = await self.registry.register_nse(out)
        except BaseException:
            if known is None:
                self.local.drop(request.name)
            else:
                self.local.set(request.name, known)
            raise
        self.local.set(result.name, real)
        self._remember(result)
        if self.liveness is not None:
            self.liveness.watch(result.name, real)
        result.url = request.url  # the endpoint sees its own URL back
        return result

    def _remember(self, record: NetworkServiceEndpoint) -> None:
        kept = NetworkServiceEndpoint()
        kept.CopyFrom(record)
        self.replay.endpoints[record.name] = kept

    @grpc_errors
    async def Find(self, request: registry_pb2.NetworkServiceEndpointQuery,
                   context: grpc.aio.ServicerContext
                   ) -> AsyncIterator[registry_pb2.NetworkServiceEndpointResponse]:
        async for response in self.registry.query_nse(request):
            view = self._local_view(response.network_service_endpoint)
            if view is None:
                continue
            if view is not response.network_service_endpoint:
                response.network_service_endpoint.CopyFrom(view)
            yield response

    @grpc_errors
    async def Unregister(self, request: NetworkServiceEndpoint,
                         context: grpc.aio.ServicerContext) -> Empty:
        if self.liveness is not None:
            self.liveness.forget(request.name)
        await self.registry.unregister_nse(request.name)
        self.local.drop(request.name)
        self.replay.endpoints.pop(request.name, None)
        return Empty()

"""The manager's registry proxy: endpoints and forwarders of a node register through it.

An endpoint's registration is forwarded to the registry with the URL replaced by this manager's
advertised (tcp) URL, so that managers on other nodes reach the endpoint through this one; the
endpoint's own URL is remembered here to dial it locally. The endpoint is also labelled
``nodeName=<this node>`` for each of its services (for selectors). Forwarder registrations, services,
finds and unregistrations pass through unchanged.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from google.protobuf.empty_pb2 import Empty

from nsm.api import registry_pb2_grpc
from nsm.api.registry_pb2 import (
    NetworkService,
    NetworkServiceEndpoint,
    NetworkServiceEndpointQuery,
    NetworkServiceEndpointResponse,
    NetworkServiceQuery,
    NetworkServiceResponse,
)
from nsm.errors import call, from_rpc_error, grpc_errors
from nsm.log import get_logger
from nsm.transport import parse_url
from nsm.wellknown import FORWARDER_SERVICE, NODE_LABEL

log = get_logger("nsm.manager.proxy")


class LocalEndpoints:
    """NSE name → the URL it really listens on (for endpoints registered through us)."""

    def __init__(self) -> None:
        self._urls: dict[str, str] = {}

    def set(self, name: str, url: str) -> None:
        self._urls[name] = url

    def get(self, name: str) -> str | None:
        return self._urls.get(name)

    def drop(self, name: str) -> None:
        self._urls.pop(name, None)

    def __len__(self) -> int:
        return len(self._urls)


class NsProxy(registry_pb2_grpc.NetworkServiceRegistryServicer):
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.stub = registry_pb2_grpc.NetworkServiceRegistryStub(channel)

    @grpc_errors
    async def Register(self, request: NetworkService, context: grpc.aio.ServicerContext) -> NetworkService:
        result: NetworkService = await call(self.stub.Register(request, timeout=10), "registry")
        return result

    @grpc_errors
    async def Find(self, request: NetworkServiceQuery, context: grpc.aio.ServicerContext
                   ) -> AsyncIterator[NetworkServiceResponse]:
        try:
            async for resp in self.stub.Find(request):
                yield resp
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, "registry") from exc

    @grpc_errors
    async def Unregister(self, request: NetworkService, context: grpc.aio.ServicerContext) -> Empty:
        await call(self.stub.Unregister(request, timeout=10), "registry")
        return Empty()


class NseProxy(registry_pb2_grpc.NetworkServiceEndpointRegistryServicer):
    def __init__(self, channel: grpc.aio.Channel, *, local: LocalEndpoints,
                 advertise: str | None, node: str = "") -> None:
        self.stub = registry_pb2_grpc.NetworkServiceEndpointRegistryStub(channel)
        self.local = local
        self.advertise = advertise
        self.node = node

    @grpc_errors
    async def Register(self, request: NetworkServiceEndpoint,
                       context: grpc.aio.ServicerContext) -> NetworkServiceEndpoint:
        if self.advertise is None or FORWARDER_SERVICE in request.network_service_names:
            result: NetworkServiceEndpoint = await call(
                self.stub.Register(request, timeout=10), "registry")
            return result
        real = str(parse_url(request.url))
        out = NetworkServiceEndpoint()
        out.CopyFrom(request)
        out.url = self.advertise
        if self.node:  # endpoints are labelled with their node, for selectors
            for service in out.network_service_names:
                labels = out.network_service_labels[service].labels
                labels.setdefault(NODE_LABEL, self.node)
        result = await call(self.stub.Register(out, timeout=10), "registry")
        self.local.set(result.name, real)
        result.url = request.url  # the endpoint sees its own URL back
        return result

    @grpc_errors
    async def Find(self, request: NetworkServiceEndpointQuery, context: grpc.aio.ServicerContext
                   ) -> AsyncIterator[NetworkServiceEndpointResponse]:
        try:
            async for resp in self.stub.Find(request):
                yield resp
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, "registry") from exc

    @grpc_errors
    async def Unregister(self, request: NetworkServiceEndpoint,
                         context: grpc.aio.ServicerContext) -> Empty:
        await call(self.stub.Unregister(request, timeout=10), "registry")
        self.local.drop(request.name)
        return Empty()

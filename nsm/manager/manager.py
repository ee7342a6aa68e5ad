"""The manager daemon: its chain, composed in one place, and its lifecycle.

Chain: Begin → Validate → UpdatePath → Timeout → Monitor → Discover → SelectForwarder →
RoundRobin → Connect (to the chosen forwarder, which connects on to the endpoint).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from types import TracebackType

from nsm.api import connection_pb2_grpc, networkservice_pb2_grpc, registry_pb2_grpc
from nsm.api.registry_pb2 import NetworkServiceEndpoint
from nsm.chain import Chain
from nsm.elements.begin import Begin
from nsm.elements.connect import Connect
from nsm.elements.monitor import Monitor
from nsm.elements.timeout import Timeout
from nsm.elements.updatepath import DEFAULT_LIFETIME, UpdatePath
from nsm.elements.validate import Validate
from nsm.errors import Unavailable
from nsm.log import get_logger
from nsm.manager.cache import RegistryCache
from nsm.manager.proxy import LocalEndpoints, NseProxy, NsProxy, Replay
from nsm.manager.select import Discover, RoundRobin, SelectForwarder, normalize_url
from nsm.registry.client import RegistryClient
from nsm.servicer import NetworkServiceServicer
from nsm.transport import Channels, Server, Url, dial, watch_reconnects

log = get_logger("nsm.manager")


class Manager:
    """``async with Manager(name=..., listen=[...], registry_url=...) as mgr:``"""

    def __init__(self, *, name: str, listen: Sequence[str], registry_url: str,
                 advertise: Sequence[str] = (), lifetime: float = DEFAULT_LIFETIME,
                 request_timeout: float = 15.0) -> None:
        self.name = name
        self.server = Server(listen)
        self.registry_url = registry_url
        self.advertise = [normalize_url(u) for u in advertise]
        self.local = LocalEndpoints()
        self.channels = Channels()
        self._registry_channel = dial(registry_url)
        self.registry = RegistryClient(self._registry_channel)
        self.cache = RegistryCache(self.registry)
        self.replay = Replay(self.registry)
        self._watcher: asyncio.Task[None] | None = None
        self._replaying: asyncio.Task[None] | None = None
        self.begin = Begin()
        self.timeout = Timeout()
        self.monitor = Monitor()
        self.chain = Chain([
            self.begin,
            Validate(),
            UpdatePath(name, lifetime=lifetime),
            self.timeout,
            self.monitor,
            Discover(self.cache, node=name),
            SelectForwarder(self.cache, manager_urls=self.urls),
            RoundRobin(resolve=self.resolve),
            Connect(self.channels, timeout=request_timeout),
        ], name="manager")

    def urls(self) -> list[str]:
        return [str(u) for u in self.server.urls] + self.advertise

    def public_url(self) -> str | None:
        """The URL other nodes reach this manager by: the first advertised URL, else the first
        tcp listen URL with a concrete host."""
        if self.advertise:
            return self.advertise[0]
        for u in self.server.urls:
            if not u.is_unix and u.host not in ("0.0.0.0", "::", ""):
                return str(u)
        return None

    @property
    def bound(self) -> list[Url]:
        return self.server.urls

    def resolve(self, nse: NetworkServiceEndpoint) -> str:
        """The URL a forwarder dials to reach an endpoint: its own URL when it registered
        through this manager, the URL it registered with otherwise (for an endpoint on another
        node, that is its manager's)."""
        if normalize_url(nse.url) in self.urls():
            real = self.local.get(nse.name)
            if real is None:
                raise Unavailable(f"endpoint {nse.name} is registered through this manager, "
                                  "which does not know it (yet): waiting for its refresh")
            return real
        return nse.url

    async def start(self) -> None:
        networkservice_pb2_grpc.add_NetworkServiceServicer_to_server(
            NetworkServiceServicer(self.chain), self.server.grpc)
        connection_pb2_grpc.add_MonitorConnectionServicer_to_server(self.monitor, self.server.grpc)
        registry_pb2_grpc.add_NetworkServiceRegistryServicer_to_server(
            NsProxy(self.registry, self.replay), self.server.grpc)
        self._nse_proxy = NseProxy(self.registry, local=self.local, advertise=self.public_url,
                                   node=self.name, replay=self.replay)
        registry_pb2_grpc.add_NetworkServiceEndpointRegistryServicer_to_server(
            self._nse_proxy, self.server.grpc)
        self.server.add_service_names(["networkservice.NetworkService",
                                       "connection.MonitorConnection",
                                       "registry.NetworkServiceRegistry",
                                       "registry.NetworkServiceEndpointRegistry"])
        await self.cache.start()
        await self.server.start()
        self._watcher = asyncio.create_task(
            watch_reconnects(self._registry_channel, self._registry_back), name="registry-watch")
        log.info("manager serving", name=self.name, urls=",".join(self.urls()),
                 registry=self.registry_url)

    def _registry_back(self) -> None:
        """The registry channel reconnected: the registry may have restarted empty."""
        if self._replaying is not None and not self._replaying.done():
            return

        async def replay() -> None:
            services, endpoints = await self.replay.replay()
            log.info("registry connection is back: registered again what goes through us",
                     services=services, endpoints=endpoints)

        self._replaying = asyncio.create_task(replay(), name="registry-replay")

    async def stop(self) -> None:
        for task in (self._watcher, self._replaying):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._watcher = self._replaying = None
        await self.server.stop(grace=1.0)
        await self.chain.shutdown()
        await self.cache.stop()
        await self.channels.close()
        await self._registry_channel.close()

    async def __aenter__(self) -> Manager:
        await self.start()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

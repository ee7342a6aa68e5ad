"""The manager daemon: its chain, composed in one place, and its lifecycle.

Chain: Begin → Validate → UpdatePath → Timeout → Monitor → Discover → SelectForwarder →
RoundRobin → Connect (to the chosen forwarder, which connects on to the endpoint).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType

from nsm.api import connection_pb2_grpc, networkservice_pb2_grpc
from nsm.api.registry_pb2 import NetworkServiceEndpoint
from nsm.chain import Chain
from nsm.elements.begin import Begin
from nsm.elements.connect import Connect
from nsm.elements.monitor import Monitor
from nsm.elements.timeout import Timeout
from nsm.elements.updatepath import DEFAULT_LIFETIME, UpdatePath
from nsm.elements.validate import Validate
from nsm.log import get_logger
from nsm.manager.cache import RegistryCache
from nsm.manager.select import Discover, RoundRobin, SelectForwarder
from nsm.servicer import NetworkServiceServicer
from nsm.transport import Channels, Server, Url, dial

log = get_logger("nsm.manager")


class Manager:
    """``async with Manager(name=..., listen=[...], registry_url=...) as mgr:``"""

    def __init__(self, *, name: str, listen: Sequence[str], registry_url: str,
                 advertise: Sequence[str] = (), lifetime: float = DEFAULT_LIFETIME,
                 request_timeout: float = 15.0) -> None:
        self.name = name
        self.server = Server(listen)
        self.registry_url = registry_url
        self.advertise = list(advertise)
        self.channels = Channels()
        self._registry_channel = dial(registry_url)
        self.cache = RegistryCache(self._registry_channel)
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

    @property
    def bound(self) -> list[Url]:
        return self.server.urls

    def resolve(self, nse: NetworkServiceEndpoint) -> str:
        """The URL a forwarder dials to reach an endpoint."""
        return nse.url

    async def start(self) -> None:
        networkservice_pb2_grpc.add_NetworkServiceServicer_to_server(
            NetworkServiceServicer(self.chain), self.server.grpc)
        connection_pb2_grpc.add_MonitorConnectionServicer_to_server(self.monitor, self.server.grpc)
        self.server.add_service_names(["networkservice.NetworkService",
                                       "connection.MonitorConnection"])
        await self.cache.start()
        await self.server.start()
        log.info("manager serving", name=self.name, urls=",".join(self.urls()),
                 registry=self.registry_url)

    async def stop(self) -> None:
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

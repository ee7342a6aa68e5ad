"""The manager daemon: its chain, composed in one place, and what it serves.

Chain: (Begin → Validate → UpdatePath → Timeout → Monitor, see :mod:`nsm.role`) → Discover →
SelectForwarder → RoundRobin → MonitorNext → Connect (to the chosen forwarder, which resolves the chosen
endpoint by name through this manager's registry proxy and connects on to it).

It also serves the registry's two services as a proxy (:mod:`nsm.manager.proxy`): the node's
endpoints and forwarders register through it, and it answers their Finds with the real URLs of
the endpoints of this node; an endpoint of this node that dies without unregistering is
unregistered by it about a second later (:mod:`nsm.manager.alive`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

import grpc

from nsm.api import registry_pb2_grpc
from nsm.api.registry_pb2 import NetworkServiceEndpoint
from nsm.chain import Element
from nsm.elements.connect import Connect
from nsm.elements.monitornext import MonitorNext
from nsm.elements.updatepath import DEFAULT_LIFETIME
from nsm.manager.cache import RegistryCache
from nsm.manager.proxy import LocalEndpoints, NseProxy, NsProxy, Replay
from nsm.manager.select import Discover, RoundRobin, SelectForwarder
from nsm.registry.client import RegistryClient
from nsm.registry.matching import service_labels
from nsm.role import Role
from nsm.security.tls import Security
from nsm.transport import Channels, Service, dial, normalize_url, watch_reconnects
from nsm.wellknown import FORWARDER_SERVICE, MANAGER_URL_LABEL


class Manager(Role):
    """``async with Manager(name=..., listen=[...], registry_url=...) as mgr:``"""

    kind = "manager"

    def __init__(self, *, name: str, listen: Sequence[str], registry_url: str,
                 advertise: Sequence[str] = (), lifetime: float = DEFAULT_LIFETIME,
                 request_timeout: float = 15.0, security: Security | None = None) -> None:
        super().__init__(name=name, listen=listen, lifetime=lifetime, security=security)
        self.registry_url = registry_url
        self.advertise = [normalize_url(u) for u in advertise]
        self.request_timeout = request_timeout
        self.local = LocalEndpoints()
        self.channels = Channels(security=self.security)
        self._registry_channel: grpc.aio.Channel | None = None
        self.registry: RegistryClient  # set up at start (they need the registry channel)
        self.cache: RegistryCache
        self.replay: Replay
        self.nse_proxy: NseProxy
        self._replaying: asyncio.Task[None] | None = None
        self.monitor_next = MonitorNext(self.channels, self.monitor, name=self.name)

    # -- the chain ------------------------------------------------------------------------

    def elements(self) -> list[Element]:
        return [
            Discover(self.cache, node=self.name),
            SelectForwarder(self.cache, manager_urls=self.urls),
            RoundRobin(),
            self.monitor_next,
            Connect(self.channels, timeout=self.request_timeout),
        ]

    def grpc_services(self) -> list[Service]:
        return [
            Service("registry.NetworkServiceRegistry",
                    registry_pb2_grpc.add_NetworkServiceRegistryServicer_to_server,
                    NsProxy(self.registry, self.replay)),
            Service("registry.NetworkServiceEndpointRegistry",
                    registry_pb2_grpc.add_NetworkServiceEndpointRegistryServicer_to_server,
                    self.nse_proxy),
        ]

    def status(self) -> dict[str, int]:
        return {**super().status(), **self.monitor_next.status(), "local_endpoints": len(self.local),
                "replay_endpoints": len(self.replay.endpoints)}

    # -- facts ----------------------------------------------------------------------------

    @property
    def registry_channel(self) -> grpc.aio.Channel:
        if self._registry_channel is None:
            raise RuntimeError("manager not started")
        return self._registry_channel

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

    def _seen(self, nse: NetworkServiceEndpoint) -> None:
        """A forwarder of this manager registered: connect to it now, so that the first Request
        through it does not wait for the connection."""
        if FORWARDER_SERVICE not in nse.network_service_names or not nse.url:
            return
        label = service_labels(nse, FORWARDER_SERVICE).get(MANAGER_URL_LABEL, "")
        if label and normalize_url(label) in {normalize_url(u) for u in self.urls()}:
            self.channels.preconnect(nse.url)

    # -- lifecycle ------------------------------------------------------------------------

    async def setup(self, stack: contextlib.AsyncExitStack) -> None:
        self._registry_channel = dial(self.registry_url, self.security)
        stack.push_async_callback(self._registry_channel.close)
        stack.push_async_callback(self.channels.close)
        self.registry = RegistryClient(self._registry_channel)
        self.cache = RegistryCache(self.registry, on_endpoint=self._seen)
        self.replay = Replay(self.registry)
        self.nse_proxy = NseProxy(self.registry, local=self.local, advertise=self.public_url,
                                  own_urls=self.urls, node=self.name, replay=self.replay,
                                  security=self.security)
        stack.push_async_callback(self.nse_proxy.shutdown)
        await self.cache.start()
        stack.push_async_callback(self.cache.stop)

    async def serving(self, stack: contextlib.AsyncExitStack) -> None:
        watcher = asyncio.create_task(
            watch_reconnects(self.registry_channel, self._registry_back), name="registry-watch")
        stack.push_async_callback(self._cancel, watcher)
        stack.push_async_callback(self._stop_replay)
        self.log.info("manager serving", urls=",".join(self.urls()), registry=self.registry_url)

    def _registry_back(self) -> None:
        """The registry channel reconnected: the registry may have restarted empty."""
        if self._replaying is not None and not self._replaying.done():
            return

        async def replay() -> None:
            services, endpoints = await self.replay.replay()
            self.log.info("registry connection is back: registered again what goes through us",
                          services=services, endpoints=endpoints)

        self._replaying = asyncio.create_task(replay(), name="registry-replay")

    async def _stop_replay(self) -> None:
        task, self._replaying = self._replaying, None
        if task is not None:
            await self._cancel(task)

    @staticmethod
    async def _cancel(task: asyncio.Task[None]) -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

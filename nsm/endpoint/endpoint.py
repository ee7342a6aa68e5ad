"""The network service endpoint (NSE): its chain, composed in one place, and its lifecycle.

Chain: Begin → Validate → UpdatePath(name) → Timeout → Monitor → KernelServer → IPAM
(→ extra elements of SDK users) → tail.

The endpoint programs nothing in the kernel: the forwarder puts one end of a veth pair into the
endpoint's namespace under the name the KernelServer chose, with the addresses the IPAM chose.

It serves ``networkservice.NetworkService`` and ``connection.MonitorConnection`` on its listen
URLs, registers the NetworkService records it offers (when missing, payload IP) and itself as an
NSE in the registry (``url`` = its first listen URL), keeps that registration fresh, and
unregisters when it stops.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence

import grpc

from nsm.api.registry_pb2 import NetworkService, NetworkServiceEndpoint
from nsm.chain import Element
from nsm.elements.callers import ForwardersOnly
from nsm.elements.updatepath import DEFAULT_LIFETIME
from nsm.endpoint.ipam import PointToPointIPAM, parse_cidr
from nsm.endpoint.kernel import KernelServer
from nsm.errors import InvalidArgument, NsmError
from nsm.kernel.netns import resolve_netns
from nsm.log import get_logger
from nsm.mechanisms import PAYLOAD_IP
from nsm.names import check_name
from nsm.registry.client import NseRefresher, RegistryClient
from nsm.role import Role
from nsm.security.netns import NetnsProof
from nsm.security.policy import Policies
from nsm.security.tls import Security
from nsm.transport import dial, parse_url
from nsm.wellknown import NODE_LABEL

log = get_logger("nsm.endpoint")

DEFAULT_EXPIRY = 60.0


class Endpoint(Role):
    """``async with Endpoint(name=..., services=[...], cidr=..., listen=[...], registry_url=...)``.

    - ``netns``: where the forwarder puts the endpoint's interfaces (a path or a name under
      /var/run/netns); default: this process's namespace.
    - ``labels``: this endpoint's labels, registered for every one of its services.
    - ``expiry``: lifetime of the registry registration (refreshed at a third of it).
    - ``lifetime``: the longest this hop keeps a connection without a refresh.
    - ``elements``: extra chain elements (SDK users), run after the IPAM, before the tail.
    - ``registry_url`` None: serve without registering (tests, static setups).
    - ``advertise``: the URL registered for this endpoint (default: its first bound listen URL;
      set it when listening on a wildcard address such as ``tcp://0.0.0.0:5003``).
    - ``node``: the node it runs on, registered as its ``nodeName`` label (a manager it registers
      through adds it anyway; needed when it registers at the registry directly).
    """

    kind = "endpoint"
    last_hop = True

    def __init__(
        self,
        *,
        name: str,
        services: Sequence[str],
        cidr: str,
        listen: Sequence[str],
        registry_url: str | None = None,
        netns: str | None = None,
        labels: Mapping[str, str] | None = None,
        expiry: float = DEFAULT_EXPIRY,
        lifetime: float = DEFAULT_LIFETIME,
        elements: Sequence[Element] = (),
        advertise: str | None = None,
        node: str = "",
        grace: float = 1.0,
        security: Security | None = None,
        policies: Policies | None = None,
    ) -> None:
        if not listen:
            raise InvalidArgument("an endpoint needs at least one listen URL")
        self.listen = [str(parse_url(u)) for u in listen]
        super().__init__(name=name, listen=self.listen, lifetime=lifetime, grace=grace,
                         security=security, policies=policies)
        if not services:
            raise InvalidArgument("an endpoint needs at least one network service")
        self.services = [check_name(s, "network service name") for s in services]
        self.network = parse_cidr(cidr)
        self.registry_url = str(parse_url(registry_url)) if registry_url else None
        self.advertise = str(parse_url(advertise)) if advertise else None
        self.netns = resolve_netns(netns)
        self.labels = dict(labels or {})
        if node:
            self.labels.setdefault(NODE_LABEL, check_name(node, "node name"))
        if not expiry > 0:
            raise InvalidArgument(f"registration expiry must be positive, not {expiry}")
        self.expiry = float(expiry)
        self.kernel = KernelServer(self.netns, own=netns is None)
        self.ipam = PointToPointIPAM(self.network)
        self.extra = list(elements)
        self.refresher: NseRefresher | None = None
        self._registry_channel: grpc.aio.Channel | None = None

    @property
    def urls(self) -> list[str]:
        """The bound URLs (tcp port 0 replaced by the real port)."""
        return [str(u) for u in self.server.urls]

    @property
    def url(self) -> str:
        if not self.server.urls:
            raise RuntimeError("endpoint not started")
        return self.urls[0]

    def nse(self) -> NetworkServiceEndpoint:
        """The registry record of this endpoint."""
        nse = NetworkServiceEndpoint(name=self.name, url=self.advertise or self.url)
        nse.network_service_names.extend(self.services)
        for service in self.services:
            nse.network_service_labels[service].labels.update(self.labels)
        return nse

    # -- the chain ----------------------------------------------------------------------

    def callers(self) -> list[Element]:
        return [ForwardersOnly(self.security, self.policies)]

    def elements(self) -> list[Element]:
        return [self.kernel, self.ipam, *self.extra]

    def status(self) -> dict[str, int]:
        return {**super().status(), "ipam_pairs": self.ipam.connections, "ipam_free": self.ipam.free}

    # -- lifecycle ------------------------------------------------------------------------

    async def setup(self, stack: contextlib.AsyncExitStack) -> None:
        stack.callback(log.info, "endpoint stopped", name=self.name)
        # The forwarder puts interfaces into ``netns`` only when this endpoint proves it is its.
        await stack.enter_async_context(NetnsProof.listen(self.security, self.netns))

    async def serving(self, stack: contextlib.AsyncExitStack) -> None:
        """Register (retrying while the registry is unreachable); cancelling this stops
        everything the start did."""
        log.info("endpoint serving", name=self.name, urls=",".join(self.urls),
                 services=",".join(self.services), cidr=str(self.network), netns=self.netns)
        if self.registry_url is None:
            return
        self._registry_channel = dial(self.registry_url, self.security)
        stack.push_async_callback(self._close_registry)
        self.refresher = NseRefresher(
            RegistryClient(self._registry_channel), self.nse(), expiry=self.expiry,
            services=[NetworkService(name=s, payload=PAYLOAD_IP) for s in self.services])
        await self.refresher.start()

    async def _close_registry(self) -> None:
        """Unregister and close the registry channel."""
        refresher, self.refresher = self.refresher, None
        if refresher is not None:
            with contextlib.suppress(NsmError, RuntimeError):
                await refresher.stop()
        channel, self._registry_channel = self._registry_channel, None
        if channel is not None:
            await channel.close()

"""The forwarder daemon: its chain, composed in one place, its registration and lifecycle.

Chain: Begin → Validate → UpdatePath → Timeout → Monitor → SelectMechanism → KernelLocal →
VxlanClient → VxlanServer → Connect (to the next hop named by the manager: an endpoint, or a
remote manager). Each datapath element acts only on its own pair of mechanisms:

- KERNEL upstream, KERNEL downstream: KernelLocal (one veth between two pods of this node);
- KERNEL upstream, VXLAN downstream: VxlanClient (the client's half of a cross-node link);
- VXLAN upstream, KERNEL downstream: VxlanServer (the endpoint's half).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from types import TracebackType

from nsm.api import connection_pb2_grpc, networkservice_pb2_grpc
from nsm.api.connection_pb2 import Mechanism
from nsm.api.registry_pb2 import NetworkServiceEndpoint, NetworkServiceLabels
from nsm.chain import Chain, Ctx
from nsm.elements.begin import Begin
from nsm.elements.connect import Connect
from nsm.elements.monitor import Monitor
from nsm.elements.timeout import Timeout
from nsm.elements.updatepath import DEFAULT_LIFETIME, UpdatePath
from nsm.elements.validate import Validate
from nsm.errors import FailedPrecondition, Unsupported
from nsm.forwarder.kernel import KernelLocal
from nsm.forwarder.mechanism import SelectMechanism
from nsm.forwarder.vxlan import TablePool, Tunnel, VniPool, VxlanClient, VxlanServer, sweep_leftovers
from nsm.kernel.netlink import Netlink
from nsm.log import get_logger
from nsm.mechanisms import KERNEL, LOCAL, REMOTE, VXLAN, kernel, vxlan
from nsm.registry.client import NseRefresher, RegistryClient
from nsm.servicer import NetworkServiceServicer
from nsm.transport import Channels, Server, Url, dial
from nsm.wellknown import FORWARDER_SERVICE, MANAGER_URL_LABEL, NODE_LABEL

log = get_logger("nsm.forwarder")


class Forwarder:
    """``async with Forwarder(name=..., listen=[...], manager_url=..., registry_url=...):``"""

    def __init__(self, *, name: str, listen: Sequence[str], manager_url: str, registry_url: str,
                 node: str = "", lifetime: float = DEFAULT_LIFETIME, request_timeout: float = 15.0,
                 expiry: float | None = None, tunnel_ip: str | None = None) -> None:
        self.name = name
        self.node = node or name
        self.manager_url = manager_url
        self.registry_url = registry_url
        self.expiry = expiry
        self.server = Server(listen)
        self.channels = Channels()
        self.netlink = Netlink()
        self.monitor = Monitor()
        self.begin = Begin()
        self._registry_channel = dial(registry_url)
        self._refresher: NseRefresher | None = None
        self.tunnel_ip = tunnel_ip
        self.tunnel: Tunnel | None = None
        self.vnis = VniPool()
        self.tables = tables = TablePool()
        self.chain = Chain([
            self.begin,
            Validate(),
            UpdatePath(name, lifetime=lifetime),
            Timeout(),
            self.monitor,
            SelectMechanism(supported=[(LOCAL, KERNEL), (REMOTE, VXLAN)],
                            downstream=self._downstream),
            KernelLocal(self.netlink),
            VxlanClient(self.netlink, self._tunnel_proxy, self.vnis, tables, name),
            VxlanServer(self.netlink, self._tunnel_proxy, self.vnis, tables, name),
            Connect(self.channels, timeout=request_timeout),
        ], name="forwarder")

    @property
    def _tunnel_proxy(self) -> _TunnelRef:
        return _TunnelRef(self)

    def _downstream(self, ctx: Ctx, url: Url) -> list[Mechanism]:
        if url.is_unix:
            return [kernel()]
        if self.tunnel is None:
            raise Unsupported(f"next hop {url} is on another node, but this forwarder has no "
                              "tunnel address (set --tunnel-ip)")
        return [vxlan(self.tunnel.ip)]

    async def _detect_tunnel(self) -> Tunnel | None:
        """This node's tunnel endpoint: --tunnel-ip, else the first global address of an up,
        non-loopback interface; the MTU of connections is the underlay's minus VXLAN overhead."""
        for link in await self.netlink.links(None):
            if link.name == "lo" or not link.admin_up:
                continue
            for cidr in await self.netlink.addresses(None, link.name):
                ip = ipaddress.ip_interface(cidr).ip
                if ip.is_link_local or ip.is_loopback:
                    continue
                if self.tunnel_ip is None or str(ip) == self.tunnel_ip:
                    overhead = 50 if ip.version == 4 else 70
                    return Tunnel(ip=str(ip), dev=link.name, mtu=link.mtu - overhead)
        if self.tunnel_ip is not None:
            raise FailedPrecondition(f"tunnel address {self.tunnel_ip} is not on any interface "
                                     "of the forwarder's namespace")
        return None

    @property
    def bound(self) -> list[Url]:
        return self.server.urls

    def registration(self) -> NetworkServiceEndpoint:
        labels = {MANAGER_URL_LABEL: self.manager_url, NODE_LABEL: self.node, "p2p": "true"}
        return NetworkServiceEndpoint(
            name=self.name, network_service_names=[FORWARDER_SERVICE],
            network_service_labels={FORWARDER_SERVICE: NetworkServiceLabels(labels=labels)},
            url=str(self.server.urls[0]))

    async def start(self) -> None:
        networkservice_pb2_grpc.add_NetworkServiceServicer_to_server(
            NetworkServiceServicer(self.chain), self.server.grpc)
        connection_pb2_grpc.add_MonitorConnectionServicer_to_server(self.monitor, self.server.grpc)
        self.server.add_service_names(["networkservice.NetworkService",
                                       "connection.MonitorConnection"])
        self.tunnel = await self._detect_tunnel()
        swept = await sweep_leftovers(self.netlink, self.name, self.tables)
        if swept:
            log.warning("removed links left by an earlier run of this forwarder",
                        count=len(swept), links=",".join(sorted(swept)))
        await self.server.start()
        self._refresher = NseRefresher(RegistryClient(self._registry_channel), self.registration(),
                                       expiry=self.expiry)
        await self._refresher.start()
        log.info("forwarder serving", name=self.name, urls=",".join(map(str, self.server.urls)),
                 manager=self.manager_url,
                 tunnel=f"{self.tunnel.ip} dev {self.tunnel.dev} mtu {self.tunnel.mtu}"
                 if self.tunnel else "none")

    async def stop(self) -> None:
        if self._refresher is not None:
            await self._refresher.stop()
        await self.server.stop(grace=1.0)
        await self.chain.shutdown()
        await self.channels.close()
        await self._registry_channel.close()
        await self.netlink.close()

    async def __aenter__(self) -> Forwarder:
        await self.start()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()


class _TunnelRef:
    """The forwarder's tunnel as found at start (the datapath elements are built before)."""

    def __init__(self, forwarder: Forwarder) -> None:
        self._forwarder = forwarder

    def _get(self) -> Tunnel:
        if self._forwarder.tunnel is None:
            raise Unsupported("this forwarder has no tunnel address (set --tunnel-ip)")
        return self._forwarder.tunnel

    @property
    def ip(self) -> str:
        return self._get().ip

    @property
    def dev(self) -> str | None:
        return self._get().dev

    @property
    def mtu(self) -> int:
        return self._get().mtu

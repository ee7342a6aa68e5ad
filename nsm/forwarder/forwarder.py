"""The forwarder daemon: its chain, composed in one place, its registration and lifecycle.

Chain: (Begin → Validate → UpdatePath → Timeout → Monitor, see :mod:`nsm.role`) →
SelectMechanism → Confine.before → KernelLocal → VxlanClient → VxlanServer → Confine.after →
MonitorNext → Connect (to the next hop the forwarder resolved itself from the endpoint's name: the
endpoint, or another node's manager). Confine (:mod:`nsm.forwarder.confine`) checks every
namespace a KERNEL mechanism names before a datapath element builds anything in it.
The (upstream, downstream) mechanism pair selects the one datapath element that acts:

- KERNEL upstream, KERNEL downstream: KernelLocal (one veth between two pods of this node);
- KERNEL upstream, VXLAN downstream: VxlanClient (the client's half of a cross-node link);
- VXLAN upstream, KERNEL downstream: VxlanServer (the endpoint's half).

A restart keeps the datapath: at start the forwarder takes an inventory of the halves an earlier
run of it left (:class:`~nsm.forwarder.vxlan.Leftovers`) and deletes nothing; a connection's next
Request adopts its half (or its local veth) when it is exactly what the Request wants. A Close of
a connection not adopted yet removes what was left for it and goes on to the next hop (which
still holds its part); whatever no connection claims within ``adopt_grace`` seconds of serving is
removed then.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import Sequence

import grpc

from nsm.api.connection_pb2 import Connection, Mechanism
from nsm.api.registry_pb2 import NetworkServiceEndpoint, NetworkServiceLabels
from nsm.chain import Ctx, Element, Key
from nsm.elements.begin import Begin
from nsm.elements.callers import NodeManagerOnly
from nsm.elements.connect import SENT_URL, Connect
from nsm.elements.monitornext import MonitorNext
from nsm.elements.updatepath import DEFAULT_LIFETIME
from nsm.errors import EndpointUnreachable, FailedPrecondition, InvalidArgument, NsmError, Unsupported
from nsm.forwarder.confine import Confine
from nsm.forwarder.kernel import KernelLocal
from nsm.forwarder.mechanism import PAIR, NextHop, SelectMechanism
from nsm.forwarder.vxlan import (
    DEFAULT_ADOPT_GRACE,
    Leftovers,
    TablePool,
    Tunnel,
    VniPool,
    VxlanClient,
    VxlanServer,
)
from nsm.kernel.netlink import Netlink
from nsm.kernel.netns import NetnsFinder
from nsm.manager.cache import RegistryCache
from nsm.mechanisms import KERNEL, LOCAL, REMOTE, VXLAN, kernel, vxlan
from nsm.names import check_name
from nsm.registry.client import NseRefresher, RegistryClient
from nsm.registry.matching import service_labels
from nsm.role import Role
from nsm.security.policy import Policies
from nsm.security.tls import Security
from nsm.transport import Channels, dial
from nsm.wellknown import FORWARDER_SERVICE, MANAGER_URL_LABEL, NODE_LABEL

#: The endpoint a connection's last Request resolved, and its next hop (where a refresh goes
#: when the registry cannot tell it now).
_HOP: Key[tuple[str, NextHop]] = Key("forwarder.hop")


class Forwarder(Role):
    """``async with Forwarder(name=..., listen=[...], manager_url=..., registry_url=...):``

    ``registry_url`` is normally the node's manager (its registry proxy answers this node's
    endpoints with their real URLs); ``node`` (default: the name) is matched against the
    endpoints' ``nodeName`` label to tell endpoints of this node from other nodes' managers.
    ``adopt_grace``: how long after a restart what an earlier run left is kept for its
    connections to claim (see the module docstring)."""

    kind = "forwarder"

    def __init__(self, *, name: str, listen: Sequence[str], manager_url: str, registry_url: str,
                 node: str = "", lifetime: float = DEFAULT_LIFETIME, request_timeout: float = 15.0,
                 expiry: float | None = None, tunnel_ip: str | None = None,
                 adopt_grace: float = DEFAULT_ADOPT_GRACE, security: Security | None = None,
                 policies: Policies | None = None) -> None:
        super().__init__(name=name, listen=listen, lifetime=lifetime, security=security,
                         policies=policies)
        if not adopt_grace > 0:
            raise InvalidArgument(f"adopt grace must be positive, not {adopt_grace}")
        self.node = check_name(node, "node name") if node else self.name
        self.manager_url = manager_url
        self.registry_url = registry_url
        self.expiry = expiry
        self.request_timeout = request_timeout
        self.tunnel_ip = tunnel_ip
        self.tunnel: Tunnel | None = None
        self.channels = Channels(security=self.security)
        self.netlink = Netlink()
        self.vnis = VniPool()
        self.tables = TablePool()
        self.leftovers = Leftovers(self.netlink, self.name, self.vnis, self.tables,
                                   grace=adopt_grace, log=self.log)
        #: Where each namespace named by inode is (pods name theirs so: no hostPID for them).
        self.netns = NetnsFinder()
        self.kernel_local = KernelLocal(self.netlink, finder=self.netns)
        self.confine = Confine(self.security, node=self.node, finder=self.netns)
        self.begin = Begin(unknown_close=self._close_leftover)
        self.monitor_next = MonitorNext(self.channels, self.monitor, name=self.name)
        self._registry_channel: grpc.aio.Channel | None = None
        self.registry: RegistryClient  # set up at start: the registry as this node sees it
        self.endpoints: RegistryCache

    # -- the chain ------------------------------------------------------------------------

    def callers(self) -> list[Element]:
        return [NodeManagerOnly(self.security, self.policies)]

    def elements(self) -> list[Element]:
        datapath: list[Element] = [self.kernel_local]
        pairs = [(KERNEL, KERNEL)]
        if self.tunnel is not None:
            side = (self.netlink, self.tunnel, self.vnis, self.tables, self.name, self.leftovers,
                    self.netns)
            datapath += [VxlanClient(*side), VxlanServer(*side)]
            pairs += [(KERNEL, VXLAN), (VXLAN, KERNEL)]
        return [
            SelectMechanism(supported=[(LOCAL, KERNEL), (REMOTE, VXLAN)], pairs=pairs,
                            next_hop=self.next_hop, offer=self.offer),
            self.confine.before,  # who may name a namespace; the client's checked, its proof started
            *datapath,
            self.confine.after,  # the client's proof awaited, the endpoint's namespace proven
            self.monitor_next,
            Connect(self.channels, timeout=self.request_timeout, to_endpoint=to_endpoint,
                    policies=self.policies),
        ]

    def status(self) -> dict[str, int]:
        return {**super().status(), **self.monitor_next.status(), "vnis": len(self.vnis),
                "tables": len(self.tables), "leftovers": len(self.leftovers),
                "netlink_sockets": len(self.netlink.cached())}

    def _seen(self, nse: NetworkServiceEndpoint) -> None:
        """An endpoint of this node registered: connect to it now, so that the first Request to
        it does not wait for the connection."""
        if FORWARDER_SERVICE in nse.network_service_names or not nse.url:
            return
        if any(labels.labels.get(NODE_LABEL) == self.node
               for labels in nse.network_service_labels.values()):
            self.channels.preconnect(nse.url)

    async def next_hop(self, ctx: Ctx, conn: Connection) -> NextHop:
        """The endpoint the manager chose, resolved by name in the registry as this node sees
        it: on this node → the endpoint itself; elsewhere → the manager it registered through."""
        name = conn.network_service_endpoint_name
        if not name:
            raise InvalidArgument("the connection names no endpoint: a forwarder serves the "
                                  "endpoint its manager chose")
        last = ctx.meta.get(_HOP)
        try:
            nse = await self.endpoints.endpoint(name)
        except NsmError as exc:
            if last is None or last[0] != name:
                raise
            nse, why = None, f"the registry cannot be asked ({exc.message})"
        else:
            why = "the registry does not know it now"
        if nse is None or not nse.url:
            if last is not None and last[0] == name:
                # A refresh of a connection this forwarder holds: it goes where it went. Its
                # manager may have restarted and not know the endpoint until that registers
                # again; an endpoint really gone fails on the dial (EndpointUnreachable).
                ctx.log.debug("refreshing toward the next hop the connection has", nse=name,
                              url=last[1].url, why=why)
                return last[1]
            raise EndpointUnreachable(f"endpoint {name} is not known to the registry of node "
                                      f"{self.node}")
        node = node_of(nse, conn.network_service)
        if not node:
            raise FailedPrecondition(f"endpoint {name} has no {NODE_LABEL} label: register it "
                                     "through its node's manager (or label it with its node)")
        hop = NextHop(url=nse.url, local=node == self.node)
        ctx.meta.set(_HOP, (name, hop))
        return hop

    async def _close_leftover(self, ctx: Ctx, conn: Connection) -> None:
        """A Close of a connection this run holds nothing for. If an earlier run left its
        datapath (a half in the inventory, or a local veth with its aliases), remove that and
        send the Close on to the next hop (resolved as a Request would), which still has its
        part; else there is nothing to do (Close is idempotent)."""
        left = self.leftovers.claim(ctx.conn_id)
        local = await self.kernel_local.leftover(ctx, conn) if left is None else None
        if left is None and local is None:
            return
        what = left.describe() if left is not None else {"veth": local[1] if local else ""}
        ctx.log.info("closing a connection an earlier run of this forwarder left", **what)
        try:
            ctx.meta.set(SENT_URL, (await self.next_hop(ctx, conn)).url)
        except NsmError as exc:
            ctx.log.warning("cannot tell the next hop of a connection an earlier run left: it "
                            "removes its part at the connection's expiry", error=exc.message)
        if left is not None:
            removal = self.leftovers.remove(left)
        else:
            assert local is not None
            removal = self.netlink.delete_link(*local)
        results = await asyncio.gather(ctx.chain.close_after(self.begin, ctx, conn),
                                       asyncio.shield(removal),
                                       return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    def offer(self, ctx: Ctx, hop: NextHop) -> list[Mechanism]:
        if hop.local:
            return [kernel()]
        if self.tunnel is None:
            raise Unsupported(f"next hop {hop.url} is on another node, but this forwarder has no "
                              "tunnel address (set --tunnel-ip)")
        return [vxlan(self.tunnel.ip)]

    # -- lifecycle ------------------------------------------------------------------------

    async def setup(self, stack: contextlib.AsyncExitStack) -> None:
        stack.push_async_callback(self.netlink.close)
        self._registry_channel = dial(self.registry_url, self.security)
        stack.push_async_callback(self._registry_channel.close)
        stack.push_async_callback(self.channels.close)
        self.registry = RegistryClient(self._registry_channel)
        self.endpoints = RegistryCache(self.registry, on_endpoint=self._seen)
        await self.endpoints.start()
        stack.push_async_callback(self.endpoints.stop)
        self.tunnel = await self._detect_tunnel()
        # What the first connection would pay otherwise: message layouts, and a look at every
        # namespace that exists now (a restart's pods are then found with one stat each).
        self.netlink.warm()
        self.netns.prime()
        # Nothing is deleted: the kernel keeps carrying the traffic of live connections.
        found = await self.leftovers.take()
        if found:
            self.log.warning("found the datapath of connections an earlier run of this forwarder "
                             "left: adopting each when it is requested again, removing the rest "
                             "after the grace period", connections=len(found),
                             grace=self.leftovers.grace,
                             links=",".join(sorted(n for lo in found for n in lo.links)))

    async def serving(self, stack: contextlib.AsyncExitStack) -> None:
        assert self._registry_channel is not None
        refresher = NseRefresher(self.registry, self.registration(),
                                 expiry=self.expiry)
        await refresher.start()
        stack.push_async_callback(refresher.stop)
        self.leftovers.start()  # the grace period: from now on connections can claim theirs
        stack.push_async_callback(self.leftovers.stop)
        self.log.info("forwarder serving", urls=",".join(map(str, self.server.urls)),
                      manager=self.manager_url, node=self.node,
                      tunnel=f"{self.tunnel.ip} dev {self.tunnel.dev} mtu {self.tunnel.mtu}"
                      if self.tunnel else "none")

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

    def registration(self) -> NetworkServiceEndpoint:
        labels = {MANAGER_URL_LABEL: self.manager_url, NODE_LABEL: self.node, "p2p": "true"}
        return NetworkServiceEndpoint(
            name=self.name, network_service_names=[FORWARDER_SERVICE],
            network_service_labels={FORWARDER_SERVICE: NetworkServiceLabels(labels=labels)},
            url=str(self.server.urls[0]))


def node_of(nse: NetworkServiceEndpoint, service: str) -> str:
    """The node an endpoint runs on, from its ``nodeName`` label (the service's labels first)."""
    node = service_labels(nse, service).get(NODE_LABEL, "")
    if node:
        return node
    for labels in nse.network_service_labels.values():
        if labels.labels.get(NODE_LABEL):
            return labels.labels[NODE_LABEL]
    return ""


def to_endpoint(ctx: Ctx) -> bool:
    """Whether the connection's next hop is its endpoint (a KERNEL link downstream), not
    another node's manager."""
    pair = ctx.meta.get(PAIR)
    return pair is not None and pair[1] == KERNEL

"""The KERNEL/LOCAL datapath: one veth pair, one end in the client's namespace and one in the
endpoint's, named by each side's mechanism, with MTU, addresses and routes from the IP context.

- Checked before anything downstream is built: the client's namespace exists, its interface
  name is valid and free.
- A refresh with the same parameters changes nothing in the kernel.
- Nothing of the pair is on the node, so it outlives a restart of the forwarder. Both ends carry
  the connection's aliases (``nsm-client-<id>``, ``nsm-server-<id>``): the first Request of the
  connection after a restart adopts the pair when it is exactly what the Request wants (ends,
  MTU, up, addresses, routes: no kernel change, same ifindexes), else deletes and builds it
  again; a Close of it before that deletes it (:meth:`KernelLocal.leftover`).
- If programming fails, the pair is deleted and the downstream connection closed before the
  error returns: nothing half-built remains.
- Close deletes the pair (one end takes the other with it) while the Close travels on.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
from dataclasses import dataclass

from nsm.api.connection_pb2 import Connection, Mechanism
from nsm.api.networkservice_pb2 import NetworkServiceRequest
from nsm.chain import Ctx, Key, NextClose, NextRequest
from nsm.errors import AlreadyExists, InvalidArgument, NsmError
from nsm.forwarder.mechanism import UPSTREAM, Datapath, answered, close_downstream
from nsm.kernel.netlink import LinkInfo, Netlink
from nsm.kernel.netns import NetnsFinder
from nsm.mechanisms import (
    KERNEL,
    LOCAL,
    NAME,
    NETNS_INODE_URL,
    validate_ifname,
)

DEFAULT_MTU = 1500


@dataclass(frozen=True)
class _Side:
    netns: str
    ifname: str
    addresses: tuple[str, ...]
    routes: tuple[tuple[str, str | None], ...]


@dataclass(frozen=True)
class _Programmed:
    client: _Side
    endpoint: _Side
    mtu: int


_STATE: Key[_Programmed] = Key("kernel.programmed")


def alias_for(role: str, conn_id: str) -> str:
    return f"nsm-{role}-{conn_id}"


def default_ifname(conn_id: str) -> str:
    return "nsm" + hashlib.sha256(conn_id.encode()).hexdigest()[:12]


def is_kernel_local(m: Mechanism | None) -> bool:
    return m is not None and m.cls == LOCAL and m.type == KERNEL


class KernelLocal(Datapath):
    """KERNEL upstream, KERNEL downstream: one veth between two pods of this node."""

    pair = (KERNEL, KERNEL)

    def __init__(self, netlink: Netlink, *, default_mtu: int = DEFAULT_MTU,
                 finder: NetnsFinder | None = None) -> None:
        self.netlink = netlink
        self.default_mtu = default_mtu
        self.finder = finder or NetnsFinder()

    def _client_side(self, ctx: Ctx, up: Mechanism) -> tuple[str, str]:
        url = up.parameters.get(NETNS_INODE_URL, "")
        if not url:
            raise InvalidArgument(f"KERNEL mechanism has no {NETNS_INODE_URL} parameter")
        netns = self.finder.resolve(url)
        ifname = validate_ifname(up.parameters.get(NAME) or default_ifname(ctx.conn_id),
                                 "client interface name")
        return netns, ifname

    async def request(self, ctx: Ctx, request: NetworkServiceRequest, next: NextRequest) -> Connection:
        up = ctx.meta.get(UPSTREAM)
        if not self.mine(ctx) or up is None:
            return await next(ctx, request)  # another kind of link (see vxlan.py)
        client_ns, client_if = self._client_side(ctx, up)
        state = ctx.meta.get(_STATE)
        # A first Request: whether the client's interface name is free is looked up while the
        # endpoint answers (a conflict then closes what the endpoint did), not before.
        check = (asyncio.ensure_future(self._free_or_ours(ctx, client_ns, client_if))
                 if state is None else None)
        try:
            conn = await next(ctx, request)
        except BaseException:
            if check is not None:
                check.cancel()
                await asyncio.gather(check, return_exceptions=True)
            raise
        try:
            # The pair an earlier run of this forwarder built for this connection, if any.
            left = await check if check is not None else None
            down = answered(conn, LOCAL, KERNEL, "endpoint")
            nse_ns = self.finder.resolve(down.parameters.get(NETNS_INODE_URL, ""))
            nse_if = validate_ifname(down.parameters.get(NAME, ""), "endpoint interface name")
            ip = conn.context.ip_context
            mtu = conn.context.MTU or self.default_mtu
            want = _Programmed(
                client=_Side(client_ns, client_if, tuple(ip.src_ip_addrs),
                             tuple((r.prefix, r.nextHop or None) for r in ip.src_routes)),
                endpoint=_Side(nse_ns, nse_if, tuple(ip.dst_ip_addrs),
                               tuple((r.prefix, r.nextHop or None) for r in ip.dst_routes)),
                mtu=mtu,
            )
            if state == want:
                return conn  # refresh: the kernel already has exactly this
            if state is not None:
                await self._delete(state)
                ctx.meta.pop(_STATE)
            if left is not None:
                why = await self._mismatch(ctx, want, left)
                if why is None:
                    ctx.log.info("adopted the veth an earlier run of this forwarder built",
                                 client=want.client.ifname, endpoint=want.endpoint.ifname)
                    ctx.meta.set(_STATE, want)
                    return conn
                ctx.log.info("rebuilding the veth an earlier run of this forwarder built",
                             reason=why, client=want.client.ifname)
                await self.netlink.delete_link(client_ns, client_if)
            await self._program(ctx, want)
            ctx.meta.set(_STATE, want)
            return conn
        except BaseException as exc:
            if state is None:  # a failed first request leaves nothing behind anywhere
                await close_downstream(self, ctx, conn, exc)
            raise

    async def _free_or_ours(self, ctx: Ctx, netns: str, ifname: str) -> LinkInfo | None:
        """The client's interface when an earlier run of this forwarder built it for this
        connection; None when the name is free; AlreadyExists when anything else holds it."""
        existing = await self.netlink.link(netns, ifname)
        if existing is not None and existing.alias != alias_for("client", ctx.conn_id):
            raise AlreadyExists(f"interface {ifname} already exists in {netns}")
        return existing

    async def _mismatch(self, ctx: Ctx, want: _Programmed, mine: LinkInfo) -> str | None:
        """Why the pair whose client end is ``mine`` is not exactly ``want`` (None: it is)."""
        c, e = want.client, want.endpoint
        try:
            peer = await self.netlink.link(e.netns, e.ifname)
        except NsmError:
            peer = None
        if (peer is None or peer.alias != alias_for("server", ctx.conn_id)
                or peer.link != mine.index or mine.link != peer.index):
            return f"{e.ifname} in {e.netns} is not its other end"
        for side, link in ((c, mine), (e, peer)):
            if link.mtu != want.mtu or not link.admin_up:
                return f"{link.name} is down or has MTU {link.mtu}, not {want.mtu}"
            have = {ipaddress.ip_interface(a) for a in await self.netlink.addresses(side.netns,
                                                                                    side.ifname)}
            if {a for a in have if not a.ip.is_link_local} != {ipaddress.ip_interface(a)
                                                                for a in side.addresses}:
                return f"the addresses of {side.ifname} differ"
            routes = {(ipaddress.ip_network(r.dst), r.gateway)
                      for r in await self.netlink.routes(side.netns, dev=side.ifname)}
            if not {(ipaddress.ip_network(p), nh) for p, nh in side.routes} <= routes:
                return f"routes via {side.ifname} are missing"
        return None

    async def leftover(self, ctx: Ctx, conn: Connection) -> tuple[str, str] | None:
        """The client end (namespace, name) of the veth an earlier run of this forwarder built
        for ``conn`` (its mechanism is the client's), if it is still there."""
        if not is_kernel_local(conn.mechanism):
            return None
        try:
            netns, ifname = self._client_side(ctx, conn.mechanism)
            link = await self.netlink.link(netns, ifname)
        except NsmError:
            return None
        if link is None or link.alias != alias_for("client", ctx.conn_id):
            return None
        return netns, ifname

    async def _program(self, ctx: Ctx, want: _Programmed) -> None:
        c, e = want.client, want.endpoint
        await self.netlink.create_veth(c.ifname, c.netns, e.ifname, e.netns, mtu=want.mtu)
        try:
            await asyncio.gather(
                self.netlink.setup_interface(c.netns, c.ifname, addresses=list(c.addresses),
                                             routes=list(c.routes), mtu=want.mtu,
                                             alias=alias_for("client", ctx.conn_id)),
                self.netlink.setup_interface(e.netns, e.ifname, addresses=list(e.addresses),
                                             routes=list(e.routes), mtu=want.mtu,
                                             alias=alias_for("server", ctx.conn_id)),
            )
            ready = await asyncio.gather(self.netlink.wait_ready(c.netns, c.ifname),
                                         self.netlink.wait_ready(e.netns, e.ifname))
            if not all(ready):
                ctx.log.warning("link not reported up by the kernel yet", client=c.ifname,
                                endpoint=e.ifname)
        except BaseException:
            await asyncio.shield(self._delete(want))
            raise

    async def _delete(self, state: _Programmed) -> None:
        # Deleting one end removes both; the endpoint's end if the client's namespace is gone.
        if not await self.netlink.delete_link(state.client.netns, state.client.ifname):
            await self.netlink.delete_link(state.endpoint.netns, state.endpoint.ifname)

    async def close(self, ctx: Ctx, conn: Connection, next: NextClose) -> None:
        state = ctx.meta.pop(_STATE)
        if state is None:
            await next(ctx, conn)
            return
        results = await asyncio.gather(next(ctx, conn), asyncio.shield(self._delete(state)),
                                       return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

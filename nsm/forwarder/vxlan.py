"""The VXLAN/REMOTE datapath: one half of a connection between two nodes, on each node.

Per connection, in the node's namespace (the forwarder's own):

- a veth pair: the pod's end (named by the pod-side mechanism) in the pod's namespace, the other
  end ``nsv…`` on the node;
- a VXLAN device ``nsx…`` (VNI of the connection, UDP 4789 set explicitly, local = this node's
  tunnel address, remote = the other node's), MTU = underlay MTU - 50 (IPv4) / 70 (IPv6);
- ETHERNET payload: a bridge ``nsb…`` joining the veth's node end and the VXLAN device (L2: ARP
  crosses the nodes);
- IP payload: routed. A policy table of the connection, chosen by ``iif`` rules from both devices,
  holds the pod's addresses via the veth and a default route via the VXLAN device to a link-local
  next hop whose MAC is the remote tunnel device's (exchanged in the mechanism parameters); the pod
  gets permanent neighbour entries for its peers, so no ARP crosses the tunnel.

Both pod interfaces get the tunnel MTU (carried in the connection context), so full-size packets
pass and larger ones are refused at the sender (EMSGSIZE / fragmentation needed), never dropped
silently in the tunnel.

The client side (the forwarder of the client's node) proposes a VNI free on its node; the server
side accepts it if it is free on its node too, else answers ALREADY_EXISTS and the client side
retries with another. A VNI is unique per node (Linux demultiplexes a shared VXLAN socket by VNI).
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import random
from dataclasses import dataclass

from nsm.addresses import check_ip, check_ip_context
from nsm.api.connection_pb2 import Connection, Mechanism
from nsm.api.networkservice_pb2 import NetworkServiceRequest
from nsm.chain import Ctx, Key, NextClose, NextRequest
from nsm.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NsmError,
    ResourceExhausted,
    VniConflict,
)
from nsm.forwarder.kernel import alias_for, is_kernel_local
from nsm.forwarder.mechanism import UPSTREAM, Datapath
from nsm.kernel.netlink import Netlink
from nsm.mechanisms import (
    DST_IP,
    DST_MAC,
    KERNEL,
    MTU,
    NAME,
    NETNS_INODE_URL,
    PAYLOAD_ETHERNET,
    REMOTE,
    SRC_IP,
    SRC_MAC,
    VNI,
    VXLAN,
    VXLAN_PORT,
    existing_netns_path,
    validate_ifname,
)

VNI_MIN, VNI_MAX = 4096, (1 << 24) - 1
RULE_PRIORITY = 1000
GATEWAY_V4 = "169.254.0.1"
GATEWAY_V6 = "fe80::1"
NODE_ALIAS_PREFIX = "nsm-node:"
FORWARDING_SYSCTL = {4: "net.ipv4.ip_forward", 6: "net.ipv6.conf.all.forwarding"}


def is_vxlan(m: Mechanism | None) -> bool:
    return m is not None and m.cls == REMOTE and m.type == VXLAN


def mac_for(role: str, conn_id: str) -> str:
    """A stable, locally administered unicast MAC for one device of a connection."""
    raw = bytearray(hashlib.sha256(f"{role}:{conn_id}".encode()).digest()[:6])
    raw[0] = (raw[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in raw)


def node_alias(owner: str, conn_id: str) -> str:
    """The alias of a connection's veth end on the node: names the forwarder that built it, so
    that a restarted forwarder finds what it left (:func:`sweep_leftovers`)."""
    return f"{NODE_ALIAS_PREFIX}{owner}:{conn_id}"


def names_for(conn_id: str) -> tuple[str, str, str]:
    h = hashlib.sha256(conn_id.encode()).hexdigest()[:11]
    return f"nsv{h}", f"nsx{h}", f"nsb{h}"


class VniPool:
    """The VNIs in use on this node, by connection."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._owner: dict[int, str] = {}
        self._rng = rng or random.Random()

    def allocate(self, owner: str) -> int:
        for _ in range(64):
            vni = self._rng.randint(VNI_MIN, VNI_MAX)
            if vni not in self._owner:
                self._owner[vni] = owner
                return vni
        raise ResourceExhausted("no free VNI")

    def reserve(self, vni: int, owner: str) -> None:
        held = self._owner.get(vni)
        if held is not None and held != owner:
            raise VniConflict(f"VNI {vni} is in use on this node")
        self._owner[vni] = owner

    def release(self, vni: int, owner: str) -> None:
        if self._owner.get(vni) == owner:
            del self._owner[vni]

    def __len__(self) -> int:
        return len(self._owner)


class TablePool:
    """Routing table ids for routed connections."""

    def __init__(self, first: int = 0x4E530000, size: int = 1 << 16) -> None:
        self._first, self._size = first, size
        self._free: list[int] = []
        self._used: set[int] = set()
        self._next = 0

    def allocate(self) -> int:
        if self._free:
            table = self._free.pop()
        elif self._next >= self._size:
            raise ResourceExhausted("no free routing table")
        else:
            self._next += 1
            table = self._first + self._next - 1
        self._used.add(table)
        return table

    def release(self, table: int) -> None:
        """Give ``table`` back; a second release of the same table is a no-op (two connections
        must never share a table)."""
        if table in self._used:
            self._used.remove(table)
            self._free.append(table)

    def __len__(self) -> int:
        return len(self._used)

    def owns(self, table: int) -> bool:
        """Whether ``table`` is in this pool's range."""
        return self._first <= table < self._first + self._size


@dataclass(frozen=True)
class Tunnel:
    """This node's tunnel endpoint."""

    ip: str
    dev: str | None  # underlay device, when known
    mtu: int  # MTU of connections over it (underlay minus overhead)


@dataclass(frozen=True)
class _Half:
    """What one forwarder built for one connection."""

    pod_ns: str
    pod_if: str
    veth: str
    vxlan: str
    bridge: str | None
    table: int | None
    vni: int
    remote: str
    remote_mac: str
    payload: str
    mtu: int
    pod_addrs: tuple[str, ...]
    pod_routes: tuple[tuple[str, str | None], ...]
    peer_addrs: tuple[str, ...]


_HALF: Key[_Half] = Key("vxlan.half")
_VNI: Key[int] = Key("vxlan.vni")


def _ip_of(cidr: str) -> str:
    return str(ipaddress.ip_interface(cidr).ip)


def _check_ip(value: str, what: str) -> str:
    return str(check_ip(value, f"VXLAN {what}"))


def _check_vni(value: str) -> int:
    try:
        vni = int(value)
    except ValueError:
        raise InvalidArgument(f"VXLAN VNI {value!r} is not a number") from None
    if not 1 <= vni <= VNI_MAX:
        raise InvalidArgument(f"VXLAN VNI {vni} is out of range 1..{VNI_MAX}")
    return vni


class _Datapath:
    """Builds and removes one half; shared by the client and the server side."""

    def __init__(self, netlink: Netlink, tunnel: Tunnel, tables: TablePool, owner: str) -> None:
        self.netlink = netlink
        self.tunnel = tunnel
        self.tables = tables
        self.owner = owner

    async def build(self, ctx: Ctx, half: _Half) -> None:
        nl, conn_id = self.netlink, ctx.conn_id
        pod_mac, veth_mac, vx_mac = (mac_for("pod", conn_id), mac_for("veth", conn_id),
                                     mac_for("vxlan", conn_id))
        await nl.create_veth(half.pod_if, half.pod_ns, half.veth, None, mtu=half.mtu,
                             mac=pod_mac, peer_mac=veth_mac,
                             alias=alias_for("pod", conn_id), peer_alias=node_alias(self.owner, conn_id))
        try:
            await nl.create_vxlan(half.vxlan, None, vni=half.vni, local=self.tunnel.ip,
                                  remote=half.remote, port=VXLAN_PORT, underlay=self.tunnel.dev,
                                  mtu=half.mtu, mac=vx_mac, learning=False)
            await nl.setup_interface(half.pod_ns, half.pod_if, addresses=list(half.pod_addrs),
                                     routes=list(half.pod_routes), mtu=half.mtu)
            if half.payload == PAYLOAD_ETHERNET:
                assert half.bridge is not None
                await nl.create_bridge(half.bridge, None, mtu=half.mtu)
                await nl.set_master(None, half.veth, half.bridge)
                await nl.set_master(None, half.vxlan, half.bridge)
                await asyncio.gather(nl.set_up(None, half.bridge), nl.set_up(None, half.veth),
                                     nl.set_up(None, half.vxlan))
            else:
                await self._route(half, pod_mac, veth_mac)
            # Answer only once linkwatch has the devices up: earlier packets would be dropped.
            ready = await asyncio.gather(nl.wait_ready(half.pod_ns, half.pod_if),
                                         nl.wait_ready(None, half.veth),
                                         nl.wait_ready(None, half.vxlan))
            if not all(ready):
                ctx.log.warning("tunnel devices not reported up by the kernel yet",
                                pod_if=half.pod_if, vxlan=half.vxlan)
        except BaseException:
            await asyncio.shield(self.remove(half))
            raise

    async def _route(self, half: _Half, pod_mac: str, veth_mac: str) -> None:
        nl = self.netlink
        assert half.table is not None
        await asyncio.gather(nl.set_up(None, half.veth), nl.set_up(None, half.vxlan))
        families = {ipaddress.ip_interface(a).version for a in (*half.pod_addrs, *half.peer_addrs)}
        for version in sorted(families):
            # Without forwarding the kernel drops routed packets silently: refuse instead.
            key = FORWARDING_SYSCTL[version]
            if await nl.sysctl_in_netns(None, key) == "0":
                raise FailedPrecondition(f"IPv{version} forwarding is disabled on this node ({key}=0);"
                                         " routed IP payloads need it")
        for addr in half.pod_addrs:
            ip = _ip_of(addr)
            bits = 32 if ipaddress.ip_address(ip).version == 4 else 128
            await nl.add_route(None, f"{ip}/{bits}", half.veth, table=half.table)
            await nl.neigh_replace(None, half.veth, ip, pod_mac)
        for version in families:
            gateway = GATEWAY_V4 if version == 4 else GATEWAY_V6
            default = "0.0.0.0/0" if version == 4 else "::/0"
            await nl.neigh_replace(None, half.vxlan, gateway, half.remote_mac)
            await nl.add_route(None, default, half.vxlan, gateway=gateway, onlink=True,
                               table=half.table)
        for dev in (half.veth, half.vxlan):
            for version in families:
                await nl.add_rule(None, iif=dev, table=half.table, priority=RULE_PRIORITY,
                                  family=version)
        # The pod reaches its peers through the node end of its veth, without ARP.
        for addr in half.peer_addrs:
            await nl.neigh_replace(half.pod_ns, half.pod_if, _ip_of(addr), veth_mac)

    async def remove(self, half: _Half) -> None:
        nl = self.netlink
        if half.table is not None:
            for dev in (half.veth, half.vxlan):
                for version in (4, 6):
                    await nl.del_rule(None, iif=dev, table=half.table, priority=RULE_PRIORITY,
                                      family=version)
        # The veth's pod end goes with the node end; the pod's namespace may be gone already.
        await asyncio.gather(nl.delete_link(None, half.veth), nl.delete_link(None, half.vxlan))
        if half.bridge is not None:
            await nl.delete_link(None, half.bridge)
        if half.table is not None:
            self.tables.release(half.table)


class _Side(Datapath):
    def __init__(self, netlink: Netlink, tunnel: Tunnel, vnis: VniPool, tables: TablePool,
                 owner: str) -> None:
        self.netlink = netlink
        self.tunnel = tunnel
        self.vnis = vnis
        self.tables = tables
        self.datapath = _Datapath(netlink, tunnel, tables, owner)

    def _half(self, ctx: Ctx, conn: Connection, *, pod_ns: str, pod_if: str, vni: int,
              remote: str, remote_mac: str, mtu: int, client: bool) -> _Half:
        veth, vx, br = names_for(ctx.conn_id)
        ip = conn.context.ip_context
        check_ip_context(ip)  # the endpoint's answer: nothing is built from a malformed one
        mine, theirs = ((ip.src_ip_addrs, ip.dst_ip_addrs) if client
                        else (ip.dst_ip_addrs, ip.src_ip_addrs))
        routes = ip.src_routes if client else ip.dst_routes
        ethernet = conn.payload == PAYLOAD_ETHERNET
        return _Half(pod_ns=pod_ns, pod_if=pod_if, veth=veth, vxlan=vx,
                     bridge=br if ethernet else None, table=None if ethernet else -1, vni=vni,
                     remote=remote, remote_mac=remote_mac, payload=conn.payload or "IP", mtu=mtu,
                     pod_addrs=tuple(mine),
                     pod_routes=tuple((r.prefix, r.nextHop or None) for r in routes),
                     peer_addrs=tuple(theirs))

    async def _program(self, ctx: Ctx, half: _Half) -> _Half:
        if half.table is not None:
            half = _Half(**{**half.__dict__, "table": self.tables.allocate()})
        try:
            await self.datapath.build(ctx, half)
        except BaseException:
            if half.table is not None:
                self.tables.release(half.table)
            raise
        return half

    async def _undo(self, ctx: Ctx, conn: Connection, exc: BaseException) -> None:
        ctx.log.warning("VXLAN datapath failed; closing downstream", error=str(exc))
        try:
            await asyncio.shield(ctx.chain.close_after(self, ctx, conn))
        except (NsmError, OSError) as close_exc:
            ctx.log.warning("downstream close after failure failed", error=str(close_exc))

    async def close(self, ctx: Ctx, conn: Connection, next: NextClose) -> None:
        half = ctx.meta.pop(_HALF)
        vni = ctx.meta.pop(_VNI)
        try:
            if half is None:
                await next(ctx, conn)
                return
            results = await asyncio.gather(next(ctx, conn), self.datapath.remove(half),
                                           return_exceptions=True)
            for r in results:
                if isinstance(r, BaseException):
                    raise r
        finally:
            if vni is not None:
                self.vnis.release(vni, ctx.conn_id)


class VxlanClient(_Side):
    """Client side: the pod's KERNEL mechanism upstream, VXLAN toward a remote manager."""

    pair = (KERNEL, VXLAN)

    async def request(self, ctx: Ctx, request: NetworkServiceRequest, next: NextRequest) -> Connection:
        up = ctx.meta.get(UPSTREAM)
        prefs = request.mechanism_preferences
        if not self.mine(ctx) or up is None or not prefs:
            return await next(ctx, request)
        pod_ns = existing_netns_path(up.parameters.get(NETNS_INODE_URL, ""))
        pod_if = validate_ifname(up.parameters.get(NAME, ""), "client interface name")
        half = ctx.meta.get(_HALF)
        if half is None:
            existing = await self.netlink.link(pod_ns, pod_if)
            if existing is not None:
                raise AlreadyExists(f"interface {pod_if} already exists in {pod_ns}")
        vni = ctx.meta.get(_VNI)
        if vni is None:
            vni = self.vnis.allocate(ctx.conn_id)
            ctx.meta.set(_VNI, vni)
        pref = prefs[0]
        pref.parameters[SRC_IP] = self.tunnel.ip
        pref.parameters[SRC_MAC] = mac_for("vxlan", ctx.conn_id)
        pref.parameters[MTU] = str(self.tunnel.mtu)
        for attempt in range(4):
            pref.parameters[VNI] = str(vni)
            try:
                conn = await next(ctx, request)
                break
            except VniConflict:
                if half is not None or attempt == 3:
                    self._forget_vni(ctx, half)
                    raise
                self.vnis.release(vni, ctx.conn_id)
                vni = self.vnis.allocate(ctx.conn_id)
                ctx.meta.set(_VNI, vni)
            except BaseException:
                self._forget_vni(ctx, half)
                raise
        try:
            down = conn.mechanism
            if not is_vxlan(down):
                raise InvalidArgument(f"remote side answered {down.type}/{down.cls}, not VXLAN")
            remote = _check_ip(down.parameters.get(DST_IP, ""), "remote address")
            remote_mac = down.parameters.get(DST_MAC, "")
            if not remote_mac:
                raise InvalidArgument("remote side gave no tunnel MAC")
            if _check_vni(down.parameters.get(VNI, "")) != vni:
                raise InvalidArgument("remote side changed the VNI")
            mtu = min(conn.context.MTU or self.tunnel.mtu, self.tunnel.mtu)
            conn.context.MTU = mtu
            want = self._half(ctx, conn, pod_ns=pod_ns, pod_if=pod_if, vni=vni, remote=remote,
                              remote_mac=remote_mac, mtu=mtu, client=True)
            if half is not None and _same(half, want):
                return conn
            if half is not None:
                await self.datapath.remove(half)
                ctx.meta.pop(_HALF)
            ctx.meta.set(_HALF, await self._program(ctx, want))
            return conn
        except BaseException as exc:
            if half is None:
                await self._undo(ctx, conn, exc)
                self._forget_vni(ctx, None)
            raise

    def _forget_vni(self, ctx: Ctx, half: _Half | None) -> None:
        if half is None:
            vni = ctx.meta.pop(_VNI)
            if vni is not None:
                self.vnis.release(vni, ctx.conn_id)


class VxlanServer(_Side):
    """Server side: VXLAN from a remote forwarder upstream, KERNEL toward the local endpoint."""

    pair = (VXLAN, KERNEL)

    async def request(self, ctx: Ctx, request: NetworkServiceRequest, next: NextRequest) -> Connection:
        up = ctx.meta.get(UPSTREAM)
        if not self.mine(ctx) or up is None:
            return await next(ctx, request)
        remote = _check_ip(up.parameters.get(SRC_IP, ""), "source address")
        remote_mac = up.parameters.get(SRC_MAC, "")
        if not remote_mac:
            raise InvalidArgument("VXLAN mechanism has no src_mac parameter")
        if ipaddress.ip_address(remote).version != ipaddress.ip_address(self.tunnel.ip).version:
            raise FailedPrecondition(f"tunnel address family of {remote} differs from ours "
                                     f"({self.tunnel.ip})")
        vni = _check_vni(up.parameters.get(VNI, ""))
        half = ctx.meta.get(_HALF)
        previous = ctx.meta.get(_VNI)
        if previous is not None and previous != vni:
            self.vnis.release(previous, ctx.conn_id)
        self.vnis.reserve(vni, ctx.conn_id)
        ctx.meta.set(_VNI, vni)
        try:
            conn = await next(ctx, request)
        except BaseException:
            if half is None:
                ctx.meta.pop(_VNI)
                self.vnis.release(vni, ctx.conn_id)
            raise
        try:
            down = conn.mechanism
            if not is_kernel_local(down):
                raise InvalidArgument(f"endpoint answered {down.type}/{down.cls}, not KERNEL/LOCAL")
            pod_ns = existing_netns_path(down.parameters.get(NETNS_INODE_URL, ""))
            pod_if = validate_ifname(down.parameters.get(NAME, ""), "endpoint interface name")
            offered = int(up.parameters.get(MTU, "0") or 0) or self.tunnel.mtu
            mtu = min(conn.context.MTU or self.tunnel.mtu, self.tunnel.mtu, offered)
            conn.context.MTU = mtu
            want = self._half(ctx, conn, pod_ns=pod_ns, pod_if=pod_if, vni=vni, remote=remote,
                              remote_mac=remote_mac, mtu=mtu, client=False)
            if half is None or not _same(half, want):
                if half is not None:
                    await self.datapath.remove(half)
                    ctx.meta.pop(_HALF)
                ctx.meta.set(_HALF, await self._program(ctx, want))
            up.parameters[DST_IP] = self.tunnel.ip
            up.parameters[DST_MAC] = mac_for("vxlan", ctx.conn_id)
            up.parameters[MTU] = str(mtu)
            return conn
        except BaseException as exc:
            if half is None:
                await self._undo(ctx, conn, exc)
                ctx.meta.pop(_VNI)
                self.vnis.release(vni, ctx.conn_id)
            raise


async def sweep_leftovers(netlink: Netlink, owner: str, tables: TablePool) -> list[str]:
    """Remove what forwarder ``owner`` built in its own namespace before it restarted (its
    connection state is gone, so nobody else will): the veth node ends whose alias names it, the
    VXLAN device and bridge of the same connection (same name suffix) and the policy rules from
    them toward connection tables (their routes go with the devices). A live connection is
    rebuilt at its next refresh. Returns the names of the links removed."""
    prefix = f"{NODE_ALIAS_PREFIX}{owner}:"
    links = await netlink.links(None)
    suffixes = {link.name[3:] for link in links
                if link.name.startswith("nsv") and (link.alias or "").startswith(prefix)}
    doomed = [link.name for link in links
              if link.name[:3] in ("nsv", "nsx", "nsb") and link.name[3:] in suffixes]
    for rule in await netlink.rules(None):
        if rule.iif in doomed and tables.owns(rule.table):
            await netlink.del_rule(None, iif=rule.iif, table=rule.table, priority=rule.priority,
                                   family=rule.family)
    # veth and VXLAN devices first: a bridge goes once its ports have.
    for group in ([n for n in doomed if not n.startswith("nsb")],
                  [n for n in doomed if n.startswith("nsb")]):
        await asyncio.gather(*(netlink.delete_link(None, name) for name in group))
    return doomed


def _same(a: _Half, b: _Half) -> bool:
    """Equal but for the routing table id (allocated when built)."""
    return {**a.__dict__, "table": None} == {**b.__dict__, "table": None}

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

A restart keeps the datapath. The node end of the veth carries the alias
``nsm-node:<forwarder>:<connection id>``; the VXLAN device and the bridge carry
``nsm-half:<forwarder tag>:<digest of the half's parameters>``. At start the forwarder takes an
inventory of what an earlier run of it left (:class:`Leftovers`: the devices, the VNI, the routing
table and the policy rules of each connection) and deletes nothing: the VNIs and tables are
reserved, the kernel keeps carrying the traffic. The first Request of a connection after the
restart (its refresh) *adopts* its half when the kernel holds exactly the half the Request wants
(same devices, peers, VNI, MTU, addresses, rules and routes, and the same parameter digest): no
kernel change, same ifindexes. A half that differs is removed and built again. What no
connection claims within the grace period is removed then (and logged); a Close of a connection
not claimed yet removes its half at once (see :class:`nsm.forwarder.forwarder.Forwarder`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import random
import time
from dataclasses import dataclass, field, replace

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
from nsm.forwarder.kernel import alias_for
from nsm.forwarder.mechanism import UPSTREAM, Datapath, answered, close_downstream
from nsm.kernel.netlink import LinkInfo, Netlink, RuleInfo
from nsm.kernel.netns import NetnsFinder
from nsm.log import Logger
from nsm.mechanisms import (
    DST_IP,
    DST_MAC,
    KERNEL,
    LOCAL,
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
    validate_ifname,
)

VNI_MIN, VNI_MAX = 4096, (1 << 24) - 1
RULE_PRIORITY = 1000
GATEWAY_V4 = "169.254.0.1"
GATEWAY_V6 = "fe80::1"
NODE_ALIAS_PREFIX = "nsm-node:"
HALF_ALIAS_PREFIX = "nsm-half:"
#: How long a restarted forwarder keeps what an earlier run left for the connections to claim.
DEFAULT_ADOPT_GRACE = 60.0
FORWARDING_SYSCTL = {4: "net.ipv4.ip_forward", 6: "net.ipv6.conf.all.forwarding"}


def is_vxlan(m: Mechanism | None) -> bool:
    return m is not None and m.cls == REMOTE and m.type == VXLAN


def mac_for(role: str, conn_id: str) -> str:
    """A stable, locally administered unicast MAC for one device of a connection."""
    raw = bytearray(hashlib.sha256(f"{role}:{conn_id}".encode()).digest()[:6])
    raw[0] = (raw[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in raw)


def node_alias(owner: str, conn_id: str) -> str:
    """The alias of a connection's veth end on the node: names the forwarder that built it and
    the connection, so that a restarted forwarder finds what it left (:class:`Leftovers`)."""
    return f"{NODE_ALIAS_PREFIX}{owner}:{conn_id}"


def names_for(conn_id: str) -> tuple[str, str, str]:
    h = hashlib.sha256(conn_id.encode()).hexdigest()[:11]
    return f"nsv{h}", f"nsx{h}", f"nsb{h}"


def _owner_tag(owner: str) -> str:
    return hashlib.sha256(owner.encode()).hexdigest()[:8]


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
        while self._free:
            table = self._free.pop()
            if table not in self._used:
                self._used.add(table)
                return table
        while self._next < self._size:
            table = self._first + self._next
            self._next += 1
            if table not in self._used:  # not reserved for a connection an earlier run left
                self._used.add(table)
                return table
        raise ResourceExhausted("no free routing table")

    def reserve(self, table: int) -> bool:
        """Mark ``table`` used (the table of a connection an earlier run left, so that no new
        connection gets it); False if it is not in this pool's range or already used."""
        if not self.owns(table) or table in self._used:
            return False
        self._used.add(table)
        return True

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


def half_alias(owner: str, half: _Half) -> str:
    """The alias of a half's VXLAN device and bridge: the forwarder that built it (a tag) and a
    digest of every parameter of the half but its routing table (allocated when built), so that
    a restarted forwarder tells whether what it finds is exactly what a Request wants."""
    params = repr(sorted({**half.__dict__, "table": None}.items()))
    return f"{HALF_ALIAS_PREFIX}{_owner_tag(owner)}:{hashlib.sha256(params.encode()).hexdigest()[:16]}"


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


def _families(half: _Half) -> list[int]:
    return sorted({ipaddress.ip_interface(a).version for a in (*half.pod_addrs, *half.peer_addrs)})


# ------------------------------------------------------------------ what an earlier run left


@dataclass
class Leftover:
    """One connection's half as an earlier run of this forwarder left it: its node-side links
    (same name suffix), its VNI (reserved), routing table (reserved) and policy rules."""

    suffix: str
    #: From the veth's alias; None when the veth is gone (a half-removed half).
    conn_id: str | None
    links: dict[str, LinkInfo]
    vni: int | None = None
    table: int | None = None
    rules: list[RuleInfo] = field(default_factory=list)
    deadline: float = 0.0

    @property
    def key(self) -> str:
        """Whom its VNI is reserved for in the :class:`VniPool`: the connection, as a Request
        of it reserves it."""
        return self.conn_id if self.conn_id is not None else f"leftover:{self.suffix}"

    def describe(self) -> dict[str, str]:
        return {"conn": self.conn_id or "?", "links": ",".join(sorted(self.links)),
                "vni": "" if self.vni is None else str(self.vni),
                "table": "" if self.table is None else str(self.table)}


@dataclass(eq=False)
class Leftovers:
    """What an earlier run of forwarder ``owner`` left in its namespace, by connection, until a
    Request of the connection claims it (:meth:`claim`) or the grace period is over.

    :meth:`take` (at start) lists it and reserves its VNIs and routing tables, deleting nothing;
    :meth:`start` (once serving) starts the grace period, after which whatever is still
    unclaimed is removed and logged; :meth:`give_back` returns a claim whose Request failed (its
    grace starts again)."""

    netlink: Netlink
    owner: str
    vnis: VniPool
    tables: TablePool
    grace: float = field(kw_only=True)
    log: Logger = field(kw_only=True)
    _items: dict[str, Leftover] = field(init=False, default_factory=dict)
    _wake: asyncio.Event = field(init=False, default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = field(init=False, default=None)

    def __len__(self) -> int:
        return len(self._items)

    async def take(self) -> list[Leftover]:
        """The inventory: the veth node ends whose alias names this forwarder, and the links of
        the same name suffix (the VXLAN device and the bridge, also by their ``nsm-half`` alias
        when the veth is gone); the rules from them toward a table of the pool."""
        veth_prefix = f"{NODE_ALIAS_PREFIX}{self.owner}:"
        half_prefix = f"{HALF_ALIAS_PREFIX}{_owner_tag(self.owner)}:"
        links = [link for link in await self.netlink.links(None)
                 if link.name[:3] in ("nsv", "nsx", "nsb") and len(link.name) > 3]
        found: dict[str, Leftover] = {}
        for link in links:
            alias, suffix = link.alias or "", link.name[3:]
            if link.name.startswith("nsv") and alias.startswith(veth_prefix):
                found.setdefault(suffix, Leftover(suffix, None, {})).conn_id = alias[len(veth_prefix):]
            elif alias.startswith(half_prefix):
                found.setdefault(suffix, Leftover(suffix, None, {}))
        for link in links:
            if link.name[3:] in found:
                found[link.name[3:]].links[link.name] = link
        rules = await self.netlink.rules(None) if found else []
        for lo in found.values():
            vx = lo.links.get(f"nsx{lo.suffix}")
            if vx is not None and vx.vxlan_id is not None:
                try:
                    self.vnis.reserve(vx.vxlan_id, lo.key)
                    lo.vni = vx.vxlan_id
                except VniConflict:
                    self.log.warning("two connections an earlier run left use one VNI",
                                     vni=vx.vxlan_id, links=",".join(sorted(lo.links)))
            lo.rules = [r for r in rules if r.iif in lo.links and self.tables.owns(r.table)]
            tables = {r.table for r in lo.rules}
            if len(tables) == 1 and self.tables.reserve(next(iter(tables))):
                lo.table = next(iter(tables))
        self._items.update(found)
        return list(found.values())

    def claim(self, conn_id: str) -> Leftover | None:
        """What an earlier run left for ``conn_id`` (now the caller's to adopt or remove)."""
        return self._items.pop(names_for(conn_id)[0][3:], None)

    def give_back(self, lo: Leftover) -> None:
        """Return a claim that was neither adopted nor removed (its Request failed): kept for
        another grace period, its VNI reserved again."""
        if lo.vni is not None:
            try:
                self.vnis.reserve(lo.vni, lo.key)
            except VniConflict:
                lo.vni = None  # taken by another connection meanwhile: this half cannot be adopted
        lo.deadline = max(lo.deadline, time.monotonic() + self.grace)
        self._items[lo.suffix] = lo
        self._wake.set()

    async def remove(self, lo: Leftover) -> None:
        """Delete a leftover half's rules and links; release its table and VNI."""
        nl = self.netlink
        for rule in lo.rules:
            await nl.del_rule(None, iif=rule.iif or "", table=rule.table, priority=rule.priority,
                              family=rule.family)
        # veth and VXLAN device first: a bridge goes once its ports have.
        for group in ([n for n in lo.links if not n.startswith("nsb")],
                      [n for n in lo.links if n.startswith("nsb")]):
            await asyncio.gather(*(nl.delete_link(None, name) for name in group))
        if lo.table is not None:
            self.tables.release(lo.table)
        if lo.vni is not None:
            self.vnis.release(lo.vni, lo.key)

    def start(self) -> None:
        """Start the grace period (once the forwarder serves: from then on the connections can
        claim what is theirs)."""
        deadline = time.monotonic() + self.grace
        for lo in self._items.values():
            lo.deadline = deadline
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._expire(),
                                                                name=f"leftovers:{self.owner}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _expire(self) -> None:
        while True:
            self._wake.clear()
            now = time.monotonic()
            for lo in [lo for lo in self._items.values() if lo.deadline <= now]:
                del self._items[lo.suffix]
                try:
                    await self.remove(lo)
                except (NsmError, OSError) as exc:
                    self.log.warning("cannot remove what an earlier run left; trying again after "
                                     "another grace period", error=str(exc), **lo.describe())
                    lo.deadline = time.monotonic() + self.grace
                    self._items[lo.suffix] = lo
                    continue
                self.log.warning("removed what an earlier run of this forwarder left: no "
                                 "connection claimed it within the grace period",
                                 grace=self.grace, **lo.describe())
            wait = min((lo.deadline for lo in self._items.values()), default=None)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(),
                                       None if wait is None else max(0.0, wait - time.monotonic()))


# ------------------------------------------------------------------ building a half


class _Datapath:
    """Builds, checks and removes one half; shared by the client and the server side."""

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
            stamp = half_alias(self.owner, half)
            await nl.set_alias(None, half.vxlan, stamp)
            await nl.setup_interface(half.pod_ns, half.pod_if, addresses=list(half.pod_addrs),
                                     routes=list(half.pod_routes), mtu=half.mtu)
            if half.payload == PAYLOAD_ETHERNET:
                assert half.bridge is not None
                await nl.create_bridge(half.bridge, None, mtu=half.mtu)
                await nl.set_alias(None, half.bridge, stamp)
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
        families = _families(half)
        for version in families:
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

    async def mismatch(self, conn_id: str, want: _Half, lo: Leftover) -> str | None:
        """Why what an earlier run left for ``conn_id`` is not exactly the half ``want``, with
        ``lo``'s routing table (None: it is). What can be read back is compared (devices, peers,
        VNI, MTU, up, addresses, rules, routes); the rest (remote address and MAC, routes and
        neighbours in the pod) through the parameter digest in the VXLAN device's alias."""
        nl = self.netlink
        if lo.conn_id != conn_id:
            return "its veth is gone"
        if (want.table is None) != (lo.table is None):
            return "its routing table is missing, or the payload (routed or bridged) differs"
        veth, vx = await asyncio.gather(nl.link(None, want.veth), nl.link(None, want.vxlan))
        bridge = await nl.link(None, want.bridge) if want.bridge else None
        try:
            pod = await nl.link(want.pod_ns, want.pod_if)
        except NsmError:
            pod = None
        if veth is None or veth.kind != "veth" or veth.alias != node_alias(self.owner, conn_id):
            return f"no veth end {want.veth} of this connection"
        if vx is None or vx.kind != "vxlan" or vx.vxlan_id != want.vni or lo.vni != want.vni:
            return f"no VXLAN device {want.vxlan} with VNI {want.vni}"
        if vx.alias != half_alias(self.owner, want):
            return "parameters differ (remote, MTU, addresses, routes or peers)"
        if (pod is None or pod.alias != alias_for("pod", conn_id) or pod.link != veth.index
                or veth.link != pod.index):
            return f"no {want.pod_if} in {want.pod_ns} paired with {want.veth}"
        if want.bridge is not None:
            if (bridge is None or bridge.kind != "bridge" or veth.master != bridge.index
                    or vx.master != bridge.index):
                return f"no bridge {want.bridge} joining {want.veth} and {want.vxlan}"
        elif any(name.startswith("nsb") for name in lo.links):
            return "it has a bridge; the connection is routed"
        for link in (pod, veth, vx, bridge):
            if link is not None and (link.mtu != want.mtu or not link.admin_up):
                return f"{link.name} is down or has MTU {link.mtu}, not {want.mtu}"
        have = {ipaddress.ip_interface(a) for a in await nl.addresses(want.pod_ns, want.pod_if)}
        if {a for a in have if not a.ip.is_link_local} != {ipaddress.ip_interface(a)
                                                            for a in want.pod_addrs}:
            return f"the addresses of {want.pod_if} differ"
        if lo.table is not None:
            return await self._routing_mismatch(want, lo.table, veth, vx)
        return None

    async def _routing_mismatch(self, want: _Half, table: int, veth: LinkInfo,
                                vx: LinkInfo) -> str | None:
        nl = self.netlink
        families = _families(want)
        rules = {(r.family, r.iif) for r in await nl.rules(None)
                 if r.table == table and r.priority == RULE_PRIORITY}
        if not {(v, dev) for v in families for dev in (want.veth, want.vxlan)} <= rules:
            return f"policy rules toward table {table} are missing"
        routes = {(ipaddress.ip_network(r.dst), r.oif, r.gateway)
                  for r in await nl.routes(None, table=table)}
        need = {(ipaddress.ip_network(_ip_of(a)), veth.index, None) for a in want.pod_addrs}
        need |= {(ipaddress.ip_network("0.0.0.0/0" if v == 4 else "::/0"), vx.index,
                  GATEWAY_V4 if v == 4 else GATEWAY_V6) for v in families}
        if not need <= routes:
            return f"routes of table {table} are missing"
        return None

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


_LEFTOVER: Key[Leftover] = Key("vxlan.leftover")


class _Side(Datapath):
    def __init__(self, netlink: Netlink, tunnel: Tunnel, vnis: VniPool, tables: TablePool,
                 owner: str, leftovers: Leftovers, finder: NetnsFinder | None = None) -> None:
        self.netlink = netlink
        self.finder = finder or NetnsFinder()
        self.tunnel = tunnel
        self.vnis = vnis
        self.tables = tables
        self.leftovers = leftovers
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

    def _claim(self, ctx: Ctx) -> Leftover | None:
        """What an earlier run left for this connection (held in its metadata until adopted or
        removed; given back if the first Request fails)."""
        lo = ctx.meta.get(_LEFTOVER)
        if lo is None:
            lo = self.leftovers.claim(ctx.conn_id)
            if lo is not None:
                ctx.meta.set(_LEFTOVER, lo)
        return lo

    def _give_back(self, ctx: Ctx) -> None:
        lo = ctx.meta.pop(_LEFTOVER)
        if lo is not None:
            self.leftovers.give_back(lo)

    async def _install(self, ctx: Ctx, want: _Half) -> _Half:
        """The half ``want``: adopted from what an earlier run left when the kernel holds exactly
        it (nothing changes), else built (after removing what was left)."""
        lo = ctx.meta.get(_LEFTOVER)  # until adopted or removed: given back if this fails
        if lo is not None:
            why = await self.datapath.mismatch(ctx.conn_id, want, lo)
            if why is None:
                ctx.meta.pop(_LEFTOVER)
                ctx.log.info("adopted the datapath an earlier run of this forwarder left",
                             **lo.describe())
                return replace(want, table=lo.table)
            ctx.log.info("rebuilding what an earlier run of this forwarder left", reason=why,
                         **lo.describe())
            await self.leftovers.remove(lo)
            ctx.meta.pop(_LEFTOVER)
            self.vnis.reserve(want.vni, ctx.conn_id)  # it may have been the leftover's too
        return await self._program(ctx, want)

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

    async def _failed(self, ctx: Ctx, conn: Connection, exc: BaseException,
                      half: _Half | None) -> None:
        """A first Request failed after the next hop answered: undo the next hop's part and give
        the VNI back (a refresh that fails keeps what it had)."""
        if half is None:
            await close_downstream(self, ctx, conn, exc, "VXLAN datapath failed")
            self._release_vni(ctx)

    def _release_vni(self, ctx: Ctx) -> None:
        vni = ctx.meta.pop(_VNI)
        if vni is not None:
            self.vnis.release(vni, ctx.conn_id)
        self._give_back(ctx)  # after the release: it reserves the leftover's VNI again

    async def _place(self, ctx: Ctx, half: _Half | None, want: _Half) -> None:
        """Keep the half the kernel holds when it is exactly ``want`` (a refresh, or an adopted
        half); else remove it and build ``want``."""
        if half is not None and _same(half, want):
            return
        if half is not None:
            await self.datapath.remove(half)
            ctx.meta.pop(_HALF)
        ctx.meta.set(_HALF, await self._install(ctx, want))

    async def close(self, ctx: Ctx, conn: Connection, next: NextClose) -> None:
        half = ctx.meta.pop(_HALF)
        vni = ctx.meta.pop(_VNI)
        try:
            if half is None:
                await next(ctx, conn)
                return
            results = await asyncio.gather(next(ctx, conn), asyncio.shield(self.datapath.remove(half)),
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
        pod_ns = self.finder.resolve(up.parameters.get(NETNS_INODE_URL, ""))
        pod_if = validate_ifname(up.parameters.get(NAME, ""), "client interface name")
        half = ctx.meta.get(_HALF)
        lo = self._claim(ctx) if half is None else None
        if half is None:
            existing = await self.netlink.link(pod_ns, pod_if)
            if (existing is not None
                    and not (lo is not None and existing.alias == alias_for("pod", ctx.conn_id))
                    and not await self._replaces(ctx, existing)):
                self._give_back(ctx)
                raise AlreadyExists(f"interface {pod_if} already exists in {pod_ns}")
        vni = ctx.meta.get(_VNI)
        if vni is None:
            # An adopted half keeps its VNI (reserved for it at start), so the other side's
            # half matches too.
            vni = lo.vni if lo is not None and lo.vni is not None else self.vnis.allocate(ctx.conn_id)
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
                    if half is None:
                        self._release_vni(ctx)
                    raise
                self.vnis.release(vni, ctx.conn_id)
                vni = self.vnis.allocate(ctx.conn_id)
                ctx.meta.set(_VNI, vni)
            except BaseException:
                if half is None:
                    self._release_vni(ctx)
                raise
        try:
            down = answered(conn, REMOTE, VXLAN, "remote side")
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
            await self._place(ctx, half, want)
            return conn
        except BaseException as exc:
            await self._failed(ctx, conn, exc, half)
            raise

    async def _replaces(self, ctx: Ctx, existing: LinkInfo) -> bool:
        """Whether ``existing``, the pod interface a new connection wants, is the pod end of
        another connection an earlier run left and none claimed: the client's former connection
        (e.g. one that expired while this forwarder was down, healed by a new one). Its half is
        removed then."""
        prefix = alias_for("pod", "")
        alias = existing.alias or ""
        old = self.leftovers.claim(alias[len(prefix):]) if alias.startswith(prefix) else None
        if old is None:
            return False
        ctx.log.info("removing what an earlier run of this forwarder left for the former "
                     "connection of this interface", interface=existing.name, **old.describe())
        await self.leftovers.remove(old)
        return True


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
        if half is None:
            self._claim(ctx)
        previous = ctx.meta.get(_VNI)
        if previous is not None and previous != vni:
            self.vnis.release(previous, ctx.conn_id)
        try:
            self.vnis.reserve(vni, ctx.conn_id)
        except VniConflict:
            if half is None:
                self._give_back(ctx)
            raise
        ctx.meta.set(_VNI, vni)
        try:
            conn = await next(ctx, request)
        except BaseException:
            if half is None:
                self._release_vni(ctx)
            raise
        try:
            down = answered(conn, LOCAL, KERNEL, "endpoint")
            pod_ns = self.finder.resolve(down.parameters.get(NETNS_INODE_URL, ""))
            pod_if = validate_ifname(down.parameters.get(NAME, ""), "endpoint interface name")
            offered = int(up.parameters.get(MTU, "0") or 0) or self.tunnel.mtu
            mtu = min(conn.context.MTU or self.tunnel.mtu, self.tunnel.mtu, offered)
            conn.context.MTU = mtu
            want = self._half(ctx, conn, pod_ns=pod_ns, pod_if=pod_if, vni=vni, remote=remote,
                              remote_mac=remote_mac, mtu=mtu, client=False)
            await self._place(ctx, half, want)
            up.parameters[DST_IP] = self.tunnel.ip
            up.parameters[DST_MAC] = mac_for("vxlan", ctx.conn_id)
            up.parameters[MTU] = str(mtu)
            return conn
        except BaseException as exc:
            await self._failed(ctx, conn, exc, half)
            raise


def _same(a: _Half, b: _Half) -> bool:
    """Equal but for the routing table id (allocated when built)."""
    return {**a.__dict__, "table": None} == {**b.__dict__, "table": None}

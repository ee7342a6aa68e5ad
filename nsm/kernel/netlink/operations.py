"""Netlink operations: what the forwarder, the lab and the tests do to the kernel.

:class:`Netlink` is one per daemon process. Every operation takes the namespace it acts in
(``None``, a path, a ``file://`` URL or a name, see :class:`Netlink`), gets that namespace's socket
from :class:`~nsm.kernel.netlink.sockets.Sockets`, builds its messages with
:mod:`nsm.kernel.netlink.messages` and turns the kernel's errors into domain errors. The work for
one interface (MTU + up, addresses, routes) goes to the kernel as **one datagram**
(:meth:`Netlink.setup_interface`), and the kernel answers each part. Adds are idempotent (replace
semantics), deletes answer False when there was nothing to delete.

Measured here (kernel 6.18, 2 vCPU; ``python -m bench.netlink_floor``; median):

============================================================  ==========
create a veth, ends in two namespaces (one RTM_NEWLINK)       0.45 ms
setup_interface: MTU + up + 1 address + 1 route, one batch    0.30 ms
per extra address / route in the same batch                   +0.04 ms
link(ns, name) (RTM_GETLINK + parse)                          0.25 ms
wait_ready of both ends of a new veth (4 ioctls; load avg 8)  0.25 ms
delete a veth (kernel time, off the event loop)               16-40 ms
one local connection: veth + both ends set up, sequential     1.2 ms
same, 20 at a time (per connection, throughput)               0.8 ms
============================================================  ==========

**A new veth is ready in milliseconds.** The kernel's link watcher (``net/core/link_watch.c``)
applies a carrier change -- operstate, hence ``IFF_RUNNING``, and the queueing discipline of an
end brought up before its peer -- from a work item that runs at once for *urgent* events and
otherwise at most once a second. ``linkwatch_urgent_event`` calls an event urgent when the link's
index differs from its ``iflink``, which for a veth is the *peer's* index. The kernel numbers links
per namespace, so the two ends of a veth between two fresh namespaces (a pod's, say) both get
index 2: the carrier-on of the end brought up last was then applied up to a second late (measured:
~1 s for the first connection after the daemons start). Two things make every new link ready in
milliseconds:

- :meth:`Netlink.create_veth` gives the two ends different indexes (``ifi_index`` of the link and
  of the peer, both chosen at random among the free ones above :data:`VETH_INDEX_FIRST`, chosen
  again if one got taken meanwhile): both ends' carrier changes are urgent.
- :meth:`Netlink.wait_ready` first makes the kernel apply the link's pending link-watch work
  (``linkwatch_sync_dev``: operstate, then the queueing discipline, under RTNL; through the
  ``ETHTOOL_GLINK`` ioctl, as ``RTM_GETLINK`` would at ten times the cost), then reads
  ``IFF_RUNNING``. ``IFF_RUNNING`` alone is also set for a device whose state the link watcher
  has not evaluated yet (operstate UNKNOWN): the end brought up first then looked ready while its
  queueing discipline still dropped packets until the link watcher ran (measured under load: in
  11% of new veths, the end was still UNKNOWN right after ``IFF_RUNNING`` was seen).
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import re
import socket
import time
from collections.abc import Sequence
from typing import Any

from pyroute2.netlink import NLM_F_REQUEST
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import (
    RTM_DELADDR,
    RTM_DELLINK,
    RTM_DELROUTE,
    RTM_DELRULE,
    RTM_GETADDR,
    RTM_GETLINK,
    RTM_GETROUTE,
    RTM_GETRULE,
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTM_NEWNEIGH,
    RTM_NEWROUTE,
    RTM_NEWRULE,
)
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg

from nsm.errors import AlreadyExists, InvalidArgument, NotFound
from nsm.kernel import netns as _netns
from nsm.kernel.netlink import messages as m
from nsm.kernel.netlink.messages import MAIN_TABLE, LinkInfo, Route, RouteInfo, RuleInfo
from nsm.kernel.netlink.sockets import Handle, Sockets, netns_key
from nsm.mechanisms import validate_ifname

__all__ = ["VETH_INDEX_FIRST", "Netlink"]

_SYSCTL_KEY = re.compile(r"^net[./][A-Za-z0-9_./\-]+$")

#: The two ends of a new veth get different interface indexes in [first, first + span): far above
#: the kernel's own numbering (counting up from 1 in each namespace), few enough to keep the
#: kernel's index tree small.
VETH_INDEX_FIRST, VETH_INDEX_SPAN = 1 << 20, 1 << 20
#: Attempts to create a veth when a chosen index got taken between the check and the request.
_VETH_INDEX_TRIES = 8


class Netlink:
    """Kernel networking for one daemon process, namespace by namespace (see module docstring).

    ``netns`` arguments are ``None`` (the daemon's own namespace), an absolute path
    (``/var/run/netns/x``, ``/proc/PID/ns/net``), a ``file://`` inode URL, or a bare name under
    ``/var/run/netns``. Use one instance from one event loop; ``await close()`` at the end.
    """

    def __init__(self, *, timeout: float = 10.0, prune_interval: float = 2.0,
                 max_sockets: int = 1024, delete_workers: int = 2,
                 idle_timeout: float = 30.0) -> None:
        self._sockets = Sockets(timeout=timeout, prune_interval=prune_interval,
                                max_sockets=max_sockets, delete_workers=delete_workers,
                                idle_timeout=idle_timeout)
        self._use = self._sockets.use
        self._random = random.Random()

    # ------------------------------------------------------------------ sockets

    def prune(self) -> int:
        """Close the sockets of namespaces that no longer exist (so the kernel can destroy them)
        and those of other namespaces idle for ``idle_timeout`` s, and drop stray answers.
        Returns how many sockets were closed."""
        return self._sockets.prune()

    def forget(self, netns: str | None) -> bool:
        """Close the cached socket of ``netns`` now (once its in-flight requests end)."""
        return self._sockets.forget(netns)

    def cached(self) -> list[str | None]:
        """Namespaces with an open socket (for tests and diagnostics)."""
        return self._sockets.cached()

    def warm(self) -> None:
        """Prepare, at a daemon's start, what the first connection would otherwise pay for:
        pyroute2's layout of each kind of message (:func:`~nsm.kernel.netlink.messages.warm`;
        nothing is sent)."""
        m.warm()

    async def close(self) -> None:
        """Close every socket and the worker threads. Idempotent."""
        await self._sockets.close()

    async def __aenter__(self) -> Netlink:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ links

    async def index(self, netns: str | None, name: str) -> int | None:
        """The interface's index, or None if it does not exist (no round trip)."""
        async with self._use(netns) as h:
            return h.index(validate_ifname(name))

    async def create_veth(self, name: str, netns: str | None, peer_name: str,
                          peer_netns: str | None, *, mtu: int | None = None,
                          alias: str | None = None, peer_alias: str | None = None,
                          mac: str | None = None, peer_mac: str | None = None) -> None:
        """Create a veth pair with ``name`` in ``netns`` and ``peer_name`` in ``peer_netns``, each
        end created directly in its namespace (down). AlreadyExists, with nothing created, if
        either name is taken in its namespace."""
        validate_ifname(name)
        validate_ifname(peer_name, "peer interface name")
        if mtu is not None:
            m.mtu(mtu)
        key, peer_key = netns_key(netns), netns_key(peer_netns)
        if key == peer_key and name == peer_name:
            raise InvalidArgument(f"veth ends cannot both be named {name} in {m.where(key)}")
        what = (f"create veth {name} in {m.where(key)} with peer {peer_name} in "
                f"{m.where(peer_key)}")
        async with self._use(key) as h, self._use(peer_key) as ph:
            for attempt in range(_VETH_INDEX_TRIES):
                index, peer_index = self._veth_indexes(h, ph)
                msg = m.veth_msg(name, peer_name, index=index, peer_index=peer_index,
                                 peer_ns_fd=ph.ns_fd if peer_key != key else None, mtu=mtu,
                                 mac_addr=mac, peer_mac=peer_mac)
                (res,) = await self._sockets.batch(h, [(msg, RTM_NEWLINK, m.CREATE)], what)
                if not isinstance(res, NetlinkError) or attempt + 1 == _VETH_INDEX_TRIES:
                    break
                # An index taken since the check (the kernel answers EEXIST for the link's, as it
                # finds that link by index, and EBUSY for the peer's): again with others.
                names_free = h.index(name) is None and ph.index(peer_name) is None
                if not ((res.code == errno.EEXIST and names_free and h.index_taken(index))
                        or (res.code == errno.EBUSY and ph.index_taken(peer_index))):
                    break
            if isinstance(res, NetlinkError):
                if res.code == errno.EEXIST:
                    taken = [f"{n} exists in {hh.where}" for n, hh in ((name, h), (peer_name, ph))
                             if hh.index(n) is not None]
                    raise AlreadyExists(f"{what}: {'; '.join(taken) or 'name taken'}")
                raise m.domain_error(res, what)
            try:
                if alias is not None or peer_alias is not None:
                    await asyncio.gather(
                        *(self._set_link(hh, n, a, "set alias", alias=a)
                          for hh, n, a in ((h, name, alias), (ph, peer_name, peer_alias))
                          if a is not None))
            except BaseException:
                await self._delete(h, name)  # the peer goes with it
                raise

    def _veth_indexes(self, h: Handle, ph: Handle) -> tuple[int, int]:
        """Indexes for the two ends of a new veth (in ``h``'s and ``ph``'s namespace): different
        from each other (see the module docstring) and free now."""
        while True:
            index, peer_index = (VETH_INDEX_FIRST + self._random.randrange(VETH_INDEX_SPAN)
                                 for _ in range(2))
            if index != peer_index and not h.index_taken(index) \
                    and not ph.index_taken(peer_index):
                return index, peer_index

    async def create_vxlan(self, name: str, netns: str | None, *, vni: int, local: str,
                           remote: str | None, port: int = 4789, underlay: str | None = None,
                           mtu: int | None = None, learning: bool = True,
                           mac: str | None = None) -> None:
        """Create a VXLAN device (down). ``remote=None`` makes it FDB-driven (see
        :meth:`fdb_append`). ``underlay`` is the device the tunnel runs over."""
        validate_ifname(name)
        data = m.vxlan_data(vni=vni, local=local, remote=remote, port=port, learning=learning)
        key = netns_key(netns)
        what = f"create vxlan {name} (vni {vni}) in {m.where(key)}"
        async with self._use(key) as h:
            underlay_index = None if underlay is None else h.need_index(underlay)
            msg = m.vxlan_msg(name, data, underlay_index=underlay_index,
                              mtu=None if mtu is None else m.mtu(mtu), mac_addr=mac)
            await self._sockets.one(h, msg, RTM_NEWLINK, m.CREATE, what)

    async def create_bridge(self, name: str, netns: str | None, mtu: int | None = None) -> None:
        """Create a Linux bridge (down)."""
        validate_ifname(name)
        key = netns_key(netns)
        async with self._use(key) as h:
            msg = m.bridge_msg(name, None if mtu is None else m.mtu(mtu))
            await self._sockets.one(h, msg, RTM_NEWLINK, m.CREATE,
                                    f"create bridge {name} in {m.where(key)}")

    async def link(self, netns: str | None, name: str) -> LinkInfo | None:
        """The link, or None if there is no such interface (NotFound if no such namespace)."""
        validate_ifname(name)
        async with self._use(netns) as h:
            if h.index(name) is None:  # an ioctl: no round trip for a missing link
                return None
            res = await self._sockets.one(h, m.get_link_msg(name), RTM_GETLINK, NLM_F_REQUEST,
                                          f"get {name} in {h.where}", ok=(errno.ENODEV,))
            return m.link_info(res[0]) if res else None

    async def wait_ready(self, netns: str | None, name: str, timeout: float = 1.0) -> bool:
        """Wait until the kernel's link watcher has brought the link up: running (operstate UP,
        or UNKNOWN for a device without carrier changes) and its queueing discipline attached, so
        that the first packets are not dropped; False if it did not within ``timeout``. Each check
        first makes the kernel apply the link's pending link-watch work (see the module
        docstring), then reads the flags: two ioctls, no netlink round trip."""
        validate_ifname(name)
        deadline = time.monotonic() + timeout
        delay = 0.0005
        while True:
            async with self._use(netns) as h:
                h.sync_link_watch(name)
                flags = h.flags(name)
            if flags is not None and flags & m.IFF_RUNNING:
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.01)

    async def links(self, netns: str | None) -> list[LinkInfo]:
        async with self._use(netns) as h:
            msgs = await self._sockets.dump(h, m.get_link_msg(), RTM_GETLINK,
                                            f"list links in {h.where}")
            return [m.link_info(x) for x in msgs if x.get("event") == "RTM_NEWLINK"]

    async def _delete(self, h: Handle, name: str) -> bool:
        idx = h.index(name)
        if idx is None:
            return False
        res = await self._sockets.one(h, m.link_msg(idx), RTM_DELLINK, m.REQ_ACK,
                                      f"delete {name} in {h.where}", ok=(errno.ENODEV,),
                                      blocking=True)
        return res is not None

    async def delete_link(self, netns: str | None, name: str) -> bool:
        """Delete the interface (a veth takes its peer with it). Idempotent: False if the
        interface or the namespace does not exist. Runs off the event loop (16-40 ms)."""
        validate_ifname(name)
        try:
            async with self._use(netns) as h:
                return await self._delete(h, name)
        except NotFound:
            return False

    async def _set_link(self, h: Handle, name: str, value: Any, verb: str, *,
                        up: bool | None = None, mtu: int | None = None,
                        master: int | None = None, alias: str | None = None) -> None:
        msg = m.link_msg(name=validate_ifname(name), up=up, mtu=mtu, master=master, alias=alias)
        await self._sockets.one(h, msg, RTM_NEWLINK, m.REQ_ACK,
                                f"{verb} {value!r} on {name} in {h.where}")

    async def set_up(self, netns: str | None, name: str) -> None:
        async with self._use(netns) as h:
            await self._set_link(h, name, "up", "set", up=True)

    async def set_down(self, netns: str | None, name: str) -> None:
        async with self._use(netns) as h:
            await self._set_link(h, name, "down", "set", up=False)

    async def set_mtu(self, netns: str | None, name: str, mtu: int) -> None:
        async with self._use(netns) as h:
            await self._set_link(h, name, mtu, "set MTU", mtu=m.mtu(mtu))

    async def set_alias(self, netns: str | None, name: str, alias: str) -> None:
        async with self._use(netns) as h:
            await self._set_link(h, name, alias, "set alias", alias=alias)

    async def set_master(self, netns: str | None, name: str, master: str | None) -> None:
        """Enslave ``name`` to the bridge ``master`` (None: release it)."""
        async with self._use(netns) as h:
            idx = 0 if master is None else h.need_index(master)
            await self._set_link(h, name, master, "set master", master=idx)

    # ------------------------------------------------------------------ addresses

    async def add_address(self, netns: str | None, name: str, cidr: str) -> None:
        """Add ``cidr`` (e.g. ``172.16.0.1/32``) to the interface. Idempotent."""
        iface = m.interface(cidr)
        async with self._use(netns) as h:
            idx = h.need_index(name)
            await self._sockets.one(h, m.addr_msg(idx, iface), RTM_NEWADDR, m.REPLACE,
                                    f"add address {cidr} to {name} in {h.where}")

    async def del_address(self, netns: str | None, name: str, cidr: str) -> bool:
        """Remove an address. Idempotent: False if it was not there."""
        iface = m.interface(cidr)
        async with self._use(netns) as h:
            idx = h.index(validate_ifname(name))
            if idx is None:
                return False
            res = await self._sockets.one(h, m.addr_msg(idx, iface), RTM_DELADDR, m.REQ_ACK,
                                          f"delete address {cidr} from {name} in {h.where}",
                                          ok=(errno.EADDRNOTAVAIL, errno.ENODEV, errno.ENOENT))
            return res is not None

    async def _addresses(self, h: Handle, idx: int) -> list[str]:
        msgs = await self._sockets.dump(h, ifaddrmsg(), RTM_GETADDR, f"list addresses in {h.where}")
        return [a for x in msgs if (a := m.address_of(x, idx)) is not None]

    async def addresses(self, netns: str | None, name: str) -> list[str]:
        """The interface's addresses as ``ip/prefixlen`` (IPv6 link-local ones included)."""
        async with self._use(netns) as h:
            return await self._addresses(h, h.need_index(name))

    async def flush_addresses(self, netns: str | None, name: str) -> int:
        """Remove every address of the interface; returns how many were removed."""
        async with self._use(netns) as h:
            idx = h.need_index(name)
            addrs = await self._addresses(h, idx)
            if not addrs:
                return 0
            res = await self._sockets.batch(
                h, [(m.addr_msg(idx, m.interface(a)), RTM_DELADDR, m.REQ_ACK) for a in addrs],
                f"flush addresses of {name} in {h.where}")
            return sum(1 for r in res if not isinstance(r, NetlinkError))

    # ------------------------------------------------------------------ routes

    async def add_route(self, netns: str | None, dst_cidr: str, dev: str,
                        gateway: str | None = None, onlink: bool = False,
                        table: int | None = None) -> None:
        """Add (or replace) a route to ``dst_cidr`` via ``dev`` [and ``gateway``]. Idempotent."""
        dst = m.network(dst_cidr)
        async with self._use(netns) as h:
            idx = h.need_index(dev)
            await self._sockets.one(h, m.route_msg(dst, idx, gateway, onlink, table),
                                    RTM_NEWROUTE, m.REPLACE,
                                    f"add route {dst} dev {dev} in {h.where}")

    async def del_route(self, netns: str | None, dst_cidr: str, dev: str | None = None,
                        gateway: str | None = None, table: int | None = None) -> bool:
        """Delete a route. Idempotent: False if there was no such route."""
        dst = m.network(dst_cidr)
        async with self._use(netns) as h:
            idx = None
            if dev is not None:
                idx = h.index(validate_ifname(dev))
                if idx is None:
                    return False
            msg = m.route_msg(dst, idx, gateway, False, table, any_scope=True)
            res = await self._sockets.one(h, msg, RTM_DELROUTE, m.REQ_ACK,
                                          f"delete route {dst} in {h.where}",
                                          ok=(errno.ESRCH, errno.ENODEV, errno.ENOENT))
            return res is not None

    async def routes(self, netns: str | None, *, dev: str | None = None,
                     table: int | None = MAIN_TABLE, family: int | None = None
                     ) -> list[RouteInfo]:
        """Unicast routes of ``table`` (None: all tables), optionally only via ``dev``."""
        async with self._use(netns) as h:
            idx = h.need_index(dev) if dev is not None else None
            msgs = await self._sockets.dump(h, m.route_dump_msg(family), RTM_GETROUTE,
                                            f"list routes in {h.where}")
        return [r for x in msgs if (r := m.route_info(x, table, idx)) is not None]

    # ------------------------------------------------------------------ one interface at once

    async def setup_interface(self, netns: str | None, name: str, *, addresses: Sequence[str],
                              routes: Sequence[Route], mtu: int | None, up: bool = True,
                              alias: str | None = None) -> None:
        """Set MTU, alias and up, add ``addresses`` and ``routes`` ((prefix, on-link next hop or
        None)) on one interface, in one datagram to the kernel. Idempotent (replace semantics)."""
        ifaces = [m.interface(a) for a in addresses]
        nets = [(m.network(dst), nh) for dst, nh in routes]
        if mtu is not None:
            m.mtu(mtu)
        async with self._use(netns) as h:
            idx = h.need_index(name)
            items: list[tuple[Any, int, int]] = []
            if mtu is not None or up or alias is not None:
                items.append((m.link_msg(idx, up=True if up else None, mtu=mtu, alias=alias),
                              RTM_NEWLINK, m.REQ_ACK))
            items += [(m.addr_msg(idx, i), RTM_NEWADDR, m.REPLACE) for i in ifaces]
            items += [(m.route_msg(dst, idx, nh, nh is not None, None), RTM_NEWROUTE, m.REPLACE)
                      for dst, nh in nets]
            if not items:
                return
            what = f"set up {name} in {h.where}"
            res = await self._sockets.batch(h, items, what)
            for item, r in zip(items, res, strict=True):
                if isinstance(r, NetlinkError):
                    raise m.domain_error(r, f"{what}: {m.describe(item[0], item[1])}")

    # ------------------------------------------------------------------ policy rules

    async def add_rule(self, netns: str | None, *, iif: str, table: int, priority: int,
                       family: int = 4) -> None:
        """``ip rule add iif <iif> lookup <table> priority <priority>``. Idempotent."""
        async with self._use(netns) as h:
            await self._sockets.one(h, m.rule_msg(iif, table, priority, family), RTM_NEWRULE,
                                    m.CREATE, f"add rule iif {iif} table {table} in {h.where}",
                                    ok=(errno.EEXIST,))

    async def del_rule(self, netns: str | None, *, iif: str, table: int, priority: int,
                       family: int = 4) -> bool:
        """Delete such a rule. Idempotent: False if there was none."""
        async with self._use(netns) as h:
            res = await self._sockets.one(h, m.rule_msg(iif, table, priority, family),
                                          RTM_DELRULE, m.REQ_ACK,
                                          f"delete rule iif {iif} table {table} in {h.where}",
                                          ok=(errno.ENOENT, errno.ESRCH))
            return res is not None

    async def rules(self, netns: str | None) -> list[RuleInfo]:
        """The policy rules of both families."""
        out: list[RuleInfo] = []
        async with self._use(netns) as h:
            for family in (socket.AF_INET, socket.AF_INET6):
                msgs = await self._sockets.dump(h, m.rule_dump_msg(family), RTM_GETRULE,
                                                f"list rules in {h.where}")
                out += [r for x in msgs if (r := m.rule_info(x)) is not None]
        return out

    # ------------------------------------------------------------------ L2 (multi-node)

    async def fdb_append(self, netns: str | None, dev: str, mac: str, dst: str) -> None:
        """``bridge fdb append <mac> dev <dev> dst <dst>`` (e.g. all-zero MAC toward a remote
        VTEP). Idempotent."""
        m.ip(dst)
        async with self._use(netns) as h:
            msg = m.fdb_msg(h.need_index(dev), mac, dst)
            await self._sockets.one(h, msg, RTM_NEWNEIGH, m.APPEND,
                                    f"append fdb {mac} dst {dst} on {dev} in {h.where}",
                                    ok=(errno.EEXIST,))

    async def neigh_replace(self, netns: str | None, dev: str, ip: str, mac: str) -> None:
        """A permanent neighbour entry (``ip neigh replace``)."""
        m.ip(ip)
        async with self._use(netns) as h:
            msg = m.neigh_msg(h.need_index(dev), ip, mac)
            await self._sockets.one(h, msg, RTM_NEWNEIGH, m.REPLACE,
                                    f"replace neighbour {ip} on {dev} in {h.where}")

    # ------------------------------------------------------------------ sysctl

    @staticmethod
    def _sysctl_path(key: str) -> str:
        if not _SYSCTL_KEY.match(key) or ".." in key.split("/"):
            raise InvalidArgument(f"sysctl {key!r} is not a net.* key")
        rel = key if "/" in key else key.replace(".", "/")
        return "/proc/sys/" + rel

    async def set_sysctl_in_netns(self, netns: str, key: str, value: str | int) -> None:
        """Write a per-namespace ``net.*`` sysctl (e.g. ``net.ipv4.ip_forward``) inside ``netns``
        (use a ``a/b/c`` key when a part contains dots). Refuses the daemon's own namespace."""
        if netns is None:
            raise InvalidArgument("refusing to change sysctls of the forwarder's own namespace")
        path = self._sysctl_path(key)
        async with self._use(netns) as h:
            try:
                with _netns.entered_netns(h.ns_fd):  # /proc/sys/net is the opener's namespace
                    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
                    try:
                        os.write(fd, f"{value}\n".encode())
                    finally:
                        os.close(fd)
            except FileNotFoundError:
                raise NotFound(f"sysctl {key} does not exist in {h.where}") from None
            except OSError as exc:
                raise InvalidArgument(
                    f"cannot set sysctl {key}={value} in {h.where}: {exc.strerror}") from exc

    async def sysctl_in_netns(self, netns: str | None, key: str) -> str:
        """Read a ``net.*`` sysctl as seen inside ``netns``."""
        path = self._sysctl_path(key)
        async with self._use(netns) as h:
            try:
                with _netns.entered_netns(h.ns_fd):
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                    try:
                        return os.read(fd, 4096).decode().strip()
                    finally:
                        os.close(fd)
            except FileNotFoundError:
                raise NotFound(f"sysctl {key} does not exist in {h.where}") from None

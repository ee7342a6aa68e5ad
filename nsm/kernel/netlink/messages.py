"""Netlink messages: building them, reading the kernel's answers, and mapping its errors.

Nothing here does I/O. Messages are pyroute2's structures (``ifinfmsg``/``ifaddrmsg``/``rtmsg``/
``fibmsg``/``ndmsg``) filled directly (no ``IPRoute`` helpers), so that one interface's work can go to
the kernel as one datagram (see :mod:`nsm.kernel.netlink.operations`). Arguments are checked here,
before anything is sent: a bad address, prefix, MAC or MTU is :class:`~nsm.errors.InvalidArgument`.

Kernel facts the builders rely on (kernel 6.18):

- An interface alias (``IFLA_IFALIAS``) is ignored by the kernel when a link is created: it is set
  with a second message. A veth *peer* cannot be created up (the kernel answers ENOTCONN).
- ``RTM_NEWLINK`` honours ``ifi_index`` for a new link, and for a veth the ``ifi_index`` of the
  peer's ``ifinfomsg`` inside ``VETH_INFO_PEER`` -- but the peer's only when the link's own index
  is given too (otherwise the kernel picks the peer's). A name already taken is EEXIST, so is the
  link's index (the kernel finds that link by index), the peer's index EBUSY.
- IPv6 addresses get ``IFA_F_NODAD``: usable at once, no 1-2 s of "tentative".
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import socket
from dataclasses import dataclass
from typing import Any

from pyroute2.netlink import (
    NLM_F_ACK,
    NLM_F_APPEND,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_EXCL,
    NLM_F_REPLACE,
    NLM_F_REQUEST,
)
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTM_NEWADDR, RTM_NEWLINK, RTM_NEWROUTE
from pyroute2.netlink.rtnl.fibmsg import fibmsg
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.ndmsg import ndmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from nsm.errors import (
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    NsmError,
    Unsupported,
)
from nsm.mechanisms import validate_ifname

#: A route for :meth:`Netlink.setup_interface`: (destination prefix, on-link next hop or None).
Route = tuple[str, str | None]

MAIN_TABLE = 254

# Values of the kernel's headers that pyroute2 does not name (if.h, rtnetlink.h, if_addr.h,
# neighbour.h, fib_rules.h), grouped by the header field they go in.
IFF_UP, IFF_RUNNING, IFF_LOWER_UP = 0x1, 0x40, 0x10000  # RUNNING: operstate UP or UNKNOWN
RT_SCOPE_NOWHERE, _RT_SCOPE_UNIVERSE, _RT_SCOPE_LINK = 255, 0, 253
RTN_UNICAST = 1
RTEXT_FILTER_SKIP_STATS = 1 << 3
_IFA_F_NODAD = 0x02
_RTPROT_STATIC = 4
_RTNH_F_ONLINK = 4
_NUD_NOARP, _NUD_PERMANENT, _NTF_SELF, _AF_BRIDGE = 0x40, 0x80, 0x02, 7
_FR_ACT_TO_TBL, _RT_TABLE_COMPAT = 1, 252
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")

REQ_ACK = NLM_F_REQUEST | NLM_F_ACK
CREATE = REQ_ACK | NLM_F_CREATE | NLM_F_EXCL
REPLACE = REQ_ACK | NLM_F_CREATE | NLM_F_REPLACE
APPEND = REQ_ACK | NLM_F_CREATE | NLM_F_APPEND
DUMP = NLM_F_REQUEST | NLM_F_DUMP


# ------------------------------------------------------------------------------------ results


@dataclass(frozen=True, slots=True)
class LinkInfo:
    index: int
    name: str
    alias: str | None
    mtu: int
    mac: str | None
    admin_up: bool
    #: Carrier (IFF_LOWER_UP): for a veth, both ends are up.
    oper_up: bool
    kind: str | None
    #: Index of the bridge this link is enslaved to.
    master: int | None
    #: Index of the parent/peer link (a veth's peer, in the peer's namespace).
    link: int | None
    #: RFC 2863 state set by the kernel's linkwatch ("UP", "DOWN", ...); only once it is up
    #: has the device its real queueing discipline (before, packets are dropped).
    operstate: str = ""
    #: VXLAN network identifier, for a VXLAN device.
    vxlan_id: int | None = None


@dataclass(frozen=True, slots=True)
class RouteInfo:
    dst: str
    oif: int | None
    gateway: str | None
    table: int
    scope: int
    onlink: bool


@dataclass(frozen=True, slots=True)
class RuleInfo:
    family: int  # 4 or 6
    table: int
    priority: int
    iif: str | None


# ------------------------------------------------------------------------------------ errors


def where(key: str | None) -> str:
    """A namespace key (None: the daemon's own) for error messages."""
    return "the forwarder's own network namespace" if key is None else f"network namespace {key}"


def domain_error(exc: NetlinkError, what: str) -> NsmError:
    """The kernel's error as a domain error, with its text (extended ACK) when it gave one."""
    code = exc.code
    detail = str(exc.args[1]) if len(exc.args) > 1 and exc.args[1] else os.strerror(code)
    text = f"{what}: {detail}"
    if code == errno.EEXIST:
        return AlreadyExists(text)
    if code in (errno.ENODEV, errno.ENOENT, errno.ESRCH):
        return NotFound(text)
    if code in (errno.EOPNOTSUPP, errno.EPROTONOSUPPORT, errno.EAFNOSUPPORT):
        return Unsupported(f"{text} (not supported by this kernel)")
    if code in (errno.EINVAL, errno.ERANGE, errno.E2BIG, errno.EMSGSIZE):
        return InvalidArgument(text)
    if code in (errno.EPERM, errno.EACCES, errno.EBUSY, errno.ENETDOWN, errno.ENETUNREACH,
                errno.EADDRNOTAVAIL, errno.ENOTCONN, errno.EHOSTUNREACH):
        return FailedPrecondition(text)
    return Internal(text)


def describe(msg: Any, mtype: int) -> str:
    """Which part of a batch a message is (for the error of a failed part)."""
    if mtype == RTM_NEWLINK:
        return "link settings"
    if mtype == RTM_NEWADDR:
        return f"address {msg.get('IFA_LOCAL')}/{msg['prefixlen']}"
    if mtype == RTM_NEWROUTE:
        return f"route {msg.get('RTA_DST') or 'default'}/{msg['dst_len']}"
    return "request"


# ------------------------------------------------------------------------------------ arguments


def interface(cidr: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    try:
        return ipaddress.ip_interface(cidr)
    except ValueError as exc:
        raise InvalidArgument(f"{cidr!r} is not an IP address with prefix") from exc


def network(cidr: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(cidr, strict=False)
    except ValueError as exc:
        raise InvalidArgument(f"{cidr!r} is not an IP prefix") from exc


def ip(addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(addr)
    except ValueError as exc:
        raise InvalidArgument(f"{addr!r} is not an IP address") from exc


def mac(value: str, what: str = "MAC address") -> str:
    low = value.lower()
    if not _MAC.match(low):
        raise InvalidArgument(f"{what} {value!r} is not of the form aa:bb:cc:dd:ee:ff")
    return low


def mtu(value: int) -> int:
    if not isinstance(value, int) or not 68 <= value <= 65535:
        raise InvalidArgument(f"MTU {value!r} is out of range 68..65535")
    return value


# ------------------------------------------------------------------------------------ links


def link_msg(index: int = 0, name: str | None = None, *, up: bool | None = None,
             mtu: int | None = None, alias: str | None = None, master: int | None = None) -> Any:
    """An ``ifinfmsg`` naming a link by index or name, with the settings given."""
    msg = ifinfmsg()
    msg["index"] = index
    if up is not None:
        msg["change"] = IFF_UP
        msg["flags"] = IFF_UP if up else 0
    attrs: list[tuple[str, Any]] = []
    if name is not None:
        attrs.append(("IFLA_IFNAME", name))
    if mtu is not None:
        attrs.append(("IFLA_MTU", mtu))
    if master is not None:
        attrs.append(("IFLA_MASTER", master))
    if alias is not None:
        attrs.append(("IFLA_IFALIAS", alias))
    msg["attrs"] = attrs
    return msg


def veth_msg(name: str, peer_name: str, *, index: int = 0, peer_index: int = 0,
             peer_ns_fd: int | None = None, mtu: int | None = None, mac_addr: str | None = None,
             peer_mac: str | None = None) -> Any:
    """``RTM_NEWLINK`` for a veth pair, both ends down; the peer goes to ``peer_ns_fd`` (None: the
    namespace of the socket). ``index``/``peer_index`` 0: the kernel picks (the peer's is only
    honoured with the link's, see the module docstring)."""
    peer_attrs: list[tuple[str, Any]] = [("IFLA_IFNAME", peer_name)]
    if peer_ns_fd is not None:
        peer_attrs.append(("IFLA_NET_NS_FD", peer_ns_fd))
    if mtu is not None:
        peer_attrs.append(("IFLA_MTU", mtu))
    if peer_mac is not None:
        peer_attrs.append(("IFLA_ADDRESS", mac(peer_mac, "peer MAC address")))
    msg = link_msg(index, name=name, mtu=mtu)
    if mac_addr is not None:
        msg["attrs"].append(("IFLA_ADDRESS", mac(mac_addr)))
    peer = {"index": peer_index, "attrs": peer_attrs}
    msg["attrs"].append(("IFLA_LINKINFO", {"attrs": [
        ("IFLA_INFO_KIND", "veth"),
        ("IFLA_INFO_DATA", {"attrs": [("VETH_INFO_PEER", peer)]}),
    ]}))
    return msg


def vxlan_data(*, vni: int, local: str, remote: str | None, port: int,
               learning: bool) -> list[tuple[str, Any]]:
    """The ``IFLA_INFO_DATA`` of a VXLAN device (checked); ``remote=None``: FDB-driven."""
    if not 0 <= vni < 1 << 24:
        raise InvalidArgument(f"VNI {vni} is out of range 0..16777215")
    if not 0 < port < 65536:
        raise InvalidArgument(f"VXLAN port {port} is out of range")
    loc = ip(local)
    data: list[tuple[str, Any]] = [
        ("IFLA_VXLAN_ID", vni),
        ("IFLA_VXLAN_LOCAL" if loc.version == 4 else "IFLA_VXLAN_LOCAL6", str(loc)),
        ("IFLA_VXLAN_PORT", port),
        ("IFLA_VXLAN_LEARNING", 1 if learning else 0),
    ]
    if remote is not None:
        rem = ip(remote)
        if rem.version != loc.version:
            raise InvalidArgument(f"VXLAN local {local} and remote {remote} differ in family")
        data.append(("IFLA_VXLAN_GROUP" if rem.version == 4 else "IFLA_VXLAN_GROUP6", str(rem)))
    return data


def vxlan_msg(name: str, data: list[tuple[str, Any]], *, underlay_index: int | None,
              mtu: int | None, mac_addr: str | None) -> Any:
    """``RTM_NEWLINK`` for a VXLAN device (down) with :func:`vxlan_data`."""
    if underlay_index is not None:
        data = [*data, ("IFLA_VXLAN_LINK", underlay_index)]
    msg = link_msg(name=name, mtu=mtu)
    if mac_addr is not None:
        msg["attrs"].append(("IFLA_ADDRESS", mac(mac_addr)))
    msg["attrs"].append(("IFLA_LINKINFO", {"attrs": [
        ("IFLA_INFO_KIND", "vxlan"), ("IFLA_INFO_DATA", {"attrs": data})]}))
    return msg


def bridge_msg(name: str, mtu: int | None) -> Any:
    """``RTM_NEWLINK`` for a Linux bridge (down)."""
    msg = link_msg(name=name, mtu=mtu)
    msg["attrs"].append(("IFLA_LINKINFO", {"attrs": [("IFLA_INFO_KIND", "bridge")]}))
    return msg


def get_link_msg(name: str | None = None) -> Any:
    """``RTM_GETLINK`` of one link by name (None: a dump), without statistics."""
    msg = link_msg(name=name)
    msg["attrs"].append(("IFLA_EXT_MASK", RTEXT_FILTER_SKIP_STATS))
    return msg


def link_info(msg: Any) -> LinkInfo:
    flags = msg["flags"]
    return LinkInfo(
        index=msg["index"],
        name=msg.get("ifname"),
        alias=msg.get("ifalias") or None,
        mtu=msg.get("mtu") or 0,
        mac=msg.get("address"),
        admin_up=bool(flags & IFF_UP),
        oper_up=bool(flags & IFF_LOWER_UP),
        kind=msg.get(("linkinfo", "kind")),
        master=msg.get("master") or None,
        link=msg.get("link") or None,
        operstate=str(msg.get("operstate") or ""),
        vxlan_id=msg.get(("linkinfo", "data", "vxlan_id")),
    )


# ------------------------------------------------------------------------------------ addresses


def addr_msg(index: int, iface: ipaddress.IPv4Interface | ipaddress.IPv6Interface) -> Any:
    msg = ifaddrmsg()
    msg["family"] = socket.AF_INET if iface.version == 4 else socket.AF_INET6
    msg["prefixlen"] = iface.network.prefixlen
    msg["index"] = index
    addr = str(iface.ip)
    msg["attrs"] = [("IFA_LOCAL", addr), ("IFA_ADDRESS", addr)]
    if iface.version == 6:
        msg["flags"] = _IFA_F_NODAD  # usable at once, no 1-2 s of "tentative"
    return msg


def address_of(msg: Any, index: int) -> str | None:
    """``ip/prefixlen`` of an answer to an address dump if it belongs to link ``index``."""
    if msg.get("event") != "RTM_NEWADDR" or msg["index"] != index:
        return None
    addr = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
    return f"{addr}/{msg['prefixlen']}"


# ------------------------------------------------------------------------------------ routes


def route_msg(dst: ipaddress.IPv4Network | ipaddress.IPv6Network, oif: int | None,
              gateway: str | None, onlink: bool, table: int | None, *,
              any_scope: bool = False) -> Any:
    """An ``rtmsg`` for a unicast route (``any_scope``: to match a route of any scope, for a
    deletion)."""
    msg = rtmsg()
    msg["family"] = socket.AF_INET if dst.version == 4 else socket.AF_INET6
    msg["dst_len"] = dst.prefixlen
    msg["proto"] = _RTPROT_STATIC
    msg["type"] = RTN_UNICAST
    if any_scope:
        msg["scope"] = RT_SCOPE_NOWHERE
    else:
        msg["scope"] = _RT_SCOPE_UNIVERSE if gateway else _RT_SCOPE_LINK
    tid = MAIN_TABLE if table is None else table
    msg["table"] = tid if tid < 256 else 0
    attrs: list[tuple[str, Any]] = [("RTA_TABLE", tid)]
    if dst.prefixlen:
        attrs.append(("RTA_DST", str(dst.network_address)))
    if oif is not None:
        attrs.append(("RTA_OIF", oif))
    if gateway:
        gw = ip(gateway)
        if gw.version != dst.version:
            raise InvalidArgument(f"next hop {gateway} and destination {dst} differ in family")
        attrs.append(("RTA_GATEWAY", str(gw)))
        if onlink:
            msg["flags"] = _RTNH_F_ONLINK
    msg["attrs"] = attrs
    return msg


def route_dump_msg(family: int | None) -> Any:
    msg = rtmsg()
    msg["family"] = family or 0
    return msg


def route_info(msg: Any, table: int | None, oif: int | None) -> RouteInfo | None:
    """An answer to a route dump as a :class:`RouteInfo` if it is a unicast route of ``table``
    (None: any) via ``oif`` (None: any)."""
    if msg.get("event") != "RTM_NEWROUTE" or msg["type"] != RTN_UNICAST:
        return None
    tid = msg.get("RTA_TABLE") or msg["table"]
    if table is not None and tid != table:
        return None
    out = msg.get("RTA_OIF")
    if oif is not None and out != oif:
        return None
    dst = msg.get("RTA_DST") or ("0.0.0.0" if msg["family"] == socket.AF_INET else "::")
    return RouteInfo(dst=f"{dst}/{msg['dst_len']}", oif=out, gateway=msg.get("RTA_GATEWAY"),
                     table=tid, scope=msg["scope"], onlink=bool(msg["flags"] & _RTNH_F_ONLINK))


# ------------------------------------------------------------------------------------ rules


def rule_msg(iif: str, table: int, priority: int, family: int) -> Any:
    """``ip rule ... iif <iif> lookup <table> priority <priority>``."""
    if family not in (4, 6):
        raise InvalidArgument(f"rule family must be 4 or 6, not {family}")
    if not 0 < table < 1 << 32:
        raise InvalidArgument(f"routing table {table} is out of range")
    msg = fibmsg()
    msg["family"] = socket.AF_INET if family == 4 else socket.AF_INET6
    msg["action"] = _FR_ACT_TO_TBL
    msg["table"] = table if table < 256 else _RT_TABLE_COMPAT  # FRA_TABLE has the id
    msg["attrs"] = [("FRA_IIFNAME", validate_ifname(iif)), ("FRA_TABLE", table),
                    ("FRA_PRIORITY", priority)]
    return msg


def rule_dump_msg(family: int) -> Any:
    msg = fibmsg()
    msg["family"] = family
    return msg


def rule_info(msg: Any) -> RuleInfo | None:
    if msg.get("event") != "RTM_NEWRULE":
        return None
    return RuleInfo(family=4 if msg["family"] == socket.AF_INET else 6,
                    table=msg.get("FRA_TABLE") or msg["table"],
                    priority=msg.get("FRA_PRIORITY") or 0, iif=msg.get("FRA_IIFNAME"))


# ------------------------------------------------------------------------------------ neighbours


def fdb_msg(index: int, mac_addr: str, dst: str) -> Any:
    """``bridge fdb append <mac> dev <index> dst <dst>``."""
    addr = ip(dst)
    msg = ndmsg()
    msg["family"] = _AF_BRIDGE
    msg["ifindex"] = index
    msg["state"] = _NUD_NOARP | _NUD_PERMANENT
    msg["flags"] = _NTF_SELF
    msg["attrs"] = [("NDA_LLADDR", mac(mac_addr)), ("NDA_DST", str(addr))]
    return msg


def neigh_msg(index: int, addr: str, mac_addr: str) -> Any:
    """A permanent neighbour entry."""
    parsed = ip(addr)
    msg = ndmsg()
    msg["family"] = socket.AF_INET if parsed.version == 4 else socket.AF_INET6
    msg["ifindex"] = index
    msg["state"] = _NUD_PERMANENT
    msg["attrs"] = [("NDA_DST", str(parsed)), ("NDA_LLADDR", mac(mac_addr))]
    return msg


# ------------------------------------------------------------------------------------ warming


def warm() -> None:
    """Build, encode and decode one message of each kind the datapath sends (nothing reaches the
    kernel). pyroute2 compiles a message class's attribute layout on its first use: done at a
    daemon's start, the first connection does not pay it (~1-2 ms here)."""
    idx = 1
    msgs: list[Any] = [
        veth_msg("nsmwarm0", "nsmwarm1", index=idx, peer_index=idx + 1, peer_ns_fd=0, mtu=1500,
                 mac_addr="02:00:00:00:00:01", peer_mac="02:00:00:00:00:02"),
        link_msg(idx, up=True, mtu=1500, alias="nsm-warm", master=idx),
        get_link_msg("nsmwarm0"),
        vxlan_msg("nsmwarm2", vxlan_data(vni=1, local="192.0.2.1", remote="192.0.2.2", port=4789,
                                         learning=False), underlay_index=idx, mtu=1450,
                  mac_addr="02:00:00:00:00:03"),
        bridge_msg("nsmwarm3", 1500),
        rule_msg("nsmwarm0", 1000, 1000, 4),
        fdb_msg(idx, "02:00:00:00:00:04", "192.0.2.2"),
        neigh_msg(idx, "192.0.2.3", "02:00:00:00:00:05"),
    ]
    for cidr in ("192.0.2.1/32", "2001:db8::1/128"):
        msgs.append(addr_msg(idx, interface(cidr)))
    for dst, gateway in (("192.0.2.2/32", None), ("198.51.100.0/24", "192.0.2.2"),
                         ("2001:db8::2/128", None), ("2001:db8:1::/64", "2001:db8::2")):
        msgs.append(route_msg(network(dst), idx, gateway, gateway is not None, None))
    for msg in msgs:
        msg.encode()
        type(msg)(msg.data).decode()

"""Mechanism classes, types, parameter keys and payloads (string constants of the
networkservicemesh.io API, defined upstream in Go rather than in the protos)."""

from __future__ import annotations

import os
import re
from urllib.parse import unquote, urlsplit

from nsm.api.connection_pb2 import Mechanism
from nsm.errors import InvalidArgument

LOCAL = "LOCAL"
REMOTE = "REMOTE"
CLASSES = (LOCAL, REMOTE)

KERNEL = "KERNEL"
VXLAN = "VXLAN"
WIREGUARD = "WIREGUARD"
IPSEC = "IPSEC"
VLAN = "VLAN"
MEMIF = "MEMIF"
NOOP = "NOOP"

# Parameter keys.
NAME = "name"
NETNS_INODE_URL = "inodeURL"
SRC_IP = "src_ip"
DST_IP = "dst_ip"
SRC_PORT = "src_port"
DST_PORT = "dst_port"
VNI = "vni"
MTU = "MTU"

# Payloads.
PAYLOAD_IP = "IP"
PAYLOAD_ETHERNET = "ETHERNET"
PAYLOADS = (PAYLOAD_IP, PAYLOAD_ETHERNET)

#: Linux limit on interface names (IFNAMSIZ - 1).
IFNAME_MAX = 15
_IFNAME = re.compile(r"^[A-Za-z0-9_.\-]+$")

#: The VXLAN port we always set explicitly (Linux defaults to 8472).
VXLAN_PORT = 4789


def kernel(name: str = "", netns_url: str = "") -> Mechanism:
    """A KERNEL/LOCAL mechanism preference."""
    params = {}
    if name:
        params[NAME] = name
    if netns_url:
        params[NETNS_INODE_URL] = netns_url
    return Mechanism(cls=LOCAL, type=KERNEL, parameters=params)


def validate_ifname(name: str, what: str = "interface name") -> str:
    if not name:
        raise InvalidArgument(f"{what} is empty")
    if len(name) > IFNAME_MAX:
        raise InvalidArgument(
            f"{what} {name!r} is {len(name)} characters; Linux allows at most {IFNAME_MAX}")
    if not _IFNAME.match(name) or name in (".", ".."):
        raise InvalidArgument(f"{what} {name!r} has characters Linux does not allow")
    return name


def validate_mechanism(m: Mechanism) -> None:
    """Reject mechanisms that are malformed (not merely unsupported)."""
    if m.cls not in CLASSES:
        raise InvalidArgument(f"mechanism class {m.cls!r} is not one of {', '.join(CLASSES)}")
    if not m.type:
        raise InvalidArgument("mechanism type is empty")
    if m.type == KERNEL:
        if NAME in m.parameters:
            validate_ifname(m.parameters[NAME])
        if NETNS_INODE_URL in m.parameters:
            validate_netns_url(m.parameters[NETNS_INODE_URL])
    if MTU in m.parameters:
        try:
            mtu = int(m.parameters[MTU])
        except ValueError as exc:
            raise InvalidArgument(f"mechanism MTU {m.parameters[MTU]!r} is not a number") from exc
        if not 68 <= mtu <= 65535:
            raise InvalidArgument(f"mechanism MTU {mtu} is out of range 68..65535")


#: How an ``inodeURL`` names a namespace by its identity instead of a path (as upstream
#: writes it): ``inode://<st_dev>/<st_ino>`` of the namespace file.
INODE_SCHEME = "inode://"


def netns_inode(url: str) -> tuple[int, int] | None:
    """The (device, inode) an ``inode://<dev>/<ino>`` URL names; None for any other URL;
    InvalidArgument when it is one but malformed."""
    if not url.startswith(INODE_SCHEME):
        return None
    parts = url[len(INODE_SCHEME):].split("/")
    if len(parts) != 2 or not all(p.isascii() and p.isdigit() and len(p) <= 20 for p in parts) \
            or int(parts[1]) == 0:
        raise InvalidArgument(f"network namespace URL {url[:80]!r} must be inode://<device>/<inode> "
                              "(decimal numbers)")
    return int(parts[0]), int(parts[1])


def inode_url(ident: tuple[int, int]) -> str:
    """The ``inodeURL`` naming the namespace of identity ``ident`` = (device, inode): how a
    process names its own namespace for a reader to whom its PIDs mean nothing (an endpoint in
    a pod without hostPID); the forwarder finds a path for it
    (:class:`nsm.kernel.netns.NetnsFinder`)."""
    return f"{INODE_SCHEME}{ident[0]}/{ident[1]}"


def validate_netns_url(url: str) -> None:
    """InvalidArgument unless ``url`` is a well-formed ``inodeURL``: a path (see
    :func:`netns_path`) or ``inode://<dev>/<ino>``."""
    if netns_inode(url) is None:
        netns_path(url)


def netns_path(url: str) -> str:
    """The filesystem path of a network namespace named by an ``inodeURL`` parameter.

    Accepts ``file:///var/run/netns/x``, ``file:///proc/PID/ns/net`` and a bare absolute path.
    Does not check that it exists. An ``inode://`` URL has no path of its own: InvalidArgument
    here (a forwarder finds one: :meth:`nsm.kernel.netns.NetnsFinder.resolve`, which also checks
    that a path exists).
    """
    if not url:
        raise InvalidArgument("network namespace URL is empty")
    if url.startswith(INODE_SCHEME):
        raise InvalidArgument(f"network namespace URL {url[:80]!r} names a namespace by inode, "
                              "not by a path this process can open")
    if url.startswith("/"):
        path = url
    else:
        parts = urlsplit(url)
        if parts.scheme != "file":
            raise InvalidArgument(
                f"network namespace URL {url!r} must be file:///path (e.g. file:///var/run/netns/x)")
        path = unquote(parts.path)
    if not path.startswith("/") or "\x00" in path:
        raise InvalidArgument(f"network namespace URL {url!r} has no absolute path")
    return os.path.normpath(path)


def netns_url(path: str) -> str:
    return f"file://{path}"

# VXLAN parameters of ours beside the upstream keys: the MAC of each side's tunnel device, so
# that routed (IP) connections need no ARP across the tunnel.
SRC_MAC = "src_mac"
DST_MAC = "dst_mac"


def vxlan(src_ip: str, vni: int | None = None, src_mac: str = "") -> Mechanism:
    """A VXLAN/REMOTE mechanism preference."""
    params = {SRC_IP: src_ip, DST_PORT: str(VXLAN_PORT)}
    if vni is not None:
        params[VNI] = str(vni)
    if src_mac:
        params[SRC_MAC] = src_mac
    return Mechanism(cls=REMOTE, type=VXLAN, parameters=params)

"""Data-plane liveness of a connection, checked from inside the client's network namespace.

The check (what the reference's heal liveness check does, ``sdk-kernel: tools/heal``):

- **IP addresses** (IP payloads, and ETHERNET payloads that have an IP context): ICMP / ICMPv6
  echoes from the namespace to every destination address (prefix lengths stripped,
  ``10.0.0.1/32`` → ``10.0.0.1``), ``echoes`` of them (4) spread evenly over ``timeout`` (1 s).
  *Alive* when every address has answered at least once within the timeout; the check ends as soon
  as the last one has (one round trip when healthy, no further echoes). *Dead*, with a reason: an
  address that never answered, a send error (``ENETUNREACH`` when the route or the interface is
  gone or down, ``EHOSTUNREACH``, ``ENETDOWN``, …), the namespace gone or replaced.
  :func:`destinations` picks the addresses of a connection (the families the client side has an
  address of, as the reference pairs each source with the destinations of its family).
- **An interface name** (``ifname``): first, with an ioctl on a socket in the namespace
  (``SIOCGIFFLAGS``, as :meth:`nsm.kernel.netlink.Netlink.wait_ready` reads it; lock-free), that
  the interface is there, administratively up (``IFF_UP``) and operationally up (``IFF_RUNNING``:
  carrier on; for a veth, its peer is up too): a fast first step with a precise reason, no wait
  for the timeout. For an ETHERNET connection with no IP addresses there is no ICMP target and
  this is the whole check, so it also asks the driver for carrier (``ETHTOOL_GLINK``): it knows
  at once, where ``IFF_RUNNING`` follows a carrier loss through the kernel's linkwatch up to a
  second later. (Not with addresses: that ioctl takes the kernel's global RTNL lock, and the
  echoes find a dead peer anyway.)

Sockets: one :class:`Liveness` per daemon or agent, on its event loop; it keeps, per network
namespace, one ICMP socket per family in use, made **without forking** (the loop thread
``setns()``s into the namespace, creates the socket, ``setns()``s straight back; a socket belongs to
the namespace it was created in for life), non-blocking and read by ``loop.add_reader``. Every
check and every watch in that namespace shares them: no thread and no socket per connection.
Echoes carry this checker's random identifier, a per-socket sequence number and a 16-byte payload
(a random token of this checker + the echo's serial), and a reply counts only for the echo, and so
the check, it answers, from the address that echo went to.

Raw sockets (``SOCK_RAW``, ``CAP_NET_RAW``) by default, not ICMP "ping sockets" (``SOCK_DGRAM``):
a ping socket is allowed only to groups in the namespace's ``net.ipv4.ping_group_range``, and a
fresh namespace (every pod) has ``1 0`` — nobody, root included — and a pod's sysctls are not ours
to change; the agent runs with the privileges it needs to enter pods anyway. A raw socket sees a
copy of every ICMP message the namespace receives: a kernel filter (``ICMP_FILTER`` /
``ICMP6_FILTER``) passes only echo replies and errors (unreachable, time exceeded) up. Ping sockets
are the fallback (``icmp="auto"``) for an unprivileged process where the range allows them, or
asked for with ``icmp="dgram"``.

A socket pins its namespace (the kernel cannot destroy a deleted namespace, nor the interfaces in
it, while a socket made in it lives). Every check first looks at the namespace path (``stat``,
~2 µs): gone or replaced → dead at once, and the namespace's sockets are closed. Sockets of a
namespace no check has used for ``idle_timeout`` s are closed too.

Cost (``python -m bench.liveness``; 2 vCPU shared with other work, load ~9: upper figures):

- one check of one connection (IPv4 and its interface), sockets open: 0.09-0.13 ms wall,
  0.10-0.15 ms CPU; with IPv6 too: 0.18 ms wall, 0.23 ms CPU;
- the first check in a namespace (its socket opened): 0.2-0.3 ms;
- 200 connections watched every 200 ms for 10 s (~980 checks/s): 12-14 % of one core (user +
  system), 200 sockets, no thread; IPv4 and IPv6: 15-17 %, 400 sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import math
import os
import secrets
import socket
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from nsm.addresses import check_interface
from nsm.api.connection_pb2 import Connection
from nsm.errors import FailedPrecondition, InvalidArgument, NotFound, NsmError
from nsm.kernel import netns as _netns
from nsm.kernel.ping import echo_request
from nsm.log import get_logger
from nsm.mechanisms import KERNEL, NAME, NETNS_INODE_URL, validate_ifname

log = get_logger(__name__)

__all__ = ["Liveness", "LivenessResult", "LivenessTarget", "Watch", "destinations", "target_of"]

T = TypeVar("T")

#: The reference's defaults (cmd-nsc): a check every 200 ms, 1 s for it, 4 echoes in that second.
DEFAULT_INTERVAL = 0.2
DEFAULT_TIMEOUT = 1.0
DEFAULT_ECHOES = 4

_SOL_RAW = 255
_ICMP_FILTER = 1
_ICMP6_FILTER = 1
_PAYLOAD = 16  # token (8) + serial (8)
_READ_BURST = 256  # datagrams read per wake-up at most (the rest on the next one)


@dataclass(frozen=True, slots=True)
class _Family:
    family: int
    proto: int
    request: int
    reply: int
    errors: dict[int, str]
    unreachable: int
    #: Whether a raw socket receives the IP header before the ICMP one (IPv4 yes, IPv6 no).
    raw_ip_header: bool


_V4 = _Family(socket.AF_INET, socket.IPPROTO_ICMP, 8, 0,
              {3: "destination unreachable", 11: "time exceeded"}, 3, True)
_V6 = _Family(socket.AF_INET6, socket.IPPROTO_ICMPV6, 128, 129,
              {1: "destination unreachable", 3: "time exceeded"}, 1, False)

_UNREACHABLE = {
    (socket.AF_INET, 0): "network unreachable", (socket.AF_INET, 1): "host unreachable",
    (socket.AF_INET, 13): "administratively prohibited",
    (socket.AF_INET6, 0): "no route", (socket.AF_INET6, 1): "administratively prohibited",
    (socket.AF_INET6, 3): "address unreachable",
}


@dataclass(frozen=True, slots=True)
class LivenessResult:
    """The outcome of one check. ``reason`` says why it is dead ("" when alive); ``rtt_ms`` is the
    slowest address's first answer (None when nothing was pinged); ``sent`` echoes were sent and
    ``lost`` of them had no answer when the check ended."""

    alive: bool
    reason: str = ""
    rtt_ms: float | None = None
    sent: int = 0
    lost: int = 0


@dataclass(frozen=True, slots=True)
class LivenessTarget:
    """What to check for one connection: its client's namespace, the addresses to ping (no prefix
    lengths) and its interface there (the whole check when there is no address)."""

    netns: str
    addresses: tuple[str, ...] = ()
    ifname: str | None = None


def destinations(dst_ip_addrs: Iterable[str], src_ip_addrs: Iterable[str]) -> tuple[str, ...]:
    """The addresses a liveness check pings for a connection: its destination addresses (the
    endpoint side, ``ip_context.dst_ip_addrs``) without prefix length, once each, of the families
    the client side (``src_ip_addrs``) has an address of — the reference pings each source with
    the destinations of its family, so a family the client has no address in is not pinged."""
    families = {check_interface(a, "ip_context.src_ip_addrs entry").version for a in src_ip_addrs}
    out: list[str] = []
    for text in dst_ip_addrs:
        ip = check_interface(text, "ip_context.dst_ip_addrs entry").ip
        if ip.version in families and str(ip) not in out:
            out.append(str(ip))
    return tuple(out)


def target_of(conn: Connection) -> LivenessTarget | None:
    """The liveness target of a client's connection: KERNEL mechanism → its namespace
    (``inodeURL``), interface (``name``) and :func:`destinations` — whatever the payload: an
    ETHERNET connection with an IP context is pinged too, one without is checked by its
    interface alone. None when there is nothing to check from here (another mechanism, or no
    namespace)."""
    mech = conn.mechanism
    netns = mech.parameters.get(NETNS_INODE_URL, "")
    if mech.type != KERNEL or not netns:
        return None
    ip = conn.context.ip_context
    return LivenessTarget(netns=netns,
                          addresses=destinations(ip.dst_ip_addrs, ip.src_ip_addrs),
                          ifname=mech.parameters.get(NAME) or None)


# ---------------------------------------------------------------------- internals


class _Gone(Exception):
    """The namespace is gone or was replaced (the check is dead; its sockets are closed)."""


@dataclass(eq=False, slots=True)
class _Addr:
    """One parsed destination."""

    ip: str
    family: _Family
    link_local: bool


@dataclass(eq=False, slots=True)
class _Target:
    addr: _Addr
    isock: _IcmpSocket
    sockaddr: tuple[Any, ...]
    answered: bool = False
    rtt: float = 0.0
    note: str = ""
    seqs: list[int] = field(default_factory=list)


@dataclass(eq=False, slots=True)
class _Echo:
    probe: _Probe
    target: _Target
    payload: bytes
    sent_at: float


@dataclass(eq=False, slots=True)
class _Probe:
    future: asyncio.Future[LivenessResult]
    targets: list[_Target]
    timeout: float
    echoes: int
    started: float
    left: int = 0
    sent: int = 0
    replies: int = 0
    round: int = 0
    timer: asyncio.TimerHandle | None = None


@dataclass(eq=False, slots=True)
class _IcmpSocket:
    ns: _Namespace
    fam: _Family
    sock: socket.socket
    raw: bool
    ident: int
    next_seq: int
    pending: dict[int, _Echo] = field(default_factory=dict)

    def seq(self) -> int:
        for _ in range(0x10000):
            seq = self.next_seq
            self.next_seq = (seq + 1) & 0xFFFF
            if seq not in self.pending:
                return seq
        raise FailedPrecondition("65536 liveness echoes outstanding on one socket")


@dataclass(eq=False, slots=True)
class _Namespace:
    path: str
    ident: tuple[int, int]
    sockets: dict[int, _IcmpSocket] = field(default_factory=dict)
    ctl: socket.socket | None = None
    users: int = 0
    linger: asyncio.TimerHandle | None = None
    closed: bool = False


def _parse_addresses(addresses: Iterable[str]) -> list[_Addr]:
    if isinstance(addresses, str):
        raise InvalidArgument("liveness addresses must be a list of addresses, not one string")
    out: list[_Addr] = []
    seen: set[str] = set()
    for text in addresses:
        ip = check_interface(text, "liveness address").ip  # "10.0.0.1/32" → 10.0.0.1
        if str(ip) in seen:
            continue
        seen.add(str(ip))
        out.append(_Addr(str(ip), _V4 if ip.version == 4 else _V6,
                         isinstance(ip, ipaddress.IPv6Address) and ip.is_link_local))
    return out


def _check_timing(timeout: float, echoes: int) -> None:
    if not (isinstance(timeout, int | float) and math.isfinite(timeout) and 0 < timeout <= 3600):
        raise InvalidArgument(f"liveness timeout {timeout!r} must be a number of seconds in (0, 3600]")
    if not (isinstance(echoes, int) and 1 <= echoes <= 64):
        raise InvalidArgument(f"liveness echoes {echoes!r} must be 1..64")


def _errno_text(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, "")
    text = exc.strerror or str(exc)
    return f"{text} ({name})" if name else text


def _filter(fam: _Family) -> tuple[int, int, bytes]:
    """A kernel filter passing only echo replies and the errors we read to a raw socket."""
    wanted = (fam.reply, *fam.errors)
    if fam is _V4:  # bit set = type dropped
        mask = 0xFFFFFFFF
        for t in wanted:
            mask &= ~(1 << t)
        return _SOL_RAW, _ICMP_FILTER, struct.pack("I", mask)
    words = [0xFFFFFFFF] * 8  # struct icmp6_filter: 256 bits, set = blocked
    for t in wanted:
        words[t >> 5] &= ~(1 << (t & 31))
    return socket.IPPROTO_ICMPV6, _ICMP6_FILTER, struct.pack("8I", *words)


class Liveness:
    """Data-plane liveness checks (see the module docstring). One per daemon or agent; use it from
    one event loop; ``async with Liveness() as lv`` or ``await lv.close()``.

    ``icmp``: ``"raw"``, ``"dgram"`` (ping sockets) or ``"auto"`` (raw, else ping sockets).
    ``idle_timeout``: how long a namespace's sockets stay open after its last check (0 = close
    at once); keep it above the watches' interval."""

    def __init__(self, *, icmp: str = "auto", idle_timeout: float = 5.0) -> None:
        if icmp not in ("auto", "raw", "dgram"):
            raise InvalidArgument(f"icmp must be 'auto', 'raw' or 'dgram', not {icmp!r}")
        if not (math.isfinite(idle_timeout) and idle_timeout >= 0):
            raise InvalidArgument(f"idle_timeout {idle_timeout!r} must be >= 0")
        self._kinds = {"auto": (socket.SOCK_RAW, socket.SOCK_DGRAM), "raw": (socket.SOCK_RAW,),
                       "dgram": (socket.SOCK_DGRAM,)}[icmp]
        self._idle_timeout = idle_timeout
        self._token = secrets.token_bytes(8)
        self._serial = 0
        self._namespaces: dict[str, _Namespace] = {}
        self._watches: set[Watch] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._own_ident: tuple[int, int] | None = None
        self._closed = False

    # ------------------------------------------------------------------ public

    async def check(self, netns: str | None, addresses: Sequence[str] = (), *,
                    ifname: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                    echoes: int = DEFAULT_ECHOES) -> LivenessResult:
        """Check once (see the module docstring). ``netns``: a name, a path, a ``file://`` URL or
        None (this process's namespace). A namespace that is gone is a dead result, never an
        exception; bad arguments raise InvalidArgument, and FailedPrecondition means the check
        cannot run (no ICMP socket allowed, or this checker is closed)."""
        path, addrs = self._arguments(netns, addresses, ifname, timeout, echoes)
        return await self._check(path, addrs, ifname, timeout, echoes)

    def watch(self, netns: str | None, addresses: Sequence[str] = (), *,
              ifname: str | None = None, interval: float = DEFAULT_INTERVAL,
              timeout: float = DEFAULT_TIMEOUT, echoes: int = DEFAULT_ECHOES,
              on_dead: Callable[[LivenessResult], object] | None = None,
              on_alive: Callable[[LivenessResult], object] | None = None) -> Watch:
        """Check every ``interval`` s (or right after a check that took longer) until cancelled;
        ``on_dead(result)`` once per alive → dead transition, ``on_alive(result)`` once per dead →
        alive (the connection starts alive). Callbacks are plain functions called on the event
        loop; an exception in one is logged. Call from a coroutine (it starts a task)."""
        path, addrs = self._arguments(netns, addresses, ifname, timeout, echoes)
        if not (isinstance(interval, int | float) and math.isfinite(interval) and interval > 0):
            raise InvalidArgument(f"liveness interval {interval!r} must be a positive number")
        w = Watch(self, path, addrs, ifname, interval, timeout, echoes, on_dead, on_alive)
        self._watches.add(w)
        return w

    def namespaces(self) -> list[str]:
        """Paths of the namespaces with open sockets (diagnostics, tests)."""
        return list(self._namespaces)

    def socket_count(self) -> int:
        """Open sockets, all namespaces together (diagnostics, tests)."""
        return sum(len(ns.sockets) + (ns.ctl is not None) for ns in self._namespaces.values())

    def watches(self) -> list[Watch]:
        return list(self._watches)

    async def close(self) -> None:
        """Stop every watch, end checks in flight (FailedPrecondition) and close every socket.
        Idempotent."""
        if self._closed:
            return
        self._closed = True
        watches = list(self._watches)
        for w in watches:
            w.cancel()
        for w in watches:
            await w.wait()
        for ns in list(self._namespaces.values()):
            self._evict(ns, None)

    async def __aenter__(self) -> Liveness:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ checks

    def _arguments(self, netns: str | None, addresses: Sequence[str], ifname: str | None,
                   timeout: float, echoes: int) -> tuple[str, list[_Addr]]:
        if self._closed:
            raise FailedPrecondition("the liveness checker is closed")
        path = os.path.normpath(_netns.parse_netns(netns))
        addrs = _parse_addresses(addresses)
        if ifname is not None:
            validate_ifname(ifname)
        if not addrs and not ifname:
            raise InvalidArgument("a liveness check needs addresses to ping or an interface name")
        _check_timing(timeout, echoes)
        return path, addrs

    async def _check(self, path: str, addrs: list[_Addr], ifname: str | None, timeout: float,
                     echoes: int) -> LivenessResult:
        if self._closed:
            raise FailedPrecondition("the liveness checker is closed")
        loop = self._bind_loop()
        try:
            ns = self._acquire(path)
        except _Gone as exc:
            return LivenessResult(False, str(exc))
        probe: _Probe | None = None
        try:
            targets = [self._target(ns, a, ifname) for a in addrs]
            if ifname is not None:
                reason = self._link_down(ns, ifname, carrier=not targets)
                if reason:
                    return LivenessResult(False, reason)
            if not targets:
                return LivenessResult(True)
            probe = _Probe(loop.create_future(), targets, timeout, echoes, loop.time(),
                           left=len(targets))
            self._round(probe)
            return await probe.future
        except _Gone as exc:
            self._evict(ns, str(exc))
            return LivenessResult(False, str(exc))
        finally:
            if probe is not None:
                self._finish(probe)
            self._release(ns)

    def _ioctl_fd(self, ns: _Namespace) -> int:
        """A socket in ``ns`` for interface ioctls: an ICMP one if open, else one of its own."""
        for isock in ns.sockets.values():
            return isock.sock.fileno()
        if ns.ctl is None:
            ns.ctl = self._in_netns(ns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        return ns.ctl.fileno()

    def _link_down(self, ns: _Namespace, ifname: str, *, carrier: bool) -> str:
        """Why the interface cannot carry traffic ("" when it is present and up). ``carrier``:
        ask the driver too (ETHTOOL_GLINK takes the kernel's global RTNL lock, which a namespace
        being destroyed can hold for many milliseconds: only when there is nothing to ping)."""
        fd = self._ioctl_fd(ns)
        try:
            flags = _netns.interface_flags(fd, ifname)
            has_carrier = _netns.interface_carrier(fd, ifname) if flags and carrier else None
        except OSError as exc:
            return f"cannot read interface {ifname} in {ns.path}: {_errno_text(exc)}"
        if flags is None:
            return f"interface {ifname} not found in {ns.path}"
        if not flags & _netns.IFF_UP:
            return f"interface {ifname} in {ns.path} is down"
        if has_carrier is False:  # at once; IFF_RUNNING follows up to 1 s later
            return f"interface {ifname} in {ns.path} has no carrier"
        if not flags & _netns.IFF_RUNNING:
            return f"interface {ifname} in {ns.path} is operationally down"
        return ""

    def _target(self, ns: _Namespace, addr: _Addr, ifname: str | None) -> _Target:
        isock = ns.sockets.get(addr.family.family)
        if isock is None:
            isock = self._open_icmp(ns, addr.family)
        if addr.family is _V4:
            return _Target(addr, isock, (addr.ip, 0))
        scope = 0
        if addr.link_local and ifname is not None:
            with contextlib.suppress(OSError):  # no interface: the send fails and says so
                scope = _netns.interface_index(isock.sock.fileno(), ifname) or 0
        return _Target(addr, isock, (addr.ip, 0, 0, scope))

    def _round(self, probe: _Probe) -> None:
        """Send one echo to every address that has not answered yet; schedule what comes next."""
        probe.timer = None
        if probe.future.done():
            return
        loop = self._bind_loop()
        for t in probe.targets:
            if not t.answered:
                failure = self._send(probe, t, loop.time())
                if failure:
                    self._resolve(probe, False, f"{t.addr.ip}: {failure}")
                    return
        probe.round += 1
        if probe.round < probe.echoes:
            when = probe.started + probe.round * probe.timeout / probe.echoes
            probe.timer = loop.call_at(when, self._round, probe)
        else:
            probe.timer = loop.call_at(probe.started + probe.timeout, self._expire, probe)

    def _send(self, probe: _Probe, t: _Target, now: float) -> str:
        isock = t.isock
        seq = isock.seq()
        self._serial += 1
        payload = self._token + self._serial.to_bytes(8, "big")
        if isock.raw and isock.fam is _V4:
            packet = echo_request(isock.ident, seq, payload)
        else:  # the kernel fills in the checksum (ICMPv6 raw, ping sockets) and the id (ping)
            packet = struct.pack("!BBHHH", isock.fam.request, 0, 0, isock.ident, seq) + payload
        probe.sent += 1
        try:
            isock.sock.sendto(packet, t.sockaddr)
        except (BlockingIOError, InterruptedError):
            return ""  # socket buffer full: this echo is lost, the next may go
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:
                return ""
            return f"cannot send: {_errno_text(exc)}"
        isock.pending[seq] = _Echo(probe, t, payload, now)
        t.seqs.append(seq)
        return ""

    def _expire(self, probe: _Probe) -> None:
        """The timeout: count what is already queued (the loop may be late), then decide."""
        probe.timer = None
        for isock in {id(t.isock): t.isock for t in probe.targets}.values():
            self._read(isock)
        if probe.future.done():
            return
        missing = [t for t in probe.targets if not t.answered]
        reason = (f"no reply from {', '.join(t.addr.ip for t in missing)} within "
                  f"{probe.timeout:g} s ({probe.echoes} echo{'es' if probe.echoes > 1 else ''})")
        notes = [f"{t.addr.ip}: {t.note}" for t in missing if t.note]
        self._resolve(probe, False, "; ".join([reason, *notes]))

    def _resolve(self, probe: _Probe, alive: bool, reason: str = "") -> None:
        if probe.future.done():
            return
        rtt = max(t.rtt for t in probe.targets) * 1000 if alive else None
        probe.future.set_result(LivenessResult(alive, reason, rtt, probe.sent,
                                               probe.sent - probe.replies))
        if probe.timer is not None:
            probe.timer.cancel()
            probe.timer = None

    def _finish(self, probe: _Probe) -> None:
        if probe.timer is not None:
            probe.timer.cancel()
            probe.timer = None
        for t in probe.targets:
            for seq in t.seqs:
                echo = t.isock.pending.get(seq)
                if echo is not None and echo.probe is probe:
                    del t.isock.pending[seq]
            t.seqs.clear()

    # ------------------------------------------------------------------ replies

    def _read(self, isock: _IcmpSocket) -> None:
        if isock.sock.fileno() < 0:
            return
        for _ in range(_READ_BURST):
            try:
                data, addr = isock.sock.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # a pending error reported on the socket; the queue is still there
                continue
            self._received(isock, data, addr[0])

    def _received(self, isock: _IcmpSocket, data: bytes, src: str) -> None:
        fam = isock.fam
        off = (data[0] & 0x0F) * 4 if isock.raw and fam.raw_ip_header and data else 0
        if len(data) < off + 8:
            return
        kind, code, _, ident, seq = struct.unpack_from("!BBHHH", data, off)
        if kind == fam.reply:
            echo = isock.pending.get(seq)
            if (echo is None or (isock.raw and ident != isock.ident)
                    or data[off + 8:off + 8 + _PAYLOAD] != echo.payload
                    or src != echo.target.addr.ip):
                return  # another checker's, a stale one, or a forged one
            del isock.pending[seq]
            probe, t = echo.probe, echo.target
            probe.replies += 1
            if not t.answered:
                t.answered = True
                t.rtt = self._bind_loop().time() - echo.sent_at
                probe.left -= 1
                if probe.left == 0:
                    self._resolve(probe, True)
        elif kind in fam.errors and isock.raw:
            # The error quotes our echo: its IP header, then its first bytes (type, id, seq).
            inner = off + 8
            if fam.raw_ip_header:
                inner += (data[inner] & 0x0F) * 4 if len(data) > inner else 0
            else:
                inner += 40
            if len(data) < inner + 8:
                return
            ikind, _, _, iident, iseq = struct.unpack_from("!BBHHH", data, inner)
            echo = isock.pending.get(iseq)
            if ikind == fam.request and iident == isock.ident and echo is not None:
                detail = _UNREACHABLE.get((fam.family, code)) if kind == fam.unreachable else None
                what = f"{fam.errors[kind]} ({detail})" if detail else fam.errors[kind]
                echo.target.note = f"{what} from {src}"

    # ------------------------------------------------------------------ namespaces and sockets

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise FailedPrecondition("a Liveness belongs to the event loop that first used it")
        return loop

    def _acquire(self, path: str) -> _Namespace:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            ns = self._namespaces.get(path)
            if ns is not None:
                self._evict(ns, f"network namespace {path} is gone")
            raise _Gone(f"network namespace {path} is gone") from None
        except OSError as exc:
            raise _Gone(f"network namespace {path}: {_errno_text(exc)}") from None
        ident = (st.st_dev, st.st_ino)
        ns = self._namespaces.get(path)
        if ns is not None and ns.ident != ident:
            self._evict(ns, f"network namespace {path} was replaced")
            raise _Gone(f"network namespace {path} was replaced")
        if ns is None:
            ns = self._namespaces[path] = _Namespace(path, ident)
        ns.users += 1
        if ns.linger is not None:
            ns.linger.cancel()
            ns.linger = None
        return ns

    def _release(self, ns: _Namespace) -> None:
        ns.users -= 1
        if ns.users > 0 or ns.closed:
            return
        if self._idle_timeout == 0:
            self._evict(ns, None)
        else:
            ns.linger = self._bind_loop().call_later(self._idle_timeout, self._idle, ns)

    def _idle(self, ns: _Namespace) -> None:
        ns.linger = None
        if ns.users == 0:
            self._evict(ns, None)

    def _in_netns(self, ns: _Namespace, make: Callable[[], T]) -> T:
        """``make()`` with this thread in ``ns`` (synchronous: nothing else runs meanwhile)."""
        try:
            fd = _netns.open_netns(ns.path)
        except (NotFound, InvalidArgument) as exc:
            raise _Gone(str(exc)) from None
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != ns.ident:
                raise _Gone(f"network namespace {ns.path} was replaced")
            if self._own_ident is None:
                own = os.stat("/proc/thread-self/ns/net")
                self._own_ident = (own.st_dev, own.st_ino)
            if ns.ident == self._own_ident:
                return make()
            with _netns.entered_netns(fd):
                return make()
        finally:
            os.close(fd)

    def _open_icmp(self, ns: _Namespace, fam: _Family) -> _IcmpSocket:
        errors: list[str] = []

        def make() -> tuple[socket.socket, bool]:
            for kind in self._kinds:
                try:
                    return socket.socket(fam.family, kind, fam.proto), kind == socket.SOCK_RAW
                except OSError as exc:
                    errors.append(f"{'raw' if kind == socket.SOCK_RAW else 'ping'} socket: "
                                  f"{_errno_text(exc)}")
            raise FailedPrecondition(
                f"cannot open an ICMP socket in {ns.path} ({'; '.join(errors)}): a raw socket "
                f"needs CAP_NET_RAW, a ping socket a group in net.ipv4.ping_group_range")

        sock, raw = self._in_netns(ns, make)
        try:
            sock.setblocking(False)
            if raw:
                sock.setsockopt(*_filter(fam))
            isock = _IcmpSocket(ns, fam, sock, raw, secrets.randbits(16), secrets.randbits(16))
            self._bind_loop().add_reader(sock.fileno(), self._read, isock)
        except BaseException:
            sock.close()
            raise
        ns.sockets[fam.family] = isock
        log.debug("liveness socket opened", netns=ns.path, family=fam.family.name,
                  kind="raw" if raw else "ping")
        return isock

    def _evict(self, ns: _Namespace, reason: str | None) -> None:
        """Close the namespace's sockets; checks in flight there end dead with ``reason`` (or
        FailedPrecondition when this checker is closing)."""
        if ns.closed:
            return
        ns.closed = True
        if self._namespaces.get(ns.path) is ns:
            del self._namespaces[ns.path]
        if ns.linger is not None:
            ns.linger.cancel()
            ns.linger = None
        for isock in ns.sockets.values():
            for echo in list(isock.pending.values()):
                if echo.probe.future.done():
                    continue
                if reason is None:
                    echo.probe.future.set_exception(
                        FailedPrecondition("the liveness checker is closed"))
                else:
                    self._resolve(echo.probe, False, reason)
            isock.pending.clear()
            with contextlib.suppress(Exception):
                if self._loop is not None and isock.sock.fileno() >= 0:
                    self._loop.remove_reader(isock.sock.fileno())
            isock.sock.close()
        ns.sockets.clear()
        if ns.ctl is not None:
            ns.ctl.close()
            ns.ctl = None
        log.debug("liveness sockets closed", netns=ns.path, reason=reason or "idle")


class Watch:
    """A periodic liveness check of one connection (made by :meth:`Liveness.watch`).

    ``alive`` is the current state, ``last`` the last result, ``checks`` how many ran."""

    def __init__(self, liveness: Liveness, path: str, addrs: list[_Addr], ifname: str | None,
                 interval: float, timeout: float, echoes: int,
                 on_dead: Callable[[LivenessResult], object] | None,
                 on_alive: Callable[[LivenessResult], object] | None) -> None:
        self.netns = path
        self.addresses = tuple(a.ip for a in addrs)
        self.ifname = ifname
        self.interval = interval
        self.alive = True
        self.last: LivenessResult | None = None
        self.checks = 0
        self._liveness = liveness
        self._addrs = addrs
        self._timeout = timeout
        self._echoes = echoes
        self._on_dead = on_dead
        self._on_alive = on_alive
        self._task = asyncio.get_running_loop().create_task(self._run(),
                                                            name=f"liveness watch {path}")
        self._task.add_done_callback(lambda _: liveness._watches.discard(self))

    def cancel(self) -> None:
        """Stop (the check in flight ends at once and its echoes are forgotten)."""
        self._task.cancel()

    async def wait(self) -> None:
        """Wait until the watch has stopped (after :meth:`cancel`)."""
        try:
            await asyncio.shield(self._task)
        except asyncio.CancelledError:
            if not self._task.done():  # the caller was cancelled, not the watch
                raise

    async def stop(self) -> None:
        self.cancel()
        await self.wait()

    def done(self) -> bool:
        return self._task.done()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        failing = ""
        while True:
            start = loop.time()
            try:
                result = await self._liveness._check(self.netns, self._addrs, self.ifname,
                                                     self._timeout, self._echoes)
            except NsmError as exc:  # the check cannot run (no ICMP socket allowed, closed)
                if str(exc) != failing:
                    log.warning("liveness check cannot run", netns=self.netns, error=str(exc))
                    failing = str(exc)
            else:
                failing = ""
                self._update(result)
            await asyncio.sleep(max(0.0, start + self.interval - loop.time()))

    def _update(self, result: LivenessResult) -> None:
        self.checks += 1
        self.last = result
        if result.alive == self.alive:
            return
        self.alive = result.alive
        if result.alive:
            log.info("data plane alive again", netns=self.netns, rtt_ms=result.rtt_ms)
            callback = self._on_alive
        else:
            log.info("data plane dead", netns=self.netns, reason=result.reason)
            callback = self._on_dead
        if callback is not None:
            try:
                callback(result)
            except Exception:
                log.error("liveness callback failed", exc_info=True, netns=self.netns)

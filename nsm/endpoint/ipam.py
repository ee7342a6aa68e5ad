"""ipam: point-to-point address management for an endpoint (IPv4 or IPv6).

Each connection gets a pair of host addresses from the endpoint's CIDR: the first free one for
the endpoint (``dst_ip_addrs``), the next free one for the client (``src_ip_addrs``), plus a
host route to the other end on each side (``src_routes=[dst/32]``, ``dst_routes=[src/32]``).

- A refresh keeps the pair (per-connection metadata). A request that arrives without metadata
  (e.g. after an endpoint restart) but carries a pair from this CIDR keeps it when still free.
- The pair is released on Close, and when a first Request fails further down the chain.
- ``excluded_prefixes`` of the request's IP context are never handed out.
- For IPv4 prefixes shorter than /31 the network and broadcast addresses are skipped; for IPv6
  prefixes shorter than /127 the subnet-router anycast address (the first one) is skipped.

Free addresses are kept as a sorted list of disjoint integer ranges, so a /8 or a /64 costs a
few ranges, not millions of entries; allocation takes the lowest free address.
"""

from __future__ import annotations

import bisect
import ipaddress
from collections.abc import Iterable, MutableSequence
from dataclasses import dataclass

from google.protobuf.internal.containers import RepeatedCompositeFieldContainer

from nsm.api.connection_pb2 import Connection
from nsm.api.connectioncontext_pb2 import IPContext, Route
from nsm.api.networkservice_pb2 import NetworkServiceRequest
from nsm.chain import Ctx, Element, Key, NextClose, NextRequest
from nsm.errors import InvalidArgument, ResourceExhausted

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_cidr(cidr: str) -> IPNetwork:
    """Parse a CIDR such as ``10.0.0.0/24`` or ``fd00::/64`` (host bits are not allowed)."""
    if not isinstance(cidr, str) or not cidr.strip():
        raise InvalidArgument("CIDR is empty")
    text = cidr.strip()
    if "/" not in text:
        raise InvalidArgument(f"CIDR {cidr!r} has no prefix length (e.g. 10.0.0.0/24)")
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise InvalidArgument(f"invalid CIDR {cidr!r}: {exc}") from exc


@dataclass(frozen=True, slots=True)
class Pair:
    """The two addresses of one connection: ``dst`` for the endpoint, ``src`` for the client."""

    dst: IPAddress
    src: IPAddress


class Pool:
    """The free host addresses of one CIDR, as sorted disjoint ``[start, end)`` integer ranges."""

    def __init__(self, network: IPNetwork) -> None:
        self.network = network
        first, last = int(network.network_address), int(network.broadcast_address)
        if network.version == 4 and network.prefixlen < 31:
            first, last = first + 1, last - 1
        elif network.version == 6 and network.prefixlen < 127:
            first += 1
        self.size = max(0, last - first + 1)
        self._starts: list[int] = [first] if self.size else []
        self._ends: list[int] = [last + 1] if self.size else []
        self._used: set[int] = set()

    def __contains__(self, addr: IPAddress) -> bool:
        return addr in self.network

    @property
    def used(self) -> int:
        return len(self._used)

    def is_free(self, value: int) -> bool:
        i = bisect.bisect_right(self._starts, value) - 1
        return i >= 0 and value < self._ends[i]

    def take(self, excluded: list[tuple[int, int]]) -> int | None:
        """Take the lowest free address outside ``excluded`` (sorted ``[start, end)`` ranges)."""
        for start, end in zip(self._starts, self._ends, strict=True):
            candidate = start
            for ex_start, ex_end in excluded:
                if ex_end <= candidate:
                    continue
                if ex_start > candidate:
                    break
                candidate = ex_end  # inside an excluded range: jump past it
            if candidate < end:
                self.claim(candidate)
                return candidate
        return None

    def claim(self, value: int) -> bool:
        """Mark ``value`` used if it is free; return whether it was."""
        i = bisect.bisect_right(self._starts, value) - 1
        if i < 0 or value >= self._ends[i]:
            return False
        start, end = self._starts[i], self._ends[i]
        if start == value and end == value + 1:
            del self._starts[i], self._ends[i]
        elif start == value:
            self._starts[i] = value + 1
        elif end == value + 1:
            self._ends[i] = value
        else:
            self._ends[i] = value
            self._starts.insert(i + 1, value + 1)
            self._ends.insert(i + 1, end)
        self._used.add(value)
        return True

    def release(self, value: int) -> None:
        if value not in self._used:
            return
        self._used.discard(value)
        i = bisect.bisect_right(self._starts, value)  # first range starting after value
        joins_prev = i > 0 and self._ends[i - 1] == value
        joins_next = i < len(self._starts) and self._starts[i] == value + 1
        if joins_prev and joins_next:
            self._ends[i - 1] = self._ends[i]
            del self._starts[i], self._ends[i]
        elif joins_prev:
            self._ends[i - 1] = value + 1
        elif joins_next:
            self._starts[i] = value
        else:
            self._starts.insert(i, value)
            self._ends.insert(i, value + 1)


class PointToPointIPAM(Element):
    """Hands each connection a /32 (/128) pair from ``cidr``."""

    def __init__(self, cidr: str | IPNetwork) -> None:
        self.network = cidr if isinstance(cidr, IPNetwork) else parse_cidr(cidr)
        self._pool = Pool(self.network)
        if self._pool.size < 2:
            raise InvalidArgument(
                f"CIDR {self.network} has room for no connection (each needs 2 addresses)")
        self._host = 32 if self.network.version == 4 else 128
        self._key: Key[Pair] = Key(f"ipam.pair:{self.network}")  # per instance: IPAMs can be chained
        self._pairs = 0

    @property
    def cidr(self) -> str:
        return str(self.network)

    @property
    def connections(self) -> int:
        """Connections holding a pair."""
        return self._pairs

    @property
    def free(self) -> int:
        return self._pool.size - self._pool.used

    # -- allocation -------------------------------------------------------------------------

    def _excluded(self, prefixes: Iterable[str]) -> list[tuple[int, int]]:
        ranges = []
        for text in prefixes:
            try:
                net = ipaddress.ip_network(text, strict=False)
            except ValueError as exc:
                raise InvalidArgument(f"excluded prefix {text!r} is not a CIDR: {exc}") from exc
            if net.version == self.network.version and net.overlaps(self.network):
                ranges.append((int(net.network_address), int(net.broadcast_address) + 1))
        ranges.sort()
        return ranges

    @staticmethod
    def _inside(value: int, excluded: list[tuple[int, int]]) -> bool:
        return any(start <= value < end for start, end in excluded)

    def _allocate(self, excluded: list[tuple[int, int]]) -> Pair:
        dst = self._pool.take(excluded)
        src = self._pool.take(excluded) if dst is not None else None
        if dst is None or src is None:
            if dst is not None:
                self._pool.release(dst)
            raise ResourceExhausted(f"CIDR {self.network} exhausted: {self._pairs} connections")
        self._pairs += 1
        return Pair(dst=self._addr(dst), src=self._addr(src))

    def _recover(self, ip: IPContext, excluded: list[tuple[int, int]]) -> Pair | None:
        """Re-claim the pair a request already carries, when it is ours and free."""
        dst = self._own_single(ip.dst_ip_addrs)
        src = self._own_single(ip.src_ip_addrs)
        if dst is None or src is None or dst == src:
            return None
        d, s = int(dst), int(src)
        if self._inside(d, excluded) or self._inside(s, excluded):
            return None
        if not (self._pool.is_free(d) and self._pool.is_free(s)):
            return None
        self._pool.claim(d)
        self._pool.claim(s)
        self._pairs += 1
        return Pair(dst=dst, src=src)

    def _own_single(self, addrs: Iterable[str]) -> IPAddress | None:
        for text in addrs:
            addr = _address(text)
            if addr is not None and addr.version == self.network.version and addr in self.network:
                return addr
        return None

    def _release(self, pair: Pair) -> None:
        self._pool.release(int(pair.dst))
        self._pool.release(int(pair.src))
        self._pairs -= 1

    def _addr(self, value: int) -> IPAddress:
        return type(self.network.network_address)(value)

    # -- the chain --------------------------------------------------------------------------

    async def request(self, ctx: Ctx, request: NetworkServiceRequest, next: NextRequest) -> Connection:
        ip = request.connection.context.ip_context
        excluded = self._excluded(ip.excluded_prefixes)
        pair = ctx.meta.get(self._key)
        fresh = False
        if pair is not None and any(self._inside(int(a), excluded) for a in (pair.dst, pair.src)):
            ctx.log.info("IPAM pair now excluded by the client: reallocating",
                         dst=str(pair.dst), src=str(pair.src))
            self._release(pair)
            ctx.meta.pop(self._key)
            pair = None
        if pair is None:
            pair = self._recover(ip, excluded) or self._allocate(excluded)
            fresh = True
            ctx.meta.set(self._key, pair)
        self._apply(ip, pair)
        try:
            return await next(ctx, request)
        except BaseException:
            if fresh:
                ctx.meta.pop(self._key)
                self._release(pair)
            raise

    async def close(self, ctx: Ctx, conn: Connection, next: NextClose) -> None:
        try:
            await next(ctx, conn)
        finally:
            pair = ctx.meta.pop(self._key)
            if pair is not None:
                self._release(pair)

    def _apply(self, ip: IPContext, pair: Pair) -> None:
        """Write the pair into the IP context. Addresses of this family that are not the pair
        (another endpoint's after a reselect, stale ones) are replaced, with their host routes;
        the other family is left alone, so an IPv4 and an IPv6 IPAM can be chained."""
        version = self.network.version
        dst = f"{pair.dst}/{self._host}"
        src = f"{pair.src}/{self._host}"
        old_dst = _replace_addrs(ip.dst_ip_addrs, version, dst)
        old_src = _replace_addrs(ip.src_ip_addrs, version, src)
        _replace_routes(ip.src_routes, old_dst, dst)
        _replace_routes(ip.dst_routes, old_src, src)


def _address(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_interface(text).ip
    except ValueError:
        return None


def _host_route(prefix: str) -> IPAddress | None:
    """The address a host route (``a.b.c.d/32``, ``x::y/128``) points at, else None."""
    try:
        net = ipaddress.ip_network(prefix, strict=False)
    except ValueError:
        return None
    return net.network_address if net.prefixlen == net.max_prefixlen else None


def _replace_addrs(addrs: MutableSequence[str], version: int, want: str) -> set[IPAddress]:
    """Put ``want`` first in ``addrs`` instead of every address of ``version``; return those."""
    removed: set[IPAddress] = set()
    keep = []
    for text in addrs:
        addr = _address(text)
        if addr is not None and addr.version == version:
            removed.add(addr)
        else:
            keep.append(text)
    del addrs[:]
    addrs.append(want)
    addrs.extend(keep)
    return removed


def _replace_routes(routes: RepeatedCompositeFieldContainer[Route], removed: set[IPAddress],
                    prefix: str) -> None:
    """Drop host routes to ``removed`` addresses, keep every other route, and add ours."""
    kept = []
    for route in routes:
        if route.prefix == prefix or _host_route(route.prefix) in removed:
            continue
        copy = Route()
        copy.CopyFrom(route)
        kept.append(copy)
    del routes[:]
    routes.add(prefix=prefix)
    routes.extend(kept)

"""Bad input found by fuzzing, each element alone: a path segment's ``expires`` outside the
Timestamp range, malformed addresses and prefixes on the wire, unix socket paths longer than a
socket address holds, and a failed listen that must leave no directory behind. Every case is
INVALID_ARGUMENT (or FAILED_PRECONDITION for the listen) with a message naming the field —
never a ``ValueError`` from protobuf or :mod:`ipaddress`."""

from __future__ import annotations

import os
import re
import stat
import time
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from nsm.addresses import check_interface, check_ip, check_prefix
from nsm.api.connection_pb2 import Connection, Mechanism
from nsm.api.networkservice_pb2 import NetworkServiceRequest
from nsm.chain import Chain, Ctx, Element, NextClose, NextRequest
from nsm.elements.updatepath import UpdatePath, ts
from nsm.elements.validate import Validate
from nsm.errors import FailedPrecondition, InvalidArgument, NsmError
from nsm.forwarder.mechanism import PAIR, UPSTREAM
from nsm.forwarder.vxlan import Leftovers, TablePool, Tunnel, VniPool, VxlanClient, VxlanServer, mac_for
from nsm.log import get_logger
from nsm.mechanisms import DST_IP, DST_MAC, VNI, kernel, vxlan
from nsm.transport import UNIX_PATH_MAX, Server, parse_url

pytestmark = pytest.mark.timeout(20)

#: The range of a protobuf Timestamp (0001-01-01T00:00:00Z ..= 9999-12-31T23:59:59.999999999Z).
TS_MIN_SECONDS, TS_MAX_SECONDS = -62135596800, 253402300799
NETNS = "file:///proc/self/ns/net"  # an existing namespace path: nothing here programs it


def request(*, expires: tuple[int, int] | None = None) -> NetworkServiceRequest:
    """A first Request as a client sends it: its own segment (index 0), one KERNEL preference."""
    r = NetworkServiceRequest(connection=Connection(id="c1", network_service="svc"))
    segment = r.connection.path.path_segments.add(name="nsc", id="c1")
    if expires is None:
        segment.expires.CopyFrom(ts(time.time() + 60))
    else:
        segment.expires.seconds, segment.expires.nanos = expires
    r.mechanism_preferences.append(kernel("nsm-1", NETNS))
    return r


class Tail(Element):
    """Records what reaches the end of the chain."""

    def __init__(self) -> None:
        self.seen: list[Connection] = []

    async def request(self, ctx: Ctx, request: NetworkServiceRequest, next: NextRequest) -> Connection:
        self.seen.append(request.connection)
        return await next(ctx, request)


def hop() -> tuple[Chain, Tail]:
    tail = Tail()
    return Chain([Validate(), UpdatePath("mgr", lifetime=600), tail]), tail


# -- expires: the Timestamp range ---------------------------------------------------------------

#: (seconds, nanos) of the client's segment, and whether a hop accepts it.
TIMESTAMP_EDGES: list[tuple[str, int, int, bool]] = [
    ("min", TS_MIN_SECONDS, 0, True),
    ("one-before-min", TS_MIN_SECONDS - 1, 999_999_999, False),
    ("max", TS_MAX_SECONDS, 999_999_999, True),
    ("one-after-max", TS_MAX_SECONDS + 1, 0, False),
    ("far-future", 10**15, 0, False),
    ("nanos-zero", 1_700_000_000, 0, True),
    ("nanos-max", 1_700_000_000, 999_999_999, True),
    ("nanos-negative", 1_700_000_000, -1, False),
    ("nanos-one-second", 1_700_000_000, 1_000_000_000, False),
]


@pytest.mark.parametrize(("case", "seconds", "nanos", "ok"), TIMESTAMP_EDGES,
                         ids=[c[0] for c in TIMESTAMP_EDGES])
async def test_expires_at_the_timestamp_limits(case: str, seconds: int, nanos: int, ok: bool) -> None:
    chain, tail = hop()
    r = request(expires=(seconds, nanos))
    if not ok:
        with pytest.raises(InvalidArgument) as info:
            await chain.request(r)
        assert "nsc" in info.value.message and "expires" in info.value.message
        assert "outside" in info.value.message
        assert tail.seen == []
        return
    await chain.request(r)
    (seen,) = tail.seen
    own = seen.path.path_segments[1].expires
    assert own.seconds <= time.time() + 601  # never beyond this hop's lifetime
    if 0 < seconds < time.time() + 600:
        assert (own.seconds, own.nanos) == (seconds, nanos)  # the caller's, exactly


async def test_expires_out_of_range_on_any_segment_is_refused() -> None:
    """Not only the previous hop's: every segment the Request carries."""
    chain, tail = hop()
    r = request()
    later = r.connection.path.path_segments.add(name="far", id="x")
    later.expires.seconds = TS_MAX_SECONDS + 1
    with pytest.raises(InvalidArgument, match="'far' expires"):
        await chain.request(r)
    assert tail.seen == []


def test_ts_refuses_what_a_timestamp_cannot_hold() -> None:
    assert ts(TS_MAX_SECONDS + 0.5).seconds == TS_MAX_SECONDS
    assert ts(TS_MIN_SECONDS).seconds == TS_MIN_SECONDS
    for bad in (TS_MAX_SECONDS + 1.0, TS_MIN_SECONDS - 1.0, float("inf"), float("nan"), 1e300):
        with pytest.raises(InvalidArgument, match="range of a Timestamp"):
            ts(bad)


async def test_a_huge_lifetime_is_capped_at_the_timestamp_range() -> None:
    tail = Tail()
    chain = Chain([Validate(), UpdatePath("mgr", lifetime=1e300), tail])
    await chain.request(request(expires=(TS_MAX_SECONDS, 999_999_999)))
    assert tail.seen[0].path.path_segments[1].expires == Timestamp(seconds=TS_MAX_SECONDS)


# -- addresses and prefixes -------------------------------------------------------------------


def _ip(field: str, value: str) -> Any:
    def apply(r: NetworkServiceRequest) -> None:
        getattr(r.connection.context.ip_context, field).append(value)
    return apply


def _route(field: str, prefix: str, next_hop: str = "") -> Any:
    def apply(r: NetworkServiceRequest) -> None:
        getattr(r.connection.context.ip_context, field).add(prefix=prefix, nextHop=next_hop)
    return apply


def _vxlan_pref(**params: str) -> Any:
    def apply(r: NetworkServiceRequest) -> None:
        m = vxlan("10.0.0.1")
        m.parameters.update(params)
        r.mechanism_preferences.insert(0, m)
    return apply


def _selected(**params: str) -> Any:
    def apply(r: NetworkServiceRequest) -> None:
        m = vxlan("10.0.0.1")
        m.parameters.update(params)
        r.connection.mechanism.CopyFrom(m)
    return apply


#: case → (how to spoil a good Request, a fragment the message must contain).
BAD_ADDRESSES: dict[str, tuple[Any, str]] = {
    "src-addr-empty": (_ip("src_ip_addrs", ""), "ip_context.src_ip_addrs entry is empty"),
    "dst-addr-empty": (_ip("dst_ip_addrs", ""), "ip_context.dst_ip_addrs entry is empty"),
    "src-addr-garbage": (_ip("src_ip_addrs", "10.0.0.300/32"), "'10.0.0.300/32' is not an IP"),
    "dst-addr-bad-len": (_ip("dst_ip_addrs", "fd00::1/129"), "ip_context.dst_ip_addrs"),
    "addr-with-zone": (_ip("src_ip_addrs", "fe80::1%eth0"), "has a zone"),
    "src-route-empty": (_route("src_routes", ""), "ip_context.src_routes prefix is empty"),
    "dst-route-garbage": (_route("dst_routes", "default"), "'default' is not an IP prefix"),
    "route-next-hop-bad": (_route("src_routes", "0.0.0.0/0", "gw"), "src_routes nextHop 'gw'"),
    "excluded-empty": (_ip("excluded_prefixes", ""), "ip_context.excluded_prefixes entry is empty"),
    "excluded-garbage": (_ip("excluded_prefixes", "10/8/8"), "excluded_prefixes entry '10/8/8'"),
    "vxlan-src-ip-empty": (_vxlan_pref(src_ip=""), "VXLAN mechanism parameter src_ip is empty"),
    "vxlan-dst-ip-bad": (_vxlan_pref(dst_ip="node2"), "parameter dst_ip 'node2' is not an IP"),
    "selected-dst-ip-empty": (_selected(dst_ip=""), "parameter dst_ip is empty"),
}

GOOD_ADDRESSES = [
    _ip("src_ip_addrs", "10.0.0.2/32"), _ip("src_ip_addrs", "fd00::2/128"),
    _ip("dst_ip_addrs", "10.0.0.1"), _route("src_routes", "10.0.0.1/32"),
    _route("dst_routes", "0.0.0.0/0", "10.0.0.2"), _route("dst_routes", "10.1.2.3/8"),
    _ip("excluded_prefixes", "10.0.0.0/8"), _vxlan_pref(dst_ip="fd00::9"),
]


@pytest.mark.parametrize("case", sorted(BAD_ADDRESSES))
async def test_a_malformed_address_is_invalid_argument_at_validate(case: str) -> None:
    spoil, fragment = BAD_ADDRESSES[case]
    chain, tail = hop()
    r = request()
    spoil(r)
    with pytest.raises(InvalidArgument) as info:
        await chain.request(r)
    assert fragment in info.value.message, info.value.message
    assert tail.seen == []


async def test_well_formed_addresses_pass() -> None:
    chain, tail = hop()
    r = request()
    for apply in GOOD_ADDRESSES:
        apply(r)
    await chain.request(r)
    assert len(tail.seen) == 1


def test_address_helpers_name_the_field() -> None:
    assert str(check_ip("fd00::1", "x")) == "fd00::1"
    assert str(check_interface("10.0.0.1", "x")) == "10.0.0.1/32"
    assert str(check_prefix("10.1.2.3/8", "x")) == "10.0.0.0/8"
    for check in (check_ip, check_interface, check_prefix):
        with pytest.raises(InvalidArgument, match=r"^the field is empty$"):
            check("", "the field")
        with pytest.raises(InvalidArgument, match=r"^the field 'nope' is not an IP"):
            check("nope", "the field")


# -- the remote path: an endpoint's answer with a malformed address builds nothing -----------


class NoKernel:
    """A netlink stand-in that allows only looking a link up: anything that would build fails."""

    async def link(self, netns: str | None, name: str) -> None:
        return None


class Upstream(Element):
    def __init__(self, mech: Mechanism) -> None:
        self.mech = mech

    async def request(self, ctx: Ctx, request: NetworkServiceRequest, next: NextRequest) -> Connection:
        ctx.meta.set(UPSTREAM, self.mech)
        ctx.meta.set(PAIR, (self.mech.type, request.mechanism_preferences[0].type))
        return await next(ctx, request)


class Answer(Element):
    """The next hop: answers ``mechanism`` with an empty client address; records Closes."""

    def __init__(self, mechanism: Mechanism) -> None:
        self.mechanism = mechanism
        self.closes = 0

    async def request(self, ctx: Ctx, request: NetworkServiceRequest, next: NextRequest) -> Connection:
        conn = Connection()
        conn.CopyFrom(request.connection)
        conn.mechanism.CopyFrom(self.mechanism)
        if request.mechanism_preferences and VNI in request.mechanism_preferences[0].parameters:
            conn.mechanism.parameters[VNI] = request.mechanism_preferences[0].parameters[VNI]
        conn.context.ip_context.dst_ip_addrs.append("10.0.0.1/32")
        conn.context.ip_context.src_ip_addrs.append("")
        return conn

    async def close(self, ctx: Ctx, conn: Connection, next: NextClose) -> None:
        self.closes += 1
        await next(ctx, conn)


@pytest.mark.parametrize("side", ["server", "client"])
async def test_vxlan_half_refuses_a_malformed_address_from_the_next_hop(side: str) -> None:
    tunnel = Tunnel(ip="10.9.0.1", dev=None, mtu=1450)
    vnis, tables = VniPool(), TablePool()
    left = Leftovers(NoKernel(), "fwd", vnis, tables, grace=60.0, log=get_logger("test"))  # type: ignore[arg-type]
    if side == "server":
        up = vxlan("10.9.0.2", 5000, mac_for("vxlan", "peer"))
        element: Element = VxlanServer(NoKernel(), tunnel, vnis, tables, "fwd", left)  # type: ignore[arg-type]
        answer = Answer(kernel("nse-1", NETNS))
        prefs = [kernel()]
    else:
        up = kernel("nsm-1", NETNS)
        element = VxlanClient(NoKernel(), tunnel, vnis, tables, "fwd", left)  # type: ignore[arg-type]
        answer = Answer(vxlan("10.9.0.2"))
        answer.mechanism.parameters.update({DST_IP: "10.9.0.2", DST_MAC: mac_for("vxlan", "x")})
        prefs = [vxlan(tunnel.ip)]
    chain = Chain([Upstream(up), element, answer])
    r = request()
    del r.mechanism_preferences[:]
    r.mechanism_preferences.extend(prefs)
    with pytest.raises(InvalidArgument, match=re.escape("ip_context.src_ip_addrs entry is empty")):
        await chain.request(r)
    assert answer.closes == 1, "the next hop's half must be closed again"
    assert len(vnis) == 0 and len(tables) == 0


# -- unix socket paths and listening ------------------------------------------------------------


def test_parse_url_refuses_a_unix_path_longer_than_a_socket_address() -> None:
    fits = "/" + "a" * (UNIX_PATH_MAX - 1)
    assert parse_url(f"unix://{fits}").path == fits
    too_long = fits + "b"
    with pytest.raises(InvalidArgument, match=f"unix socket path is 108 bytes; at most {UNIX_PATH_MAX} "):
        parse_url(f"unix://{too_long}")
    multibyte = "/" + "é" * 60  # 121 bytes in 61 characters
    with pytest.raises(InvalidArgument, match="is 121 bytes"):
        parse_url(f"unix://{multibyte}")
    with pytest.raises(InvalidArgument, match="NUL"):
        parse_url("unix:///tmp/a\x00b")


async def test_a_failed_listen_removes_the_directories_it_made(tmp_path: Path) -> None:
    """The unix socket binds (in directories made for it), then a second URL cannot: the start
    fails and leaves neither the socket nor those directories — only what existed before."""
    made = tmp_path / "made" / "deeper"
    server = Server([f"unix://{made}/s.sock", "tcp://192.0.2.1:1"])  # TEST-NET: not ours
    with pytest.raises(FailedPrecondition, match=re.escape("cannot listen on tcp://192.0.2.1:1")):
        await server.start()
    assert os.listdir(tmp_path) == []
    await server.stop(None)  # still safe after a failed start
    assert os.listdir(tmp_path) == []


async def test_a_failed_listen_keeps_directories_that_existed(tmp_path: Path) -> None:
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "other").write_text("x")
    server = Server([f"unix://{tmp_path}/kept/new/s.sock", "tcp://192.0.2.1:1"])
    with pytest.raises(FailedPrecondition):
        await server.start()
    assert os.listdir(tmp_path / "kept") == ["other"]


async def test_a_listen_path_under_a_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    for url in (f"unix://{tmp_path}/file/s.sock", f"unix://{tmp_path}/file/a/s.sock"):
        server = Server([url])
        with pytest.raises(NsmError) as info:
            await server.start()
        assert isinstance(info.value, FailedPrecondition), info.value
        assert str(tmp_path / "file") in info.value.message
    assert os.listdir(tmp_path) == ["file"]


async def test_a_successful_listen_still_makes_its_directories(tmp_path: Path) -> None:
    server = Server([f"unix://{tmp_path}/a/b/s.sock"])
    await server.start()
    try:
        assert stat.S_ISSOCK(os.stat(tmp_path / "a" / "b" / "s.sock").st_mode)
    finally:
        await server.stop(None)
    assert os.listdir(tmp_path / "a" / "b") == []

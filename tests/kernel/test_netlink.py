"""nsm.kernel.netlink and nsm.kernel.netns against the real kernel, in namespaces the tests create."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import os
import random
import socket
import struct
import tempfile
import time

import pytest
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTM_NEWLINK

from nsm.errors import (
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    Unsupported,
)
from nsm.kernel import netns as nsmod
from nsm.kernel.netlink import LinkInfo, Netlink
from nsm.kernel.netlink import messages as nlmsg
from nsm.kernel.netlink import operations as nlops
from nsm.kernel.ping import checksum
from nsm.lab.harness import NetnsGroup

NetnsFactory = NetnsGroup

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(60)]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")


# ---------------------------------------------------------------------- traffic helpers
# (run inside a namespace through nsm.kernel.netns.run_in_netns; sockets keep their namespace for life)


def ping(dst: str, timeout: float = 3.0) -> bool:
    """One ICMP echo over a raw socket; True when the reply comes back."""
    ident, payload = random.randrange(1, 0xFFFF), os.urandom(16)
    header = struct.pack("!BBHHH", 8, 0, 0, ident, 1)
    packet = struct.pack("!BBHHH", 8, 0, checksum(header + payload), ident, 1) + payload
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
        s.settimeout(timeout)
        s.sendto(packet, (dst, 0))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data, (src, _) = s.recvfrom(2048)
            except TimeoutError:
                return False
            ihl = (data[0] & 0x0F) * 4
            kind, _, _, rid, _ = struct.unpack_from("!BBHHH", data, ihl)
            if src == dst and kind == 0 and rid == ident and data[ihl + 8:] == payload:
                return True
    return False


def listen(ip: str) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((ip, 0))
    s.listen(4)
    s.settimeout(5)
    return s


def connect(ip: str, port: int) -> socket.socket:
    return socket.create_connection((ip, port), timeout=5)


def tcp_echo(client_ns: str, server_ns: str, server_ip: str) -> bytes:
    """A TCP exchange: listener in server_ns, client in client_ns, echo in both directions."""
    lsock = nsmod.run_in_netns(server_ns, listen, server_ip)
    with lsock:
        csock = nsmod.run_in_netns(client_ns, connect, server_ip, lsock.getsockname()[1])
        with csock:
            conn, _ = lsock.accept()
            with conn:
                csock.sendall(b"hello through the veth")
                data = conn.recv(100)
                conn.sendall(data.upper())
                return csock.recv(100)


def scapy_ping(src: str, dst: str, iface: str) -> bool:
    from scapy.all import ICMP, IP, conf, sr1  # type: ignore[attr-defined]  # after setns

    conf.ifaces.reload()
    conf.route.resync()
    # src explicitly: scapy takes 0.0.0.0 for a route to a /32 outside the interface's prefix.
    answer = sr1(IP(src=src, dst=dst) / ICMP(id=0x4E53), iface=iface, timeout=3, verbose=0)
    return answer is not None and answer[ICMP].type == 0 and answer[IP].src == dst


def _exists(path: str) -> bool:
    return os.path.exists(path)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


# ---------------------------------------------------------------------- nsm.kernel.netns


@needs_root
def test_netns_create_delete_leaves_nothing(netns_factory: NetnsFactory) -> None:
    name = netns_factory.name("life")
    path = nsmod.create_netns(name)
    try:
        assert path == f"/var/run/netns/{name}"
        assert name in nsmod.list_netns()
        assert nsmod.netns_exists(name) and nsmod.netns_exists(path)
        fd = nsmod.open_netns(path)
        os.close(fd)
        assert nsmod.run_in_netns(path, lambda: [n for _, n in socket.if_nameindex()]) == ["lo"]
        with pytest.raises(AlreadyExists):
            nsmod.create_netns(name)
    finally:
        assert nsmod.delete_netns(name) is True
    assert nsmod.delete_netns(name) is False
    assert name not in nsmod.list_netns()
    assert not os.path.exists(path)
    with open("/proc/self/mountinfo") as f:
        assert path not in f.read()
    assert not nsmod.netns_exists(name)


@needs_root
def test_netns_names_and_paths_are_checked(netns_factory: NetnsFactory) -> None:
    for bad in ("", "a/b", "..", "x" * 300):
        with pytest.raises(InvalidArgument):
            nsmod.create_netns(bad)
    with pytest.raises(InvalidArgument):
        nsmod.create_netns("/tmp/somewhere")
    with pytest.raises(NotFound):
        nsmod.open_netns(f"/var/run/netns/{netns_factory.name('missing')}")
    with tempfile.NamedTemporaryFile() as f, pytest.raises(InvalidArgument):
        nsmod.open_netns(f.name)
    with pytest.raises(InvalidArgument):
        nsmod.open_netns("/tmp")


@needs_root
async def test_run_in_netns_thread_and_errors(netns_factory: NetnsFactory) -> None:
    ns = netns_factory("run")
    own = os.stat("/proc/thread-self/ns/net").st_ino
    inside = nsmod.run_in_netns(ns, lambda: os.stat("/proc/thread-self/ns/net").st_ino)
    assert inside == os.stat(ns).st_ino != own
    assert os.stat("/proc/thread-self/ns/net").st_ino == own  # the caller never moved
    assert await nsmod.arun_in_netns(ns, lambda x: x * 2, 21) == 42

    def boom() -> None:
        raise ValueError("inside")

    with pytest.raises(ValueError, match="inside"):
        nsmod.run_in_netns(ns, boom)
    with pytest.raises(NotFound):
        nsmod.run_in_netns(netns_factory.name("nope"), boom)


# ---------------------------------------------------------------------- veth between namespaces


@needs_root
async def test_veth_between_namespaces_carries_traffic(netlink: Netlink,
                                                       netns_factory: NetnsFactory) -> None:
    nsc, nse = netns_factory("nsc"), netns_factory("nse")
    await netlink.create_veth("nsm-1", nsc, "nse-1", nse, mtu=1400, alias="client-c1",
                              peer_alias="server-c1", mac="02:aa:00:00:00:01",
                              peer_mac="02:aa:00:00:00:02")
    await netlink.setup_interface(nsc, "nsm-1", addresses=["172.16.0.2/32"],
                                  routes=[("172.16.0.1/32", None), ("10.60.0.0/16", "172.16.0.1")],
                                  mtu=1400)
    await netlink.setup_interface(nse, "nse-1", addresses=["172.16.0.1/32"],
                                  routes=[("172.16.0.2/32", None)], mtu=1400)

    client = await netlink.link(nsc, "nsm-1")
    server = await netlink.link(nse, "nse-1")
    assert client is not None and server is not None
    assert client == LinkInfo(index=client.index, name="nsm-1", alias="client-c1", mtu=1400,
                              mac="02:aa:00:00:00:01", admin_up=True, oper_up=True, kind="veth",
                              master=None, link=server.index, operstate="UP")
    assert server.alias == "server-c1" and server.mtu == 1400
    assert server.mac == "02:aa:00:00:00:02" and server.link == client.index and server.oper_up
    assert [link.name for link in await netlink.links(nsc)] == ["lo", "nsm-1"]
    assert await netlink.link(nsc, "nse-1") is None  # each end only in its own namespace
    assert "172.16.0.2/32" in await netlink.addresses(nsc, "nsm-1")
    routes = {r.dst: r for r in await netlink.routes(nsc, dev="nsm-1")}
    assert routes["172.16.0.1/32"].gateway is None and routes["172.16.0.1/32"].scope == 253
    assert routes["10.60.0.0/16"].gateway == "172.16.0.1" and routes["10.60.0.0/16"].onlink

    assert await asyncio.to_thread(nsmod.run_in_netns, nsc, ping, "172.16.0.1")
    assert await asyncio.to_thread(nsmod.run_in_netns, nse, ping, "172.16.0.2")
    assert await asyncio.to_thread(tcp_echo, nsc, nse, "172.16.0.1") == b"HELLO THROUGH THE VETH"
    assert await asyncio.to_thread(nsmod.run_in_netns, nsc, scapy_ping, "172.16.0.2", "172.16.0.1",
                                   "nsm-1")

    assert await netlink.delete_link(nsc, "nsm-1") is True
    assert await netlink.link(nse, "nse-1") is None  # the peer went with it


@needs_root
async def test_veth_ipv6_and_same_namespace(netlink: Netlink, netns_factory: NetnsFactory) -> None:
    a, b = netns_factory("a"), netns_factory("b")
    await netlink.create_veth("v6a", a, "v6b", b)
    await netlink.setup_interface(a, "v6a", addresses=["fd00:1::1/128"],
                                  routes=[("fd00:1::2/128", None)], mtu=1500)
    await netlink.setup_interface(b, "v6b", addresses=["fd00:1::2/128"],
                                  routes=[("fd00:1::1/128", None)], mtu=1500)
    assert "fd00:1::1/128" in await netlink.addresses(a, "v6a")
    assert "fd00:1::2/128" in [r.dst for r in await netlink.routes(a, family=socket.AF_INET6)]

    def v6_exchange() -> bytes:
        srv = nsmod.run_in_netns(b, socket.create_server, ("fd00:1::2", 0),
                                 family=socket.AF_INET6)
        with srv:
            cli = nsmod.run_in_netns(a, socket.create_connection,
                                     ("fd00:1::2", srv.getsockname()[1]), 5)
            with cli, srv.accept()[0] as conn:
                cli.sendall(b"v6")
                return conn.recv(10)

    assert await asyncio.to_thread(v6_exchange) == b"v6"

    await netlink.create_veth("same-a", a, "same-b", a)  # both ends in one namespace
    names = [link.name for link in await netlink.links(a)]
    assert "same-a" in names and "same-b" in names
    with pytest.raises(InvalidArgument):
        await netlink.create_veth("dup", a, "dup", a)


async def _old_style_veth(nl: Netlink, a: str, name_a: str, b: str, name_b: str) -> tuple[int, int]:
    """A veth made as before the fix: the kernel picks both indexes (2 and 2 in fresh
    namespaces). Returns them."""
    async with nl._use(a) as h, nl._use(b) as ph:
        msg = nlmsg.veth_msg(name_a, name_b, peer_ns_fd=ph.ns_fd)
        await nl._sockets.one(h, msg, RTM_NEWLINK, nlmsg.CREATE, "create an old-style veth")
        return h.index(name_a) or 0, ph.index(name_b) or 0


async def _operstates(nl: Netlink, a: str, name_a: str, b: str, name_b: str) -> tuple[str, str]:
    """Both ends' operstate from link dumps: unlike RTM_GETLINK of one link, a dump does not make
    the kernel apply pending link-watch work first, so this is what everyone else sees."""
    one = {link.name: link.operstate for link in await nl.links(a)}
    other = {link.name: link.operstate for link in await nl.links(b)}
    return one.get(name_a, ""), other.get(name_b, "")


async def _both_up(nl: Netlink, a: str, name_a: str, b: str, name_b: str) -> None:
    """Both ends up as the forwarder does it: one datagram each, concurrently."""
    await asyncio.gather(nl.setup_interface(a, name_a, addresses=[], routes=[], mtu=1500),
                         nl.setup_interface(b, name_b, addresses=[], routes=[], mtu=1500))


async def _until_up(nl: Netlink, a: str, name_a: str, b: str, name_b: str,
                    limit: float = 3.0) -> float:
    """Seconds until both ends' operstate is UP (polling dumps)."""
    t0 = time.monotonic()
    while await _operstates(nl, a, name_a, b, name_b) != ("UP", "UP"):
        assert time.monotonic() - t0 < limit, "the link never came up"
        await asyncio.sleep(0.001)
    return time.monotonic() - t0


async def _link_watch_just_ran(nl: Netlink, netns_factory: NetnsFactory) -> None:
    """Make the kernel's link watcher run its once-a-second batch now, so that the next one is a
    full second away: an old-style veth between two fresh namespaces, both ends up; the end
    brought up last is only handled by that batch."""
    a, b = netns_factory("olda"), netns_factory("oldb")
    assert await _old_style_veth(nl, a, "old-a", b, "old-b") == (2, 2), \
        "fresh namespaces no longer give a new link index 2"
    await _both_up(nl, a, "old-a", b, "old-b")
    await _until_up(nl, a, "old-a", b, "old-b")


@needs_root
async def test_new_veth_between_fresh_namespaces_is_up_in_milliseconds(
        netlink: Netlink, netns_factory: NetnsFactory) -> None:
    """Both ends of a veth between two fresh namespaces (a pod's and a node's) would get index 2;
    the link watcher then treats the carrier-on of one end as not urgent
    (``linkwatch_urgent_event``: index equal to the iflink, the peer's index) and applies it in
    its once-a-second batch. ``create_veth`` gives the ends different indexes."""
    await _link_watch_just_ran(netlink, netns_factory)
    pod, node = netns_factory("pod"), netns_factory("node")
    await netlink.create_veth("nsm-1", pod, "nsv-1", node, mtu=1500)
    await _both_up(netlink, pod, "nsm-1", node, "nsv-1")
    elapsed = await _until_up(netlink, pod, "nsm-1", node, "nsv-1")
    assert elapsed < 0.2, f"a new veth took {elapsed * 1e3:.0f} ms to be up"
    one, other = await netlink.link(pod, "nsm-1"), await netlink.link(node, "nsv-1")
    assert one is not None and other is not None
    assert one.index != other.index and one.link == other.index and other.link == one.index


@needs_root
async def test_wait_ready_returns_once_the_kernel_applied_the_carrier(
        netlink: Netlink, netns_factory: NetnsFactory) -> None:
    """``wait_ready`` on a veth whose ends share an index (one made by someone else): it neither
    waits for the link watcher's next batch (~1 s) nor answers before the link watcher has
    applied the carrier (operstate still UNKNOWN, queueing discipline not attached)."""
    await _link_watch_just_ran(netlink, netns_factory)
    a, b = netns_factory("a"), netns_factory("b")
    assert await _old_style_veth(netlink, a, "eq-a", b, "eq-b") == (2, 2)
    await _both_up(netlink, a, "eq-a", b, "eq-b")
    t0 = time.monotonic()
    ready = await asyncio.gather(netlink.wait_ready(a, "eq-a"), netlink.wait_ready(b, "eq-b"))
    elapsed = time.monotonic() - t0
    states = await _operstates(netlink, a, "eq-a", b, "eq-b")
    assert ready == [True, True] and elapsed < 0.2, \
        f"wait_ready answered {ready} after {elapsed * 1e3:.0f} ms"
    assert states == ("UP", "UP"), f"ready, but the link watcher had not applied it yet: {states}"


@needs_root
async def test_veth_index_taken_meanwhile_is_retried(netlink: Netlink,
                                                     netns_factory: NetnsFactory,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = netns_factory("a"), netns_factory("b")
    await netlink.create_veth("first-a", a, "first-b", b)
    taken_a, taken_b = await netlink.index(a, "first-a"), await netlink.index(b, "first-b")
    assert taken_a is not None and taken_b is not None and taken_a != taken_b
    assert taken_a >= nlops.VETH_INDEX_FIRST and taken_b >= nlops.VETH_INDEX_FIRST
    real = netlink._veth_indexes
    calls = []

    def racing(h, ph):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 1:  # as if both had been taken between the check and the request
            return taken_a, taken_b
        if len(calls) == 2:
            return real(h, ph)[0], taken_b
        return real(h, ph)

    monkeypatch.setattr(netlink, "_veth_indexes", racing)
    await netlink.create_veth("second-a", a, "second-b", b)
    assert len(calls) == 3
    got_a, got_b = await netlink.index(a, "second-a"), await netlink.index(b, "second-b")
    assert got_a not in (None, taken_a) and got_b not in (None, taken_b) and got_a != got_b
    assert sorted(link.name for link in await netlink.links(a)) == ["first-a", "lo", "second-a"]
    assert sorted(link.name for link in await netlink.links(b)) == ["first-b", "lo", "second-b"]


@needs_root
async def test_already_exists_creates_nothing(netlink: Netlink,
                                              netns_factory: NetnsFactory) -> None:
    a, b = netns_factory("a"), netns_factory("b")
    await netlink.create_veth("taken-a", a, "taken-b", b, alias="keep-me", mtu=1300)
    await netlink.set_up(a, "taken-a")
    def settled(links: list[LinkInfo]) -> list[LinkInfo]:  # operstate follows linkwatch, async
        return [dataclasses.replace(link, operstate="") for link in links]

    before_a, before_b = settled(await netlink.links(a)), settled(await netlink.links(b))

    with pytest.raises(AlreadyExists, match=r"taken-a exists in network namespace .*-a0"):
        await netlink.create_veth("taken-a", a, "fresh-b", b)
    with pytest.raises(AlreadyExists, match=r"taken-b exists in network namespace .*-b1"):
        await netlink.create_veth("fresh-a", a, "taken-b", b)
    with pytest.raises(AlreadyExists):
        await netlink.create_veth("taken-a", a, "taken-b", b)

    assert settled(await netlink.links(a)) == before_a  # untouched: index, alias, MTU, state
    assert settled(await netlink.links(b)) == before_b
    assert await netlink.link(a, "fresh-a") is None and await netlink.link(b, "fresh-b") is None


@needs_root
async def test_missing_namespace_is_not_found_and_not_created(
        netlink: Netlink, netns_factory: NetnsFactory) -> None:
    a = netns_factory("a")
    missing = f"/var/run/netns/{netns_factory.name('missing')}"
    for call in (
        netlink.link(missing, "eth0"),
        netlink.links(missing),
        netlink.set_up(missing, "eth0"),
        netlink.add_address(missing, "eth0", "10.0.0.1/24"),
        netlink.create_veth("x0", missing, "y0", a),
        netlink.create_veth("x0", a, "y0", missing),
        netlink.setup_interface(f"file://{missing}", "eth0", addresses=[], routes=[], mtu=1500),
    ):
        with pytest.raises(NotFound, match="does not exist"):
            await call
    assert await netlink.delete_link(missing, "eth0") is False
    assert not _exists(missing)  # no O_CREAT trap
    assert await netlink.link(a, "x0") is None and await netlink.link(a, "y0") is None

    with tempfile.NamedTemporaryFile() as f:
        with pytest.raises(InvalidArgument, match="not a network namespace"):
            await netlink.links(f.name)
    with pytest.raises(InvalidArgument):
        await netlink.links("file://relative")


@needs_root
async def test_idempotent_adds_and_deletes(netlink: Netlink, netns_factory: NetnsFactory) -> None:
    a, b = netns_factory("a"), netns_factory("b")
    await netlink.create_veth("i0", a, "i1", b)
    for _ in range(2):
        await netlink.setup_interface(a, "i0", addresses=["10.7.0.1/24", "10.8.0.1/32"],
                                      routes=[("10.9.0.0/16", "10.7.0.2")], mtu=1450)
        await netlink.add_address(a, "i0", "10.7.0.1/24")
        await netlink.add_route(a, "10.10.0.0/16", "i0", gateway="10.7.0.2")
        await netlink.add_route(a, "10.11.0.1/32", "i0")
    assert sorted(x for x in await netlink.addresses(a, "i0") if ":" not in x) == \
        ["10.7.0.1/24", "10.8.0.1/32"]
    dsts = [r.dst for r in await netlink.routes(a, dev="i0")]
    assert sorted(dsts) == ["10.10.0.0/16", "10.11.0.1/32", "10.7.0.0/24", "10.9.0.0/16"]
    link = await netlink.link(a, "i0")
    assert link is not None and link.mtu == 1450 and link.admin_up

    assert await netlink.del_route(a, "10.9.0.0/16") is True
    assert await netlink.del_route(a, "10.9.0.0/16") is False
    assert await netlink.del_route(a, "10.10.0.0/16", dev="i0", gateway="10.7.0.2") is True
    assert await netlink.del_route(a, "10.11.0.1/32", dev="nope") is False
    assert await netlink.del_address(a, "i0", "10.8.0.1/32") is True
    assert await netlink.del_address(a, "i0", "10.8.0.1/32") is False
    assert await netlink.flush_addresses(a, "i0") >= 1
    assert [x for x in await netlink.addresses(a, "i0") if ":" not in x] == []
    assert await netlink.flush_addresses(a, "i0") == 0

    assert await netlink.delete_link(b, "i1") is True
    assert await netlink.delete_link(b, "i1") is False
    assert await netlink.delete_link(a, "i0") is False  # went with its peer
    assert await netlink.del_address(a, "i0", "10.7.0.1/24") is False


@needs_root
async def test_link_setters_and_errors(netlink: Netlink, netns_factory: NetnsFactory) -> None:
    a, b = netns_factory("a"), netns_factory("b")
    await netlink.create_veth("s0", a, "s1", b)
    await netlink.set_mtu(a, "s0", 1280)
    await netlink.set_alias(a, "s0", "client-xyz")
    await netlink.set_up(a, "s0")
    link = await netlink.link(a, "s0")
    assert link is not None and (link.mtu, link.alias, link.admin_up) == (1280, "client-xyz", True)
    assert not link.oper_up  # the peer is still down
    await netlink.set_down(a, "s0")
    link = await netlink.link(a, "s0")
    assert link is not None and not link.admin_up
    assert await netlink.index(a, "s0") == link.index
    assert await netlink.index(a, "nope") is None

    with pytest.raises(NotFound, match=r"nope.*network namespace"):
        await netlink.set_up(a, "nope")
    with pytest.raises(NotFound, match="interface nope not found"):
        await netlink.add_address(a, "nope", "10.0.0.1/24")
    with pytest.raises(NotFound):
        await netlink.add_route(a, "10.0.0.0/24", "nope")
    with pytest.raises(NotFound):
        await netlink.set_master(a, "s0", "nobridge")
    with pytest.raises(InvalidArgument, match="characters"):
        await netlink.set_up(a, "waytoolonginterfacename")
    with pytest.raises(InvalidArgument):
        await netlink.set_mtu(a, "s0", 10)
    with pytest.raises(InvalidArgument):
        await netlink.add_address(a, "s0", "10.0.0.300/24")
    with pytest.raises(InvalidArgument):
        await netlink.create_veth("m0", a, "m1", b, mac="zz:00:00:00:00:00")
    await netlink.set_up(a, "s0")
    with pytest.raises(FailedPrecondition, match=r"10.1.0.0/16 dev s0"):
        await netlink.add_route(a, "10.1.0.0/16", "s0", gateway="192.0.2.1")  # not on-link
    with pytest.raises(Unsupported, match="not supported"):
        await netlink.set_master(a, "s0", "lo")  # lo cannot have ports: EOPNOTSUPP
    with pytest.raises(AlreadyExists):
        await netlink.create_bridge("s0", a)


@needs_root
async def test_50_concurrent_setups_into_one_namespace(netlink: Netlink,
                                                       netns_factory: NetnsFactory) -> None:
    nsc, nse = netns_factory("nsc"), netns_factory("nse")
    n = 50

    async def connect(i: int) -> None:
        await netlink.create_veth(f"c{i}", nsc, f"s{i}", nse, mtu=1400, alias=f"client-{i}",
                                  peer_alias=f"server-{i}")
        await asyncio.gather(
            netlink.setup_interface(nsc, f"c{i}", addresses=[f"10.50.{i}.2/32"],
                                    routes=[(f"10.50.{i}.1/32", None)], mtu=1400),
            netlink.setup_interface(nse, f"s{i}", addresses=[f"10.50.{i}.1/32"],
                                    routes=[(f"10.50.{i}.2/32", None)], mtu=1400))

    await asyncio.gather(*(connect(i) for i in range(n)))

    client_links = {link.name: link for link in await netlink.links(nsc)}
    server_links = {link.name: link for link in await netlink.links(nse)}
    assert len(client_links) == len(server_links) == n + 1
    routes = {r.dst: r.oif for r in await netlink.routes(nse)}
    for i in range(n):
        c, s = client_links[f"c{i}"], server_links[f"s{i}"]
        assert (c.alias, s.alias, c.mtu, s.mtu) == (f"client-{i}", f"server-{i}", 1400, 1400)
        assert c.link == s.index and s.link == c.index and c.oper_up and s.oper_up
        assert f"10.50.{i}.2/32" in await netlink.addresses(nsc, f"c{i}")
        assert routes[f"10.50.{i}.2/32"] == s.index
    for i in (0, n // 2, n - 1):
        assert await asyncio.to_thread(nsmod.run_in_netns, nsc, ping, f"10.50.{i}.1")

    assert all(await asyncio.gather(*(netlink.delete_link(nsc, f"c{i}") for i in range(n))))
    assert [link.name for link in await netlink.links(nse)] == ["lo"]


@needs_root
async def test_vxlan_bridge_between_nodes(netlink: Netlink, netns_factory: NetnsFactory) -> None:
    """Two emulated nodes joined by a veth underlay; a pod on each; L2 over VXLAN + bridges."""
    n1, n2 = netns_factory("node"), netns_factory("node")
    p1, p2 = netns_factory("pod"), netns_factory("pod")
    await netlink.create_veth("u1", n1, "u2", n2)
    await netlink.setup_interface(n1, "u1", addresses=["10.99.0.1/24"], routes=[], mtu=1500)
    await netlink.setup_interface(n2, "u2", addresses=["10.99.0.2/24"], routes=[], mtu=1500)
    for node, local, remote, underlay in ((n1, "10.99.0.1", None, "u1"),
                                          (n2, "10.99.0.2", "10.99.0.1", "u2")):
        # n1's VXLAN is FDB-driven, n2's has a unicast remote: both ways are exercised.
        await netlink.create_vxlan("vx0", node, vni=4242, local=local, remote=remote,
                                   underlay=underlay, mtu=1450,
                                   mac="02:42:00:00:00:01" if remote is None else None)
        await netlink.create_bridge("br0", node, mtu=1450)
        await netlink.set_master(node, "vx0", "br0")
        await netlink.set_up(node, "vx0")
        await netlink.set_up(node, "br0")
    await netlink.fdb_append(n1, "vx0", "00:00:00:00:00:00", "10.99.0.2")
    await netlink.fdb_append(n1, "vx0", "00:00:00:00:00:00", "10.99.0.2")  # idempotent
    for pod, node, ip, port in ((p1, n1, "10.200.0.1/24", "p1"), (p2, n2, "10.200.0.2/24", "p2")):
        await netlink.create_veth("eth1", pod, port, node, mtu=1450)
        await netlink.set_master(node, port, "br0")
        await netlink.set_up(node, port)
        await netlink.setup_interface(pod, "eth1", addresses=[ip], routes=[], mtu=1450)

    vx = await netlink.link(n1, "vx0")
    br = await netlink.link(n1, "br0")
    assert vx is not None and br is not None
    assert (vx.kind, br.kind, vx.master, vx.mtu) == ("vxlan", "bridge", br.index, 1450)
    assert vx.mac == "02:42:00:00:00:01"
    with pytest.raises(AlreadyExists):
        await netlink.create_vxlan("vx1", n1, vni=4242, local="10.99.0.1", remote=None)

    assert await asyncio.to_thread(nsmod.run_in_netns, p1, ping, "10.200.0.2")
    assert await asyncio.to_thread(tcp_echo, p2, p1, "10.200.0.1") == b"HELLO THROUGH THE VETH"

    mac2 = (await netlink.link(p2, "eth1")).mac  # type: ignore[union-attr]
    assert mac2 is not None
    await netlink.neigh_replace(p1, "eth1", "10.200.0.2", mac2)
    await netlink.neigh_replace(p1, "eth1", "10.200.0.2", mac2)
    assert await asyncio.to_thread(nsmod.run_in_netns, p1, ping, "10.200.0.2")

    await netlink.set_master(n1, "p1", None)  # unplug pod 1: traffic stops
    assert not await asyncio.to_thread(nsmod.run_in_netns, p1, ping, "10.200.0.2", 0.5)
    assert (await netlink.link(n1, "p1")).master is None  # type: ignore[union-attr]


@needs_root
async def test_sysctl_in_node_namespace(netlink: Netlink, netns_factory: NetnsFactory) -> None:
    node = netns_factory("node")
    root_before = _read("/proc/sys/net/ipv4/ip_forward")
    assert await netlink.sysctl_in_netns(node, "net.ipv4.ip_forward") == "0"
    await netlink.set_sysctl_in_netns(node, "net.ipv4.ip_forward", 1)
    assert await netlink.sysctl_in_netns(node, "net.ipv4.ip_forward") == "1"
    assert await netlink.sysctl_in_netns(node, "net/ipv4/conf/lo/forwarding") == "1"
    assert _read("/proc/sys/net/ipv4/ip_forward") == root_before  # the root ns is untouched
    with pytest.raises(InvalidArgument):
        await netlink.set_sysctl_in_netns(None, "net.ipv4.ip_forward", 1)  # type: ignore[arg-type]
    for bad in ("kernel.hostname", "net/../kernel/hostname", "vm.swappiness"):
        with pytest.raises(InvalidArgument):
            await netlink.set_sysctl_in_netns(node, bad, 1)
    with pytest.raises(NotFound):
        await netlink.set_sysctl_in_netns(node, "net.ipv4.no_such_knob", 1)


@needs_root
async def test_own_namespace_ends(netlink: Netlink, netns_factory: NetnsFactory) -> None:
    """``netns=None`` is the daemon's own namespace. To exercise it without touching the root
    namespace, a second Netlink runs on an event loop in a thread that entered a node namespace."""
    node, pod = netns_factory("node"), netns_factory("pod")

    async def daemon() -> list[str]:
        async with Netlink() as nl:
            await nl.create_veth("topod", None, "eth9", pod, mtu=1480)  # main end stays home
            await nl.create_veth("own-b", pod, "own-a", None)  # peer comes home
            await nl.setup_interface(None, "topod", addresses=["10.77.0.1/32"],
                                     routes=[("10.77.0.2/32", None)], mtu=1480)
            await nl.set_sysctl_in_netns(node, "net.ipv4.ip_forward", 1)
            return [link.name for link in await nl.links(None)]

    own_links = await asyncio.to_thread(nsmod.run_in_netns, node, asyncio.run, daemon())
    assert sorted(own_links) == ["lo", "own-a", "topod"]  # (dumps go by index: chosen at random)
    assert {link.name for link in await netlink.links(node)} == {"lo", "topod", "own-a"}
    assert {link.name for link in await netlink.links(pod)} == {"lo", "eth9", "own-b"}
    await netlink.setup_interface(pod, "eth9", addresses=["10.77.0.2/32"],
                                  routes=[("10.77.0.1/32", None)], mtu=1480)
    assert await asyncio.to_thread(nsmod.run_in_netns, pod, ping, "10.77.0.1")
    assert await netlink.sysctl_in_netns(node, "net.ipv4.ip_forward") == "1"


@needs_root
async def test_policy_rules(netlink: Netlink, netns_factory: NetnsFactory) -> None:
    node, pod = netns_factory("node"), netns_factory("pod")
    await netlink.create_veth("nsv1", node, "eth0", pod)
    for family in (4, 6):
        for _ in range(2):  # idempotent
            await netlink.add_rule(node, iif="nsv1", table=1000 + family, priority=1000,
                                   family=family)
    with pytest.raises(FailedPrecondition, match="Device for nexthop is not up"):
        await netlink.add_route(node, "10.88.0.2/32", "nsv1", table=1004)
    await netlink.set_up(node, "nsv1")
    await netlink.add_route(node, "10.88.0.2/32", "nsv1", table=1004)
    ours = [r for r in await netlink.rules(node) if r.iif == "nsv1"]
    assert sorted((r.family, r.table, r.priority) for r in ours) == [(4, 1004, 1000),
                                                                      (6, 1006, 1000)]
    assert [r.dst for r in await netlink.routes(node, table=1004)] == ["10.88.0.2/32"]
    assert await netlink.del_rule(node, iif="nsv1", table=1004, priority=1000) is True
    assert await netlink.del_rule(node, iif="nsv1", table=1004, priority=1000) is False
    assert await netlink.del_rule(node, iif="nsv1", table=1006, priority=1000, family=6)
    assert [r for r in await netlink.rules(node) if r.iif == "nsv1"] == []
    with pytest.raises(InvalidArgument):
        await netlink.add_rule(node, iif="nsv1", table=0, priority=1)
    with pytest.raises(InvalidArgument):
        await netlink.add_rule(node, iif="nsv1", table=5, priority=1, family=5)


# ---------------------------------------------------------------------- socket cache lifecycle


async def _until(predicate, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(0.05)
    return False


@needs_root
async def test_deleted_namespace_is_released(netlink: Netlink,
                                             netns_factory: NetnsFactory) -> None:
    """A cached socket pins its namespace; once the namespace is deleted the pruner lets go, so
    the kernel destroys it (and the veth end in the other namespace disappears)."""
    x, y = netns_factory("x"), netns_factory("y")
    await netlink.create_veth("gone", x, "stay", y)
    assert x in netlink.cached()
    nsmod.delete_netns(os.path.basename(x))
    assert await netlink.index(y, "stay") is not None  # still pinned by our socket
    assert await _until(lambda: _absent(netlink, y, "stay")), "namespace never destroyed"
    assert x not in netlink.cached()
    with pytest.raises(NotFound):
        await netlink.links(x)
    assert not _exists(x)


async def _absent(netlink: Netlink, ns: str, name: str) -> bool:
    return await netlink.index(ns, name) is None


@needs_root
async def test_idle_sockets_are_closed_but_the_own_namespace_stays(
        netns_factory: NetnsFactory) -> None:
    """Sockets of other namespaces unused for ``idle_timeout`` are closed by the pruner (and
    reopened on demand); one in use is kept."""
    nl = Netlink(prune_interval=0.05, idle_timeout=0.3)
    try:
        x, y = netns_factory("x"), netns_factory("y")
        await nl.create_veth("idle", x, "busy", y)
        await nl.links(None)
        assert {x, y, None} <= set(nl.cached())

        async def y_busy_x_idle() -> bool:
            await nl.index(y, "busy")
            return x not in nl.cached()

        assert await _until(y_busy_x_idle), "idle socket never closed"
        assert y in nl.cached() and None in nl.cached()
        assert await nl.index(x, "idle") is not None  # reopened on demand
        assert x in nl.cached()
    finally:
        await nl.close()


@needs_root
async def test_recreated_namespace_gets_a_new_socket(netlink: Netlink,
                                                     netns_factory: NetnsFactory) -> None:
    x, y = netns_factory("x"), netns_factory("y")
    await netlink.create_veth("old", x, "old-peer", y)
    name = os.path.basename(x)
    nsmod.delete_netns(name)
    assert nsmod.create_netns(name) == x  # same path, another namespace
    assert [link.name for link in await netlink.links(x)] == ["lo"]
    await netlink.create_veth("new", x, "new-peer", y)
    assert await netlink.index(x, "new") is not None
    assert netlink.forget(x) is True and x not in netlink.cached()
    assert netlink.forget(x) is False
    assert await netlink.index(x, "new") is not None  # reopened on demand


@needs_root
async def test_close_releases_every_fd(netns_factory: NetnsFactory, fd_count) -> None:  # type: ignore[no-untyped-def]
    a, b = netns_factory("a"), netns_factory("b")
    before = fd_count()
    nl = Netlink()
    await nl.create_veth("f0", a, "f1", b)
    await nl.links(None)
    await nl.delete_link(a, "f0")  # opens the blocking socket and worker threads
    assert fd_count() > before
    await nl.close()
    await nl.close()
    assert fd_count() == before
    with pytest.raises(FailedPrecondition):
        await nl.links(a)


@needs_root
async def test_context_manager_and_url_forms(netns_factory: NetnsFactory) -> None:
    a = netns_factory("a")
    async with Netlink() as nl:
        by_path = await nl.links(a)
        by_url = await nl.links(f"file://{a}")
        by_name = await nl.links(os.path.basename(a))
        by_proc = await nl.links(f"/proc/{os.getpid()}/ns/net")
    assert by_path == by_url == by_name
    assert "lo" in [link.name for link in by_proc]


# ---------------------------------------------------------------------- no kernel needed


def test_error_mapping() -> None:
    cases = {
        errno.EEXIST: AlreadyExists, errno.ENODEV: NotFound, errno.ESRCH: NotFound,
        errno.ENOENT: NotFound, errno.EOPNOTSUPP: Unsupported, errno.EINVAL: InvalidArgument,
        errno.ERANGE: InvalidArgument, errno.EPERM: FailedPrecondition,
        errno.ENETUNREACH: FailedPrecondition, errno.EIO: Internal,
    }
    for code, cls in cases.items():
        err = nlmsg.domain_error(NetlinkError(code), "do x on eth0 in ns y")
        assert type(err) is cls and err.message.startswith("do x on eth0 in ns y: ")
    err = nlmsg.domain_error(NetlinkError(errno.EOPNOTSUPP, "Unknown device type"), "add")
    assert "Unknown device type" in err.message and "not supported by this kernel" in err.message



def test_warm_prepares_every_message_layout_and_sends_nothing() -> None:
    """``Netlink.warm`` (a forwarder's start): in a fresh interpreter, every kind of message
    the datapath sends has its attribute layout compiled afterwards, and no socket was opened."""
    import subprocess
    import sys

    code = (
        "from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg\n"
        "from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg\n"
        "from pyroute2.netlink.rtnl.rtmsg import rtmsg\n"
        "from pyroute2.netlink.rtnl.fibmsg import fibmsg\n"
        "from pyroute2.netlink.rtnl.ndmsg import ndmsg\n"
        "from nsm.kernel.netlink import Netlink\n"
        "kinds = (ifinfmsg, ifaddrmsg, rtmsg, fibmsg, ndmsg)\n"
        "def compiled(): return [k.__name__ for k in kinds if '_nlmsg_base__compiled_nla' in vars(k)]\n"
        "before = compiled()\n"
        "nl = Netlink()\n"
        "nl.warm()\n"
        "print(before, compiled(), nl.cached())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0] == (
        "[] ['ifinfmsg', 'ifaddrmsg', 'rtmsg', 'fibmsg', 'ndmsg'] []"), out.stdout

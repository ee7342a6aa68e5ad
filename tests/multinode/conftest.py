"""Fixtures for the multi-node tests: an emulated cluster (:mod:`nsm.lab`) with real traffic.

- ``cluster_session`` (one per xdist worker, built on first use, ~4 s): the three-node lab
  :data:`TOPOLOGY` (registry on node1; a manager and a forwarder per node; endpoints ``nse-ip``
  (service ``ip``, IP payload), ``nse-eth`` (service ``eth``, ETHERNET) and their IPv6 twins
  ``nse-ip6``/``nse-eth6`` (services ``ip6``/``eth6``) on node2, ``near1`` on node1 and ``near2`` on
  node2 offering ``near`` (prefers the client's own node, then any) and ``rr`` (no matches);
  node3 has none), wrapped in a :class:`Cluster` with the helpers the tests use.
- ``cluster`` (per test): the same cluster; the pods (namespaces) and SDK clients a test makes
  through it are removed/closed at the end of the test even if it fails, then the whole cluster
  is checked clean: no ``nsv``/``nsx``/``nsb`` link, policy rule or extra routing table on any
  node, no interface in any endpoint's pod, no connection in any daemon's monitor.
- ``new_lab``: a dedicated lab for a test that breaks daemons (``async with new_lab(topo) as lab``).
- When a test fails, the tail of every daemon's log is attached to its report.

Names: lab prefixes must match ``[A-Za-z0-9_]``, so they are the run prefix (``nsm_run_prefix``,
unique per run and xdist worker) with ``-`` turned into ``_``; the root conftest's leak check
looks for the run prefix itself, so the labs' work directories carry it (every daemon's command
line then names it) and :func:`_no_lab_left_behind` checks the namespaces (``<lab prefix>-*``).

Traffic helpers run in threads that entered a pod's namespace (:func:`nsm.kernel.netns.run_in_netns`);
scapy's configuration is global to the process, so every scapy use holds :data:`SCAPY_LOCK`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio

from nsm.api import connection_pb2_grpc
from nsm.api.connection_pb2 import Connection, ConnectionEvent, MonitorScopeSelector
from nsm.client.sdk import Client
from nsm.kernel import netns as nsns
from nsm.kernel.netlink import LinkInfo, Netlink
from nsm.kernel.ping import PingResult, ping
from nsm.lab import EndpointSpec, Lab, MatchSpec, NodeSpec, ServiceSpec, Topology, cleanup
from nsm.transport import dial

ROOT = Path(__file__).resolve().parents[2]

#: Underlay MTU 1500 minus the VXLAN/IPv4 overhead.
TUNNEL_MTU = 1450
#: The largest ICMP echo payload a DF ping may carry over it (IPv4 20 + ICMP 8 bytes of headers).
MAX_ICMP_PAYLOAD = TUNNEL_MTU - 28
#: Names of the per-connection links a forwarder makes in its node's namespace.
TUNNEL_PREFIXES = ("nsv", "nsx", "nsb")
#: Tables of a fresh namespace (local, main, default) and the priorities of its rules.
STANDARD_TABLES = frozenset({253, 254, 255})
STANDARD_RULES = frozenset({0, 32766, 32767})

NODES = ("node1", "node2", "node3")
NEAR = ServiceSpec("near", matches=(
    # The client's own node first ...
    MatchSpec(routes=((("nodeName", "{{.nodeName}}"),),), fallthrough=True),
    # ... else any endpoint (an empty destination selector matches every one).
    MatchSpec(routes=((),)),
))
TOPOLOGY = Topology(
    nodes=tuple(NodeSpec(n) for n in NODES),
    endpoints=(
        EndpointSpec("nse-ip", "node2", ("ip",), "172.16.1.0/24"),
        EndpointSpec("nse-eth", "node2", ("eth",), "172.16.2.0/24"),
        EndpointSpec("near1", "node1", ("near", "rr"), "172.16.3.0/24"),
        EndpointSpec("near2", "node2", ("near", "rr"), "172.16.4.0/24"),
        EndpointSpec("nse-ip6", "node2", ("ip6",), "fd00:16::/64"),
        EndpointSpec("nse-eth6", "node2", ("eth6",), "fd00:17::/64"),
    ),
    services=(ServiceSpec("ip"), ServiceSpec("eth", payload="ETHERNET"), NEAR, ServiceSpec("rr"),
              ServiceSpec("ip6"), ServiceSpec("eth6", payload="ETHERNET")),
)

LOG_LINES = 80
SCAPY_LOCK = threading.Lock()


def ip_of(cidr: str) -> str:
    return cidr.split("/")[0]


def ns_name(path: str) -> str:
    """The name ``ip -n`` takes for a named namespace path."""
    return os.path.basename(path)


def clean_env() -> dict[str, str]:
    """This environment without ``NSM_*`` (every flag of the CLI reads one)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NSM_")}
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


# ---------------------------------------------------------------------------------- traffic
# Each runs synchronously in a thread that entered a pod's namespace.


def _scapy() -> Any:
    """scapy, with its view of interfaces and routes refreshed for the calling thread's
    namespace (hold SCAPY_LOCK)."""
    logging.getLogger("scapy.runtime").setLevel(logging.ERROR)
    import scapy.all as scapy

    scapy.conf.ifaces.reload()
    scapy.conf.route.resync()
    return scapy


def _icmp_echo(src: str, dst: str, ident: int, payload: bytes) -> dict[str, Any] | None:
    s = _scapy()
    # Through the kernel (raw IP socket): on a routed (IP payload) link the peer is a static
    # neighbour and nothing answers ARP/ND, so scapy's own L2 resolution would fall back to
    # broadcast, which a router drops. The mesh's routes are on-link /32s (/128s) without a
    # preferred source: give it explicitly.
    if ":" in dst:
        s.conf.route6.resync()
        iface = s.conf.route6.route(dst)[0]
        sock = s.L3RawSocket6(iface=iface)
        probe = s.IPv6(src=src, dst=dst) / s.ICMPv6EchoRequest(id=ident, seq=1, data=payload)
        ip, reply = s.IPv6, s.ICMPv6EchoReply
    else:
        iface = s.conf.route.route(dst)[0]
        sock = s.L3RawSocket(iface=iface)
        probe = s.IP(src=src, dst=dst) / s.ICMP(id=ident, seq=1) / s.Raw(payload)
        ip, reply = s.IP, s.ICMP
    try:
        answer = sock.sr1(probe, timeout=3, verbose=0)
    finally:
        sock.close()
    if answer is None or reply not in answer:
        return None
    if ip is s.IP:
        kind, data = answer[s.ICMP].type, bytes(answer[s.Raw].load) if s.Raw in answer else b""
    else:
        kind, data = 0, bytes(answer[reply].data)  # an echo reply: type 0 like ICMPv4's
    return {"src": answer[ip].src, "dst": answer[ip].dst, "type": kind, "id": answer[reply].id,
            "iface": iface, "payload": data}


def _arp_who_has(iface: str, src: str, dst: str) -> dict[str, str] | None:
    s = _scapy()
    mac = s.get_if_hwaddr(iface)
    ans, _ = s.srp(s.Ether(dst="ff:ff:ff:ff:ff:ff", src=mac)
                   / s.ARP(op=1, hwsrc=mac, psrc=src, pdst=dst),
                   iface=iface, timeout=3, verbose=0)
    for _, reply in ans:
        if s.ARP in reply and reply[s.ARP].op == 2:
            return {"hwsrc": reply[s.ARP].hwsrc, "psrc": reply[s.ARP].psrc,
                    "pdst": reply[s.ARP].pdst, "ether_src": reply[s.Ether].src,
                    "ether_dst": reply[s.Ether].dst}
    return None


def _l2_listener(iface: str, ethertype: int) -> Any:
    s = _scapy()
    return s.conf.L2listen(iface=iface, type=ethertype, promisc=False)


def _l2_send(iface: str, frames: Sequence[tuple[str, int, bytes]]) -> str:
    s = _scapy()
    mac = s.get_if_hwaddr(iface)
    for dst, ethertype, payload in frames:
        s.sendp(s.Ether(src=mac, dst=dst, type=ethertype) / s.Raw(payload), iface=iface, verbose=0)
    return str(mac)


def l2_frames_across(client_ns: str, client_if: str, server_ns: str, server_if: str,
                     frames: Sequence[tuple[str, int, bytes]], ethertype: int,
                     timeout: float = 3.0) -> tuple[str, list[dict[str, Any]]]:
    """Send raw Ethernet frames (dst MAC, EtherType, payload) with scapy's ``sendp`` from
    ``client_if`` and sniff EtherType ``ethertype`` on ``server_if``; returns the sender's MAC
    and what arrived."""
    with SCAPY_LOCK:
        listener = nsns.run_in_netns(server_ns, _l2_listener, server_if, ethertype)
        try:
            mac = nsns.run_in_netns(client_ns, _l2_send, client_if, frames)
            import scapy.all as s

            got = s.sniff(opened_socket=listener, timeout=timeout, count=len(frames),
                          lfilter=lambda p: s.Ether in p and p[s.Ether].type == ethertype)
            return mac, [{"src": p[s.Ether].src, "dst": p[s.Ether].dst, "type": p[s.Ether].type,
                          "payload": bytes(p[s.Raw].load) if s.Raw in p else b""} for p in got]
        finally:
            listener.close()


def _locked(fn: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any) -> Any:
        with SCAPY_LOCK:
            return fn(*args)
    return run


def _family(addr: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def _listening(addr: str) -> socket.socket:
    srv = socket.create_server((addr, 0), family=_family(addr))
    srv.settimeout(10)
    return srv


def _echo_once(srv: socket.socket, errors: list[BaseException]) -> None:
    try:
        conn, _ = srv.accept()
        with conn:
            conn.settimeout(10)
            while data := conn.recv(65536):
                conn.sendall(data)
    except BaseException as exc:  # reported by the caller
        errors.append(exc)


def tcp_exchange(client_ns: str, server_ns: str, server_addr: str, size: int) -> None:
    """Echo ``size`` random bytes from a socket in ``client_ns`` off a server in ``server_ns``."""
    srv = nsns.run_in_netns(server_ns, _listening, server_addr)
    errors: list[BaseException] = []
    thread = threading.Thread(target=_echo_once, args=(srv, errors), daemon=True)
    thread.start()
    try:
        cli = nsns.run_in_netns(client_ns, socket.socket, _family(server_addr), socket.SOCK_STREAM)
        with cli:
            cli.settimeout(10)
            cli.connect((server_addr, srv.getsockname()[1]))
            payload = os.urandom(size)
            cli.sendall(payload)
            cli.shutdown(socket.SHUT_WR)
            received = bytearray()
            while chunk := cli.recv(65536):
                received += chunk
        thread.join(10)
        assert not thread.is_alive(), "TCP echo server did not finish"
        assert not errors, errors
        assert bytes(received) == payload, f"echoed {len(received)} of {size} bytes, or different"
    finally:
        srv.close()
        thread.join(5)


# ---------------------------------------------------------------------------------- cluster


class Cluster:
    """A running lab plus what the tests need: fresh pods, clients closed at the end of the
    test, traffic, and views of the nodes' kernel state and the daemons' monitors."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.netlink = Netlink()
        self._count = itertools.count(1)
        self._stack: contextlib.AsyncExitStack | None = None
        self._channels: dict[str, grpc.aio.Channel] = {}
        #: Leftovers a failed test was already blamed for (later tests fail only on their own).
        self.known_leftovers: set[str] = set()

    @property
    def stack(self) -> contextlib.AsyncExitStack:
        assert self._stack is not None, "use the per-test `cluster` fixture"
        return self._stack

    def node(self, name: str) -> Any:
        return self.lab.node(name)

    def node_netns(self, name: str) -> str:
        return self.lab.node(name).netns

    def nse_netns(self, name: str) -> str:
        return self.lab.endpoint(name).netns

    # -- things a test makes --------------------------------------------------------------

    async def pod(self, tag: str = "p") -> str:
        """A fresh empty namespace (``<lab prefix>-<tag><n>``), deleted at the end of the test
        (after its clients are closed)."""
        name = self.lab.ns_name(f"{tag}{next(self._count)}")
        path = nsns.create_netns(name)
        self.stack.callback(nsns.delete_netns, name)
        return path

    def client(self, node: str, service: str, netns: str, *, ifname: str = "nsm-1",
               **kwargs: Any) -> Client:
        """An SDK client of ``node``'s manager, closed at the end of the test."""
        c = Client(manager_url=self.node(node).manager_url, service=service, netns=netns,
                   ifname=ifname, **kwargs)
        self.stack.push_async_callback(c.close)
        return c

    async def connect(self, node: str, service: str, *, tag: str = "p", ifname: str = "nsm-1",
                      **kwargs: Any) -> tuple[Client, Connection, str]:
        """A new pod with a connection from ``node``: (client, connection, pod netns)."""
        pod = await self.pod(tag)
        c = self.client(node, service, pod, ifname=ifname, **kwargs)
        return c, await c.request(), pod

    async def spawn(self, *args: str) -> asyncio.subprocess.Process:
        """``python -m nsm.cli ARGS`` (stdout piped), SIGKILLed at the end of the test."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "nsm.cli", *args, cwd=ROOT, env=clean_env(),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, start_new_session=True)

        async def reap() -> None:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(proc.communicate(), 5)

        self.stack.push_async_callback(reap)
        return proc

    # -- traffic --------------------------------------------------------------------------

    async def icmp(self, netns: str, src: str, dst: str, ident: int,
                   payload: bytes) -> dict[str, Any] | None:
        """A scapy ICMP echo from ``netns`` (src → dst): the reply's fields, or None."""
        return await asyncio.to_thread(nsns.run_in_netns, netns, _locked(_icmp_echo), src, dst,
                                       ident, payload)

    async def arp(self, netns: str, iface: str, src: str, dst: str) -> dict[str, str] | None:
        """A scapy ARP who-has ``dst`` on ``iface``: the reply's fields, or None."""
        return await asyncio.to_thread(nsns.run_in_netns, netns, _locked(_arp_who_has), iface,
                                       src, dst)

    async def l2(self, client_ns: str, client_if: str, server_ns: str, server_if: str,
                 frames: Sequence[tuple[str, int, bytes]],
                 ethertype: int) -> tuple[str, list[dict[str, Any]]]:
        return await asyncio.to_thread(l2_frames_across, client_ns, client_if, server_ns,
                                       server_if, frames, ethertype)

    async def tcp(self, client_ns: str, server_ns: str, server_addr: str, size: int) -> None:
        await asyncio.to_thread(tcp_exchange, client_ns, server_ns, server_addr, size)

    async def ping(self, netns: str, dst: str, **kwargs: Any) -> PingResult:
        return await asyncio.to_thread(ping, netns, dst, **kwargs)

    async def assert_ping(self, netns: str, dst: str, count: int = 2) -> None:
        """``count`` echo replies out of ``count + 1`` requests. One spare: under the full
        suite's load a single echo went unanswered twice in about a dozen runs (cause not
        found yet; never reproduced alone or under CPU load) — see docs/performance.md."""
        result = await self.ping(netns, dst, count=count + 1, interval=0.02)
        if result.lost:  # shown in the warnings summary: data for the open question
            warnings.warn(f"ping {dst} from {netns}: echo seq {result.lost} of {result.sent} "
                          f"unanswered (rtts {[round(r, 3) for r in result.rtts_ms]} ms)",
                          stacklevel=2)
        assert result.received >= count, (f"ping {dst} from {netns}: {result.received}/"
                                          f"{result.sent} answered, lost seq {result.lost} "
                                          f"{result.errors}")

    # -- kernel state ---------------------------------------------------------------------

    async def links(self, netns: str) -> list[LinkInfo]:
        return [link for link in await self.netlink.links(netns) if link.name != "lo"]

    async def link_names(self, netns: str) -> list[str]:
        return sorted(link.name for link in await self.links(netns))

    async def tunnel_links(self, node: str) -> dict[str, LinkInfo]:
        """The per-connection links (nsv/nsx/nsb) in a node's namespace, by name."""
        return {link.name: link for link in await self.netlink.links(self.node_netns(node))
                if link.name.startswith(TUNNEL_PREFIXES)}

    async def iface_with(self, netns: str, cidr: str) -> LinkInfo:
        """The interface of ``netns`` that has the address ``cidr``."""
        for link in await self.links(netns):
            if cidr in await self.netlink.addresses(netns, link.name):
                return link
        raise AssertionError(f"no interface with {cidr} in {netns}: "
                             f"{await self.link_names(netns)}")

    async def policy(self, node: str) -> list[str]:
        """Policy rules and routing tables a fresh namespace does not have."""
        ns = self.node_netns(node)
        found = [f"rule {r}" for r in await self.netlink.rules(ns)
                 if r.priority not in STANDARD_RULES or r.table not in STANDARD_TABLES]
        found += [f"route {r}" for r in await self.netlink.routes(ns, table=None)
                  if r.table not in STANDARD_TABLES]
        return found

    @staticmethod
    def ip_json(netns: str, *args: str) -> Any:
        """``ip -j -n <ns> ARGS`` (assertions only)."""
        out = subprocess.run(["ip", "-j", "-n", ns_name(netns), *args], check=True,
                             capture_output=True, text=True, timeout=10).stdout
        return json.loads(out or "[]")

    def rules_text(self, node: str) -> str:
        """``ip -n <node> rule`` for both families (what an operator would look at)."""
        ns = ns_name(self.node_netns(node))
        return "".join(subprocess.run(["ip", fam, "-n", ns, "rule"], check=True,
                                      capture_output=True, text=True, timeout=10).stdout
                       for fam in ("-4", "-6"))

    def vxlans(self, node: str) -> dict[str, dict[str, Any]]:
        """VXLAN devices of a node: name → ``ip -d`` info data (id, remote, local, port...)."""
        out = {}
        for link in self.ip_json(self.node_netns(node), "-d", "link", "show", "type", "vxlan"):
            out[link["ifname"]] = {**link["linkinfo"]["info_data"], "mtu": link["mtu"]}
        return out

    # -- daemons' view --------------------------------------------------------------------

    def channel(self, url: str) -> grpc.aio.Channel:
        if url not in self._channels:
            self._channels[url] = dial(url)
        return self._channels[url]

    async def connections(self, url: str, timeout: float = 5.0) -> dict[str, Connection]:
        """The connections the monitor at ``url`` knows (its INITIAL_STATE_TRANSFER)."""
        stub = connection_pb2_grpc.MonitorConnectionStub(self.channel(url))
        call = stub.MonitorConnections(MonitorScopeSelector(), timeout=timeout)
        try:
            event: ConnectionEvent = await call.read()
        finally:
            call.cancel()
        assert event is not grpc.aio.EOF, f"monitor at {url} ended without a snapshot"
        return dict(event.connections)

    def monitor_urls(self, nodes: Sequence[str] | None = None) -> dict[str, str]:
        """Every daemon with a connection monitor on the given nodes (default all), by key."""
        nodes = list(nodes or self.lab.nodes)
        urls = {}
        for name in nodes:
            urls[f"manager.{name}"] = self.node(name).manager_url
            urls[f"forwarder.{name}"] = self.node(name).forwarder_url
        for name, ep in self.lab.endpoints.items():
            if ep.node in nodes:
                urls[f"nse.{name}"] = ep.url
        return urls

    async def leftovers(self, nodes: Sequence[str] | None = None) -> list[str]:
        """Everything connection-related on the given nodes (default all): per-connection links,
        policy rules and tables, interfaces in endpoints' pods, connections in monitors (of the
        daemons that run). Empty when clean."""
        nodes = list(nodes or self.lab.nodes)
        problems = []
        for node in nodes:
            problems += [f"{node}: link {n}" for n in sorted(await self.tunnel_links(node))]
            problems += [f"{node}: {p}" for p in await self.policy(node)]
        for name, ep in self.lab.endpoints.items():
            if ep.node in nodes:
                problems += [f"pod of {name}: interface {n}"
                             for n in await self.link_names(ep.netns)]
        for key, url in self.monitor_urls(nodes).items():
            daemon = self.lab.daemon(key)
            if daemon.proc is None or daemon.proc.returncode is not None:
                continue  # stopped by the test
            problems += [f"{key}: connection {cid}" for cid in sorted(await self.connections(url))]
        return problems

    async def assert_clean(self, nodes: Sequence[str] | None = None) -> None:
        problems = await self.leftovers(nodes)
        assert not problems, "left behind:\n  " + "\n  ".join(problems)

    async def eventually_clean(self, timeout: float, nodes: Sequence[str] | None = None) -> float:
        """Wait until clean; returns the seconds it took (fails with the leftovers)."""
        t0 = time.monotonic()
        while True:
            problems = await self.leftovers(nodes)
            if not problems:
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"not clean after {timeout}s:\n  " + "\n  ".join(problems))
            await asyncio.sleep(0.1)

    async def eventually(self, check: Callable[[], Awaitable[bool]], *, timeout: float,
                         what: str, interval: float = 0.1) -> None:
        deadline = time.monotonic() + timeout
        while not await check():
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not reached within {timeout}s")
            await asyncio.sleep(interval)

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()
        await self.netlink.close()


# ---------------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("multi-node tests need root (network namespaces, veth, VXLAN)")


@pytest.fixture(scope="session")
def lab_prefix_base(nsm_run_prefix: str) -> str:
    """The run prefix as a lab prefix (``[A-Za-z0-9_]``)."""
    return nsm_run_prefix.replace("-", "_")


def _leftovers(prefix: str) -> tuple[list[str], list[tuple[int, str]]]:
    namespaces = [n for n in nsns.list_netns() if n.startswith(prefix)]
    procs = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if prefix in cmd:
            procs.append((int(entry.name), cmd))
    return namespaces, procs


@pytest.fixture(scope="session", autouse=True)
def _no_lab_left_behind(lab_prefix_base: str) -> Iterator[None]:
    """Session end (after every lab fixture is gone): fail if a namespace or process of this
    run's labs is left, after removing it."""
    yield
    deadline = time.monotonic() + 3.0
    while True:
        namespaces, procs = _leftovers(lab_prefix_base)
        if (not namespaces and not procs) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if namespaces or procs:
        for pid, _ in procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        for name in namespaces:
            with contextlib.suppress(Exception):
                nsns.delete_netns(name)
        pytest.fail("multi-node labs left things behind (now removed):\n"
                    + "\n".join([f"  namespace {n}" for n in namespaces]
                                + [f"  process {p}: {c[:200]}" for p, c in procs]), pytrace=False)


@contextlib.asynccontextmanager
async def _running_lab(topology: Topology, prefix: str, run_prefix: str,
                       **kwargs: Any) -> AsyncIterator[Lab]:
    # The work directory carries the run prefix: every daemon's command line names it.
    workdir = Path(tempfile.mkdtemp(prefix=f"{run_prefix}-{prefix[-2:]}-"))
    lab = Lab(topology, prefix=prefix, workdir=workdir, **kwargs)
    try:
        async with lab:
            yield lab
    finally:
        # Whatever a test made with this prefix outside the lab's bookkeeping, too.
        await asyncio.to_thread(cleanup, prefix, state_dir=None)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def cluster_session(lab_prefix_base: str, nsm_run_prefix: str) -> AsyncIterator[Cluster]:
    async with _running_lab(TOPOLOGY, f"{lab_prefix_base}_s", nsm_run_prefix,
                            print_logs_on_error=False) as lab:
        cluster = Cluster(lab)
        try:
            yield cluster
        finally:
            await cluster.close()


@pytest_asyncio.fixture(loop_scope="session")
async def cluster(cluster_session: Cluster) -> AsyncIterator[Cluster]:
    """The session's cluster; what the test made is removed after it, then the cluster must be
    clean."""
    cl = cluster_session
    # A netlink socket per namespace is cached: one instance per test, closed at its end, so
    # that no socket keeps a deleted pod's namespace (and its links) alive.
    previous, cl.netlink = cl.netlink, Netlink()
    await previous.close()  # idempotent
    try:
        async with contextlib.AsyncExitStack() as stack:
            cl._stack = stack
            try:
                yield cl
            finally:
                cl._stack = None
        # Close is synchronous on every hop; still, give stray timers a moment before blaming.
        deadline = time.monotonic() + 5.0
        while True:
            new = [p for p in await cl.leftovers() if p not in cl.known_leftovers]
            if not new:
                break
            if time.monotonic() > deadline:
                cl.known_leftovers.update(new)
                raise AssertionError("the test left things in the cluster:\n  " + "\n  ".join(new))
            await asyncio.sleep(0.1)
    finally:
        await cl.netlink.close()


@pytest.fixture
def new_lab(lab_prefix_base: str, nsm_run_prefix: str) -> Callable[..., Any]:
    """``async with new_lab(topology, tag="u", **lab_kwargs) as cluster``: a dedicated lab (for a
    test that breaks daemons) as a :class:`Cluster` whose pods and clients go at the end of the
    block; torn down then (its daemons' logs printed if the block raised)."""
    tags = itertools.count(1)

    @contextlib.asynccontextmanager
    async def make(topology: Topology, tag: str = "d", **kwargs: Any) -> AsyncIterator[Cluster]:
        async with _running_lab(topology, f"{lab_prefix_base}_{tag}{next(tags)}",
                                nsm_run_prefix, **kwargs) as lab:
            cl = Cluster(lab)
            try:
                async with contextlib.AsyncExitStack() as stack:
                    cl._stack = stack
                    yield cl
            finally:
                cl._stack = None
                await cl.close()

    return make


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed:
        cl = getattr(item, "funcargs", {}).get("cluster")
        if isinstance(cl, Cluster):
            report.sections.append((f"daemon logs, last {LOG_LINES} lines ({report.when})",
                                    cl.lab.format_logs(LOG_LINES)))
    return report


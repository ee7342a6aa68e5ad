"""The emulated cluster: nodes, pods and the mesh's daemons on one machine, in namespaces.

A :class:`Topology` *describes* a cluster (frozen dataclasses, nothing happens when one is made);
a :class:`Lab` *builds* it and tears it down::

    async with Lab(Topology.simple(2), prefix="demo") as lab:
        node1 = lab.node("node1")      # netns path, underlay ip, manager/forwarder URLs, daemons
        lab.pod("node1-pod1").netns    # a pod: just a namespace hanging off its node
        lab.registry_url               # unix socket URL, reachable from anywhere on this host

What gets built (``P`` is the prefix, names are predictable):

- ``P-fab``: the underlay switch, a namespace holding the bridge ``br0``;
- ``P-<node>`` per node: a veth ``eth0`` whose other end, named after the node, is a port of
  ``br0`` in ``P-fab``; underlay address ``172.30.0.<i>/24`` (the i-th node; every lab has its
  own isolated fabric, so labs never collide), MTU 1500, ``lo`` up, ``ip_forward=1`` in the node
  namespace only;
- processes running *inside* the node namespaces: the registry (on ``registry_node``) on
  ``tcp://<ip>:5000`` and a unix socket; on every node a manager (unix socket and
  ``tcp://<ip>:5001``, its registry proxy advertising that tcp URL for the node's endpoints) and
  a forwarder (unix socket); the topology's endpoints. Forwarders and endpoints register through
  their node's manager (unix socket); managers talk to the registry over the fabric;
- ``P-<pod>`` per pod and per endpoint (an endpoint's interfaces go into its own pod namespace).

Nothing is created in the root namespace: veth ends are created directly in their namespaces.
The daemons reach each other over the fabric (``tcp://`` URLs); the test process and the CLI,
which live in the root namespace, use the unix sockets (the filesystem is shared).

Teardown always runs (failure midway, Ctrl-C, cancellation): daemons get SIGTERM then SIGKILL,
any other process left inside the lab's namespaces is ended by pid, then the pod, node and fabric
namespaces are deleted (which deletes their links) and the work directory removed.
:func:`cleanup` does the same for a lab whose supervisor died, from the prefix and state file.

The CLI (``nsm lab up|down|status``) keeps a lab running in the background: ``up`` starts a
detached supervisor (``nsm lab up --foreground``) that builds the lab, writes a JSON state file
(default ``/run/nsm-lab/<prefix>.json``) and waits for SIGTERM; ``down`` stops it and cleans up
whatever is left (idempotent).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from nsm import log as nsm_log
from nsm.api.registry_pb2 import Destination, Match, NetworkService
from nsm.config import flag
from nsm.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, NsmError, Unavailable
from nsm.kernel import netns as nsns
from nsm.kernel.netlink import Netlink
from nsm.lab.processes import Daemon, wait_serving
from nsm.mechanisms import PAYLOADS, validate_ifname
from nsm.registry.client import RegistryClient
from nsm.transport import dial
from nsm.wellknown import FORWARDER_SERVICE

log = nsm_log.get_logger(__name__)

T = TypeVar("T")

DEFAULT_PREFIX = "nsmlab"
DEFAULT_STATE_DIR = "/run/nsm-lab"
DEFAULT_SUBNET = "172.30.0.0/24"
DEFAULT_MTU = 1500
REGISTRY_PORT = 5000
MANAGER_PORT = 5001
FABRIC = "fab"
BRIDGE = "br0"
NODE_IFNAME = "eth0"
LOG_LEVELS = ["debug", "info", "warning", "error"]

_PREFIX = re.compile(r"^[A-Za-z0-9_]{1,32}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,62}$")
_RESERVED = frozenset({FABRIC, BRIDGE, "lo"})


# ---------------------------------------------------------------------------------- description


def _pairs(value: Mapping[str, str] | Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    items = value.items() if isinstance(value, Mapping) else value
    return tuple(sorted((str(k), str(v)) for k, v in items))


def _check_name(name: str, what: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidArgument(f"{what} name {name!r} must be 1-63 of [A-Za-z0-9_.-], "
                              f"starting with a letter or digit")
    if name in _RESERVED:
        raise InvalidArgument(f"{what} name {name!r} is reserved")


@dataclass(frozen=True)
class NodeSpec:
    """A node: a namespace on the fabric running a manager and a forwarder. The name is also the
    fabric-side interface name, so at most 15 characters."""

    name: str

    def __post_init__(self) -> None:
        _check_name(self.name, "node")
        validate_ifname(self.name, "node name (also its fabric port name)")


@dataclass(frozen=True)
class PodSpec:
    """A pod: an empty namespace on a node (the forwarder makes its links)."""

    name: str
    node: str

    def __post_init__(self) -> None:
        _check_name(self.name, "pod")


@dataclass(frozen=True)
class EndpointSpec:
    """A network service endpoint running on ``node``; its interfaces go into the pod ``pod``
    (default: a pod of its own named after it)."""

    name: str
    node: str
    services: Sequence[str]
    cidr: str
    labels: tuple[tuple[str, str], ...] = ()
    pod: str = ""

    def __post_init__(self) -> None:
        _check_name(self.name, "endpoint")
        services = (self.services,) if isinstance(self.services, str) else tuple(self.services)
        if not services:
            raise InvalidArgument(f"endpoint {self.name!r} offers no service")
        object.__setattr__(self, "services", services)
        object.__setattr__(self, "labels", _pairs(self.labels))
        try:
            ipaddress.ip_network(self.cidr, strict=False)
        except ValueError as exc:
            raise InvalidArgument(f"endpoint {self.name!r}: {self.cidr!r} is not a CIDR") from exc

    @property
    def pod_name(self) -> str:
        return self.pod or self.name


@dataclass(frozen=True)
class MatchSpec:
    """A service's match: clients whose labels include ``source`` go to endpoints whose labels
    include one of ``routes`` (each a destination selector)."""

    source: tuple[tuple[str, str], ...] = ()
    routes: tuple[tuple[tuple[str, str], ...], ...] = ()
    fallthrough: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "source", _pairs(self.source))
        object.__setattr__(self, "routes", tuple(_pairs(r) for r in self.routes))

    def to_proto(self) -> Match:
        match = Match(source_selector=dict(self.source), fallthrough=self.fallthrough)
        match.routes.extend(Destination(destination_selector=dict(r)) for r in self.routes)
        return match


@dataclass(frozen=True)
class ServiceSpec:
    """A network service registered when the lab starts (endpoints register services they
    offer anyway; declare one here to give it a payload or matches)."""

    name: str
    payload: str = "IP"
    matches: Sequence[MatchSpec] = ()

    def __post_init__(self) -> None:
        if not self.name:
            raise InvalidArgument("a service needs a name")
        if self.payload not in PAYLOADS:
            raise InvalidArgument(f"service {self.name!r}: payload {self.payload!r} is not one of "
                                  f"{', '.join(PAYLOADS)}")
        object.__setattr__(self, "matches", tuple(self.matches))

    def to_proto(self) -> NetworkService:
        ns = NetworkService(name=self.name, payload=self.payload)
        ns.matches.extend(m.to_proto() for m in self.matches)
        return ns


@dataclass(frozen=True)
class Topology:
    """A whole cluster, described apart from building it (see :class:`Lab`). Sequences given
    as lists are stored as tuples (a topology is hashable)."""

    nodes: Sequence[NodeSpec]
    pods: Sequence[PodSpec] = ()
    endpoints: Sequence[EndpointSpec] = ()
    services: Sequence[ServiceSpec] = ()
    #: The node running the registry (default: the first node).
    registry_node: str = ""
    #: The underlay subnet; node i (from 1) gets its i-th address.
    subnet: str = DEFAULT_SUBNET
    mtu: int = DEFAULT_MTU

    def __post_init__(self) -> None:
        for attr in ("nodes", "pods", "endpoints", "services"):
            object.__setattr__(self, attr, tuple(getattr(self, attr)))
        if not self.nodes:
            raise InvalidArgument("a topology needs at least one node")
        nodes = [n.name for n in self.nodes]
        if len(set(nodes)) != len(nodes):
            raise InvalidArgument(f"node names repeat: {nodes}")
        if not self.registry_node:
            object.__setattr__(self, "registry_node", nodes[0])
        elif self.registry_node not in nodes:
            raise InvalidArgument(f"registry node {self.registry_node!r} is not a node")
        try:
            net = ipaddress.IPv4Network(self.subnet)
        except ValueError as exc:
            raise InvalidArgument(f"underlay subnet {self.subnet!r}: {exc}") from exc
        if len(self.nodes) > net.num_addresses - 2:
            raise InvalidArgument(f"{len(self.nodes)} nodes do not fit in {self.subnet}")
        if not 1280 <= self.mtu <= 65535:
            raise InvalidArgument(f"underlay MTU {self.mtu} is out of range")
        # Nodes, pods and endpoints' own pods all become namespaces P-<name>: one name space.
        taken: dict[str, str] = {n: "node" for n in nodes}
        for pod in self.pods:
            if pod.node not in taken or taken[pod.node] != "node":
                raise InvalidArgument(f"pod {pod.name!r} is on unknown node {pod.node!r}")
            if pod.name in taken:
                raise InvalidArgument(f"pod name {pod.name!r} is already a {taken[pod.name]} name")
            taken[pod.name] = "pod"
        names = set()
        for ep in self.endpoints:
            if ep.node not in nodes:
                raise InvalidArgument(f"endpoint {ep.name!r} is on unknown node {ep.node!r}")
            if ep.name in names:
                raise InvalidArgument(f"endpoint name {ep.name!r} repeats")
            names.add(ep.name)
            if ep.pod:
                if taken.get(ep.pod) != "pod":
                    raise InvalidArgument(f"endpoint {ep.name!r}: pod {ep.pod!r} is not a pod")
            elif ep.name in taken:
                raise InvalidArgument(f"endpoint {ep.name!r} would get its own pod, but that name "
                                      f"is already a {taken[ep.name]} name")
            else:
                taken[ep.name] = "endpoint pod"
        services = [s.name for s in self.services]
        if len(set(services)) != len(services):
            raise InvalidArgument(f"service names repeat: {services}")

    @classmethod
    def simple(cls, n_nodes: int, *, pods_per_node: int = 1, service: str | None = None,
               cidr_base: str = "172.16.0.0/16") -> Topology:
        """``n_nodes`` nodes ``node1..nodeN``, each with ``pods_per_node`` pods
        ``node<i>-pod<j>``; with ``service``, one endpoint ``node<i>-nse`` per node offering it
        (addresses from the i-th /24 of ``cidr_base``)."""
        if not 1 <= n_nodes <= 250:
            raise InvalidArgument(f"number of nodes {n_nodes} is out of range 1..250")
        nodes = [NodeSpec(f"node{i}") for i in range(1, n_nodes + 1)]
        pods = [PodSpec(f"{n.name}-pod{j}", n.name) for n in nodes for j in range(1, pods_per_node + 1)]
        endpoints: list[EndpointSpec] = []
        services: list[ServiceSpec] = []
        if service:
            subnets = ipaddress.ip_network(cidr_base).subnets(new_prefix=24)
            endpoints = [EndpointSpec(f"{n.name}-nse", n.name, (service,), str(next(subnets)))
                         for n in nodes]
            services = [ServiceSpec(service)]
        return cls(nodes=tuple(nodes), pods=tuple(pods), endpoints=tuple(endpoints),
                   services=tuple(services))

    def node_ip(self, name: str) -> str:
        """The underlay address of a node (without prefix length)."""
        index = [n.name for n in self.nodes].index(name) + 1
        return str(ipaddress.IPv4Network(self.subnet).network_address + index)

    @property
    def prefixlen(self) -> int:
        return ipaddress.IPv4Network(self.subnet).prefixlen


# ---------------------------------------------------------------------------------- built things


@dataclass(frozen=True)
class LabNode:
    """A built node."""

    name: str
    netns: str
    ip: str
    manager_url: str
    manager_tcp_url: str
    forwarder_url: str
    forwarder_name: str
    manager: Daemon = field(compare=False, repr=False)
    forwarder: Daemon = field(compare=False, repr=False)


@dataclass(frozen=True)
class LabPod:
    """A built pod (or an endpoint's pod)."""

    name: str
    node: str
    netns: str


@dataclass(frozen=True)
class LabEndpoint:
    """A running endpoint."""

    name: str
    node: str
    pod: str
    netns: str
    url: str
    daemon: Daemon = field(compare=False, repr=False)


def validate_prefix(prefix: str) -> str:
    """A lab prefix: 1-32 of ``[A-Za-z0-9_]`` (no ``-``, so ``<prefix>-`` names only this lab)."""
    if not isinstance(prefix, str) or not _PREFIX.match(prefix):
        raise InvalidArgument(f"lab prefix {prefix!r} must be 1-32 of [A-Za-z0-9_] (no '-')")
    return prefix


def _tail(path: Path | None, lines: int | None) -> str:
    if path is None:
        return ""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    if lines is None:
        return text
    return "\n".join(text.splitlines()[-lines:])


async def _gather_all(jobs: Sequence[Awaitable[None]]) -> None:
    """Run all jobs to their end (none is cut short by another's failure); then raise the first
    cancellation, else the first error."""
    results = await asyncio.gather(*jobs, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException) and not isinstance(r, Exception):
            raise r
    for r in results:
        if isinstance(r, Exception):
            raise r


async def _shielded(aw: Awaitable[T]) -> T:
    """Run ``aw`` to completion even if the caller is cancelled meanwhile (teardown must finish);
    re-raise the cancellation afterwards."""
    task = asyncio.ensure_future(aw)
    interrupted = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done():
                break
            interrupted = True
    if interrupted:
        raise asyncio.CancelledError
    return task.result()


class Lab:
    """Builds a :class:`Topology` (``async with Lab(topology, prefix=...) as lab:``).

    ``workdir`` (sockets and logs) must not exist or be empty; default a fresh temporary
    directory. It is removed at teardown, so when the ``async with`` body raises, the daemons'
    logs are printed to stderr first (``print_logs_on_error``; :meth:`format_logs` gives them).
    ``extra_args`` adds flags to daemons by key (see :meth:`daemon`), e.g.
    ``{"forwarder.node2": ["--expiry", "5s"]}``. ``state_file``, if given, gets the lab's JSON
    description (for ``nsm lab status``/``down``).
    """

    def __init__(self, topology: Topology, *, prefix: str = DEFAULT_PREFIX,
                 workdir: str | Path | None = None, state_file: str | Path | None = None,
                 log_level: str = "info", extra_args: Mapping[str, Sequence[str]] | None = None,
                 start_timeout: float = 30.0, stop_timeout: float = 5.0,
                 print_logs_on_error: bool = True) -> None:
        self.topology = topology
        self.print_logs_on_error = print_logs_on_error
        self.prefix = validate_prefix(prefix)
        self._workdir_arg = Path(workdir) if workdir is not None else None
        self.state_file = Path(state_file) if state_file is not None else None
        self.log_level = log_level
        self.extra_args = {k: list(v) for k, v in (extra_args or {}).items()}
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.workdir: Path | None = None
        self._namespaces: list[str] = []  # names created by us, in creation order
        self._node_ns: dict[str, str] = {}
        self._daemons: dict[str, Daemon] = {}
        self._tiers: list[list[str]] = []  # daemon keys in start order, by tier
        self.nodes: dict[str, LabNode] = {}
        self.pods: dict[str, LabPod] = {}
        self.endpoints: dict[str, LabEndpoint] = {}
        self._state = "new"
        self._wrote_state = False
        self.build_seconds = 0.0
        self.teardown_seconds = 0.0
        self._log = log.bind(lab=self.prefix)
        bad = set(self.extra_args) - set(self._all_keys())
        if bad:
            raise InvalidArgument(f"extra_args for unknown daemons: {sorted(bad)}")

    # -------------------------------------------------------------- names

    def ns_name(self, name: str) -> str:
        """The namespace name of a node, pod or endpoint pod (``<prefix>-<name>``)."""
        return f"{self.prefix}-{name}"

    @property
    def fabric_netns(self) -> str:
        return nsns.netns_path(self.ns_name(FABRIC))

    def _all_keys(self) -> list[str]:
        keys = ["registry"]
        for n in self.topology.nodes:
            keys += [f"manager.{n.name}", f"forwarder.{n.name}"]
        keys += [f"nse.{e.name}" for e in self.topology.endpoints]
        return keys

    def _namespace_names(self) -> list[str]:
        t = self.topology
        return ([self.ns_name(FABRIC)] + [self.ns_name(n.name) for n in t.nodes]
                + [self.ns_name(p.name) for p in t.pods]
                + [self.ns_name(e.name) for e in t.endpoints if not e.pod])

    @property
    def registry_node(self) -> str:
        return self.topology.registry_node

    @property
    def registry_url(self) -> str:
        """The registry's unix socket URL (reachable from the root namespace)."""
        return self._url("registry.sock")

    @property
    def registry_tcp_url(self) -> str:
        """The registry's URL on the fabric (what the daemons use)."""
        return f"tcp://{self.topology.node_ip(self.registry_node)}:{REGISTRY_PORT}"

    def _url(self, *parts: str) -> str:
        if self.workdir is None:
            raise FailedPrecondition("the lab is not started")
        return f"unix://{self.workdir.joinpath(*parts)}"

    # -------------------------------------------------------------- access

    def node(self, name: str) -> LabNode:
        try:
            return self.nodes[name]
        except KeyError:
            raise NotFound(f"lab {self.prefix} has no node {name!r}") from None

    def pod(self, name: str) -> LabPod:
        try:
            return self.pods[name]
        except KeyError:
            raise NotFound(f"lab {self.prefix} has no pod {name!r}") from None

    def endpoint(self, name: str) -> LabEndpoint:
        try:
            return self.endpoints[name]
        except KeyError:
            raise NotFound(f"lab {self.prefix} has no endpoint {name!r}") from None

    @property
    def daemons(self) -> dict[str, Daemon]:
        """Daemons by key: ``registry``, ``manager.<node>``, ``forwarder.<node>``, ``nse.<name>``."""
        return dict(self._daemons)

    def daemon(self, key: str | Daemon) -> Daemon:
        if isinstance(key, Daemon):
            if key not in self._daemons.values():
                raise NotFound(f"daemon {key.name!r} is not one of lab {self.prefix}'s")
            return key
        try:
            return self._daemons[key]
        except KeyError:
            raise NotFound(f"lab {self.prefix} has no daemon {key!r} "
                           f"(have: {', '.join(self._daemons)})") from None

    async def kill(self, key: str | Daemon) -> None:
        """SIGKILL a daemon (no chance to clean up: for healing tests)."""
        d = self.daemon(key)
        self._log.info("killing daemon", daemon=d.name, pid=d.pid)
        await d.kill()
        self._write_state()

    async def stop_daemon(self, key: str | Daemon) -> int | None:
        """Stop a daemon gracefully (SIGTERM, then SIGKILL); returns its exit status."""
        d = self.daemon(key)
        status = await d.stop(self.stop_timeout)
        self._write_state()
        return status

    async def start_daemon(self, key: str | Daemon) -> None:
        """Start a stopped or killed daemon again, with the same flags."""
        await self._start(self.daemon(key))
        self._write_state()

    async def restart(self, key: str | Daemon) -> None:
        """Stop (if running) and start a daemon again."""
        d = self.daemon(key)
        await d.stop(self.stop_timeout)
        await self._start(d)
        self._write_state()

    def logs(self, lines: int | None = None) -> dict[str, str]:
        """Each daemon's log (the last ``lines`` lines), by key."""
        return {k: _tail(d.log_path, lines) for k, d in self._daemons.items()}

    def format_logs(self, lines: int | None = 60) -> str:
        """All daemons' logs as one printable text (for test failures)."""
        parts = []
        for key, text in self.logs(lines).items():
            d = self._daemons[key]
            parts.append(f"----- {key} (pid {d.pid}, {d.log_path}) -----\n{text}")
        return "\n".join(parts)

    # -------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> Lab:
        await self.start()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        if e is not None and self.print_logs_on_error:
            print(f"===== lab {self.prefix}: {type(e).__name__}; the daemons' logs =====\n"
                  f"{self.format_logs()}", file=sys.stderr, flush=True)
        await _shielded(self.stop())

    async def start(self) -> Lab:
        """Build everything; on any failure (or cancellation) tear down what was built and
        raise."""
        if self._state != "new":
            raise FailedPrecondition(f"lab {self.prefix} was already started")
        if os.geteuid() != 0:
            raise FailedPrecondition("the lab needs root (it creates namespaces and links)")
        self._state = "starting"
        t0 = time.perf_counter()
        self._log.info("lab building", nodes=len(self.topology.nodes), pods=len(self.topology.pods),
                       endpoints=len(self.topology.endpoints))
        try:
            await self._build()
        except BaseException as exc:
            self._log.error("lab build failed; tearing down", error=str(exc) or type(exc).__name__)
            await _shielded(self.stop())
            raise
        self.build_seconds = time.perf_counter() - t0
        self._state = "running"
        self._write_state()
        self._log.info("lab ready", seconds=round(self.build_seconds, 2))
        return self

    async def _build(self) -> None:
        existing = [n for n in self._namespace_names() if nsns.netns_exists(n)]
        if existing:
            raise AlreadyExists(
                f"namespaces of lab {self.prefix!r} exist already ({', '.join(existing)}): another "
                f"lab with this prefix is running, or one was left behind; remove it with "
                f"`nsm lab down --prefix {self.prefix}`")
        self.workdir = self._make_workdir()
        (self.workdir / "logs").mkdir()
        self._write_state()  # early, so that `nsm lab down` finds the work dir of a crashed build
        await self._build_network()
        self._define_daemons()
        await self._start_daemons()
        await self._wait_registered()

    def _make_workdir(self) -> Path:
        if self._workdir_arg is None:
            return Path(tempfile.mkdtemp(prefix=f"nsmlab-{self.prefix}-"))
        path = self._workdir_arg
        path.mkdir(parents=True, exist_ok=True)
        if any(path.iterdir()):
            raise FailedPrecondition(f"lab work directory {path} is not empty")
        return path

    def _create_netns(self, name: str) -> str:
        # Synchronous (about a millisecond): a cancelled thread would leave an unrecorded one.
        path = nsns.create_netns(name)
        self._namespaces.append(name)
        return path

    async def _build_network(self) -> None:
        t = self.topology
        netlink = Netlink(prune_interval=0)
        try:
            fabric = self._create_netns(self.ns_name(FABRIC))
            await netlink.create_bridge(BRIDGE, fabric, mtu=t.mtu)
            await netlink.set_up(fabric, BRIDGE)
            node_ns = self._node_ns
            for n in t.nodes:
                node_ns[n.name] = self._create_netns(self.ns_name(n.name))

            async def wire(node: str) -> None:
                ns = node_ns[node]
                await netlink.create_veth(NODE_IFNAME, ns, node, fabric, mtu=t.mtu,
                                          alias=f"nsm-lab-{self.prefix}-underlay",
                                          peer_alias=f"nsm-lab-{self.prefix}-{node}")
                await netlink.set_master(fabric, node, BRIDGE)
                await netlink.set_up(fabric, node)
                await netlink.setup_interface(
                    ns, NODE_IFNAME, addresses=[f"{t.node_ip(node)}/{t.prefixlen}"], routes=[],
                    mtu=t.mtu)
                # A node routes its pods' traffic (routed VXLAN payloads), both families.
                await netlink.set_sysctl_in_netns(ns, "net.ipv4.ip_forward", 1)
                await netlink.set_sysctl_in_netns(ns, "net.ipv6.conf.all.forwarding", 1)

            await asyncio.gather(*(wire(n.name) for n in t.nodes))
            for pod in t.pods:
                self.pods[pod.name] = LabPod(pod.name, pod.node,
                                             self._create_netns(self.ns_name(pod.name)))
            for ep in t.endpoints:
                if not ep.pod:
                    self.pods[ep.name] = LabPod(ep.name, ep.node,
                                                self._create_netns(self.ns_name(ep.name)))
        finally:
            await netlink.close()  # its sockets would pin the namespaces

    def _new_daemon(self, key: str, args: list[str], url: str, netns: str) -> Daemon:
        assert self.workdir is not None
        args = [*args, "--log-level", self.log_level, *self.extra_args.get(key, [])]
        d = Daemon(key, args, url=url, log_path=self.workdir / "logs" / f"{key}.log", netns=netns,
                   env={"PYTHONUNBUFFERED": "1"})
        self._daemons[key] = d
        return d

    def _define_daemons(self) -> None:
        t = self.topology
        assert self.workdir is not None
        reg_ns = self._node_ns[t.registry_node]
        self._new_daemon("registry", [
            "registry", "--listen", self.registry_url, "--listen", self.registry_tcp_url,
        ], self.registry_url, reg_ns)
        for n in t.nodes:
            (self.workdir / n.name).mkdir()
            ip = t.node_ip(n.name)
            mgr_url = self._url(n.name, "nsm.sock")
            mgr_tcp = f"tcp://{ip}:{MANAGER_PORT}"
            fwd_url = self._url(n.name, "fwd.sock")
            fwd_name = f"{n.name}-fwd"
            mgr = self._new_daemon(f"manager.{n.name}", [
                "manager", "--name", n.name, "--listen", mgr_url, "--listen", mgr_tcp,
                "--registry", self.registry_tcp_url,
            ], mgr_url, self._node_ns[n.name])
            fwd = self._new_daemon(f"forwarder.{n.name}", [
                "forwarder", "--name", fwd_name, "--node", n.name, "--listen", fwd_url,
                "--manager", mgr_url, "--registry", mgr_url,
            ], fwd_url, self._node_ns[n.name])
            self.nodes[n.name] = LabNode(n.name, self._node_ns[n.name], ip, mgr_url, mgr_tcp,
                                         fwd_url, fwd_name, mgr, fwd)
        for ep in t.endpoints:
            url = self._url(ep.node, f"{ep.name}.sock")
            pod = self.pods[ep.pod_name]
            # Registered through its node's manager, which advertises its own tcp URL for it.
            args = ["nse", "--name", ep.name, "--cidr", ep.cidr, "--netns", pod.netns,
                    "--listen", url, "--registry", self.nodes[ep.node].manager_url]
            for s in ep.services:
                args += ["--service", s]
            for k, v in ep.labels:
                args += ["--label", f"{k}={v}"]
            d = self._new_daemon(f"nse.{ep.name}", args, url, self._node_ns[ep.node])
            self.endpoints[ep.name] = LabEndpoint(ep.name, ep.node, pod.name, pod.netns, url, d)
        self._tiers = [["registry"], [k for k in self._daemons if k.split(".")[0] == "manager"],
                       [k for k in self._daemons if k.split(".")[0] == "forwarder"],
                       [k for k in self._daemons if k.startswith("nse.")]]

    async def _start(self, d: Daemon) -> None:
        try:
            await d.start(self.start_timeout)
        except NsmError as exc:
            tail = _tail(d.log_path, 25).strip() or "(empty log)"
            raise Unavailable(f"lab {self.prefix}: {d.name} did not start: {exc.message}\n"
                              f"--- last lines of {d.log_path} ---\n{tail}") from exc
        self._log.info("daemon serving", daemon=d.name, pid=d.pid, url=d.url)

    async def _start_daemons(self) -> None:
        await self._start(self._daemons["registry"])
        if self.topology.services:
            channel = dial(self.registry_url)
            try:
                client = RegistryClient(channel, timeout=5.0)
                for s in self.topology.services:
                    await client.register_ns(s.to_proto())
            finally:
                await channel.close()

        # Per node the manager, then its forwarder; the nodes concurrently; then the endpoints.
        async def node(name: str) -> None:
            await self._start(self._daemons[f"manager.{name}"])
            await self._start(self._daemons[f"forwarder.{name}"])

        await _gather_all([node(n.name) for n in self.topology.nodes])
        await _gather_all([self._start(self._daemons[k]) for k in self._tiers[3]])

    async def _wait_registered(self, timeout: float | None = None) -> None:
        """Wait until every forwarder and endpoint is in the registry."""
        want = {n.forwarder_name for n in self.nodes.values()} | set(self.endpoints)
        deadline = time.monotonic() + (timeout or self.start_timeout)
        channel = dial(self.registry_url)
        try:
            client = RegistryClient(channel, timeout=2.0)
            while True:
                have = {nse.name for nse in await client.find_nse()}
                if want <= have:
                    return
                if time.monotonic() > deadline:
                    raise Unavailable(f"lab {self.prefix}: not registered after "
                                      f"{timeout or self.start_timeout:.0f}s: "
                                      f"{', '.join(sorted(want - have))}")
                await asyncio.sleep(0.05)
        finally:
            await channel.close()

    async def forwarders(self) -> list[str]:
        """Names of the forwarders registered now (``Find`` service ``forwarder``)."""
        channel = dial(self.registry_url)
        try:
            found = await RegistryClient(channel, timeout=5.0).find_nse()
        finally:
            await channel.close()
        return sorted(n.name for n in found if FORWARDER_SERVICE in n.network_service_names)

    async def stop(self) -> None:
        """Tear everything down (idempotent): daemons (endpoints first), any process left in the
        lab's namespaces, the namespaces, the work directory and the state file."""
        if self._state in ("new", "stopped"):
            return
        self._state = "stopping"
        t0 = time.perf_counter()
        for tier in reversed(self._tiers):
            await asyncio.gather(*(self._stop_quietly(self._daemons[k]) for k in tier))
        for d in self._daemons.values():  # not in a tier (the build failed early)
            await self._stop_quietly(d)
        paths = [nsns.netns_path(n) for n in self._namespaces]
        ended = await asyncio.to_thread(end_processes_in, paths, self.stop_timeout)
        if ended:
            self._log.warning("ended stray processes in the lab's namespaces", pids=ended)
        # Pods first, then nodes, the fabric last (the reverse of creation).
        for name in reversed(self._namespaces):
            try:
                nsns.delete_netns(name)
            except NsmError as exc:
                self._log.error("cannot delete namespace", netns=name, error=exc.message)
        self._namespaces.clear()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
        if self.state_file is not None and self._wrote_state:
            with contextlib.suppress(FileNotFoundError):
                self.state_file.unlink()
        self.teardown_seconds = time.perf_counter() - t0
        self._state = "stopped"
        self._log.info("lab torn down", seconds=round(self.teardown_seconds, 2))

    async def _stop_quietly(self, d: Daemon) -> None:
        try:
            await d.stop(self.stop_timeout)
        except (OSError, ProcessLookupError) as exc:
            self._log.warning("cannot stop daemon", daemon=d.name, error=str(exc))

    # -------------------------------------------------------------- state file

    def describe(self) -> dict[str, Any]:
        """The lab as JSON-able data (what the state file holds)."""
        return {
            "prefix": self.prefix,
            "state": self._state,
            "ready": self._state == "running",
            "supervisor": _identity(os.getpid()),
            "workdir": str(self.workdir) if self.workdir else None,
            "fabric": self.fabric_netns,
            "namespaces": [nsns.netns_path(n) for n in self._namespaces],
            "registry": ({"url": self.registry_url, "tcp_url": self.registry_tcp_url,
                          "node": self.registry_node} if self.workdir else None),
            "nodes": {n.name: {"netns": n.netns, "ip": n.ip, "manager_url": n.manager_url,
                               "manager_tcp_url": n.manager_tcp_url,
                               "forwarder_url": n.forwarder_url, "forwarder": n.forwarder_name}
                      for n in self.nodes.values()},
            "pods": {p.name: {"node": p.node, "netns": p.netns} for p in self.pods.values()},
            "endpoints": {e.name: {"node": e.node, "pod": e.pod, "url": e.url}
                          for e in self.endpoints.values()},
            "daemons": {k: {"pid": d.pid, "start_time": _start_time(d.pid) if d.pid else None,
                            "netns": d.netns, "url": d.url, "log": str(d.log_path),
                            "args": d.args}
                        for k, d in self._daemons.items()},
        }

    def _write_state(self) -> None:
        if self.state_file is None or self._state in ("stopping", "stopped"):
            return
        write_json(self.state_file, self.describe())
        self._wrote_state = True


# ---------------------------------------------------------------------------------- processes


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write a JSON file atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (None if it is gone or a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2:].split()
    if fields[0] == b"Z":
        return None
    return int(fields[19])


def _identity(pid: int) -> dict[str, Any]:
    return {"pid": pid, "start_time": _start_time(pid)}


def is_alive(pid: int | None, start_time: int | None = None) -> bool:
    """Whether ``pid`` runs (and, if ``start_time`` is given, is still the same process)."""
    if not pid:
        return False
    now = _start_time(pid)
    return now is not None and (start_time is None or now == start_time)


def pids_in_netns(paths: Iterable[str]) -> list[int]:
    """Processes (other than this one) whose network namespace is one of ``paths``."""
    inodes = set()
    for path in paths:
        with contextlib.suppress(OSError):
            inodes.add(f"net:[{os.stat(path).st_ino}]")
    if not inodes:
        return []
    found = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            if os.readlink(f"/proc/{entry}/ns/net") in inodes:
                found.append(int(entry))
        except OSError:
            continue
    return found


def _end(pids: Sequence[tuple[int, int | None]], timeout: float) -> list[int]:
    """SIGTERM each (pid, start time) still alive, wait up to ``timeout``, then SIGKILL."""
    alive = [(p, st) for p, st in pids if is_alive(p, st)]
    for pid, _ in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(is_alive(p, st) for p, st in alive) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid, st in alive:
        if is_alive(pid, st):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return [p for p, _ in alive]


def end_processes_in(paths: Iterable[str], timeout: float = 5.0) -> list[int]:
    """End (SIGTERM, then SIGKILL) every process inside the given network namespaces."""
    return _end([(p, _start_time(p)) for p in pids_in_netns(paths)], timeout)


# ---------------------------------------------------------------------------------- cleanup


@dataclass
class CleanupReport:
    """What :func:`cleanup` removed."""

    processes: list[int] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.processes or self.namespaces or self.files)


def state_path(prefix: str, state_dir: str | Path = DEFAULT_STATE_DIR) -> Path:
    return Path(state_dir) / f"{validate_prefix(prefix)}.json"


def read_state(prefix: str, state_dir: str | Path = DEFAULT_STATE_DIR) -> dict[str, Any] | None:
    """The state file of a lab, or None if there is none (or it is unreadable)."""
    try:
        data = json.loads(state_path(prefix, state_dir).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def lab_namespaces(prefix: str) -> list[str]:
    """Named namespaces that belong to the lab ``prefix`` (``<prefix>-*``)."""
    start = validate_prefix(prefix) + "-"
    return [n for n in nsns.list_netns() if n.startswith(start)]


def cleanup(prefix: str, *, state_dir: str | Path | None = DEFAULT_STATE_DIR,
            timeout: float = 10.0) -> CleanupReport:
    """Remove what a lab with this prefix left behind (e.g. after its supervisor crashed):
    its supervisor and daemons recorded in the state file (by pid, checked to be the same
    process), any process inside its namespaces, the namespaces, its work directory and state
    file. Idempotent; blocking (call it through ``asyncio.to_thread`` from async code)."""
    report = CleanupReport()
    state = read_state(prefix, state_dir) if state_dir is not None else None
    if state:
        sup = state.get("supervisor") or {}
        if sup.get("pid") and sup.get("pid") != os.getpid():
            # The supervisor tears down by itself on SIGTERM: give it the time to.
            report.processes += _end([(sup["pid"], sup.get("start_time"))], timeout)
        recorded = [(d["pid"], d.get("start_time")) for d in (state.get("daemons") or {}).values()
                    if d.get("pid") and d.get("start_time")]
        report.processes += _end(recorded, min(timeout, 5.0))
    names = lab_namespaces(prefix)
    report.processes += end_processes_in([nsns.netns_path(n) for n in names], min(timeout, 5.0))
    for name in sorted(names, key=lambda n: n == f"{prefix}-{FABRIC}"):
        if nsns.delete_netns(name):
            report.namespaces.append(name)
    if state and state_dir is not None:
        workdir = state.get("workdir")
        # Only a work dir this lab made under the state dir, never an arbitrary path.
        if workdir and Path(workdir).resolve() == (Path(state_dir) / prefix).resolve() \
                and Path(workdir).is_dir():
            shutil.rmtree(workdir, ignore_errors=True)
            report.files.append(workdir)
    if state_dir is not None:
        for path in (state_path(prefix, state_dir), Path(state_dir) / f"{prefix}.log"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                report.files.append(str(path))
    report.processes = sorted(set(report.processes))
    return report


# ---------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``nsm lab up|down|status`` (every flag also reads ``NSM_<FLAG>``)."""
    sub = parser.add_subparsers(dest="lab_command", required=True, metavar="ACTION")

    def common(p: argparse.ArgumentParser) -> None:
        flag(p, "--prefix", default=DEFAULT_PREFIX,
             help="lab name: namespaces are <prefix>-<node|pod>; [A-Za-z0-9_] only")
        flag(p, "--state-dir", default=DEFAULT_STATE_DIR,
             help="where the state file <prefix>.json and the work directory live")

    up = sub.add_parser("up", help="build a lab and leave it running in the background",
                        description="Build an emulated cluster and leave it running.")
    common(up)
    flag(up, "--nodes", type=int, default=2, help="number of nodes")
    flag(up, "--pods-per-node", type=int, default=1, help="empty pod namespaces per node")
    flag(up, "--service", default="",
         help="if set, run an endpoint <node>-nse offering this service on every node")
    flag(up, "--log-level", default="info", choices=LOG_LEVELS, help="daemons' log level")
    flag(up, "--timeout", type=float, default=120.0, help="seconds to wait for the lab")
    flag(up, "--foreground", switch=True, default=False,
         help="build, then stay in the foreground until SIGTERM/Ctrl-C, then tear down")
    down = sub.add_parser("down", help="tear a lab down (idempotent)",
                          description="Tear down a lab started with `nsm lab up`, and any leftover "
                                      "of one with this prefix.")
    common(down)
    status = sub.add_parser("status", help="show a lab and whether its daemons serve",
                            description="Show a running lab.")
    common(status)
    flag(status, "--json", switch=True, default=False, help="print the state file's JSON")


async def run(args: argparse.Namespace) -> int:
    nsm_log.setup("warning")
    validate_prefix(args.prefix)
    if args.lab_command == "up":
        if os.geteuid() != 0:
            raise FailedPrecondition("needs root (it creates network namespaces and links)")
        return await (_up_foreground(args) if args.foreground else _up(args))
    if args.lab_command == "down":
        return await _down(args)
    return await _status(args)


def _topology(args: argparse.Namespace) -> Topology:
    return Topology.simple(args.nodes, pods_per_node=args.pods_per_node,
                           service=args.service or None)


def _spawn_supervisor(nsm_args: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start ``nsm <nsm_args>`` in a session of its own, output to ``log_path``. A plain Popen
    (asyncio's would kill the process when its transport is collected): it outlives us. Its
    environment has no ``NSM_*`` variables: every setting is in ``nsm_args``, and the daemons it
    starts must not pick up ours (``NSM_SERVICE`` would add a service to every endpoint)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NSM_")}
    with open(log_path, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "nsm.cli", *nsm_args], env=env,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True)


async def _up(args: argparse.Namespace) -> int:
    """Start the supervisor detached, wait until it reports the lab ready."""
    _topology(args)  # bad input fails here, not in the background
    state_dir = Path(args.state_dir)
    current = read_state(args.prefix, state_dir)
    if current and is_alive(current["supervisor"]["pid"], current["supervisor"]["start_time"]):
        print(f"nsm lab: lab {args.prefix!r} is already up (supervisor pid "
              f"{current['supervisor']['pid']}); `nsm lab down --prefix {args.prefix}` first",
              file=sys.stderr)
        return 1
    log_path = state_dir / f"{args.prefix}.log"
    sup = _spawn_supervisor(
        ["lab", "up", "--foreground", "--prefix", args.prefix, "--state-dir", str(state_dir),
         "--nodes", str(args.nodes), "--pods-per-node", str(args.pods_per_node),
         "--service", args.service, "--log-level", args.log_level, "--timeout", str(args.timeout)],
        log_path)
    t0 = time.monotonic()
    try:
        state = await _wait_ready(args, sup, log_path, t0)
    except BaseException:  # Ctrl-C while waiting: the supervisor tears down what it built
        _stop_supervisor(sup)
        raise
    if state is None:
        return 1
    _print_summary(state, state_path(args.prefix, state_dir), time.monotonic() - t0)
    return 0


def _stop_supervisor(sup: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    if sup.poll() is None:
        sup.terminate()
        try:
            sup.wait(timeout)
        except subprocess.TimeoutExpired:
            sup.kill()
            sup.wait()


async def _wait_ready(args: argparse.Namespace, sup: subprocess.Popen[bytes], log_path: Path,
                      t0: float) -> dict[str, Any] | None:
    """The state once the supervisor reports the lab ready; None (reported, cleaned up) if it
    failed or took too long."""
    state_dir = Path(args.state_dir)
    while True:
        state = read_state(args.prefix, state_dir)
        if state and state.get("ready") and state["supervisor"]["pid"] == sup.pid:
            return state
        if sup.poll() is not None:
            print(f"nsm lab: building the lab failed (exit {sup.returncode}); its output:\n"
                  f"{_tail(log_path, 40)}", file=sys.stderr)
            return None  # it tore down what it had built
        if time.monotonic() - t0 > args.timeout:
            print(f"nsm lab: the lab is not ready after {args.timeout:.0f}s; tearing down",
                  file=sys.stderr)
            await asyncio.to_thread(_stop_supervisor, sup)
            return None
        await asyncio.sleep(0.1)


def _print_summary(state: Mapping[str, Any], path: Path, seconds: float) -> None:
    prefix = state["prefix"]
    print(f"lab {prefix!r} up in {seconds:.1f}s (supervisor pid {state['supervisor']['pid']})")
    reg = state["registry"]
    print(f"  registry  on {reg['node']}: {reg['tcp_url']}  (from this host: {reg['url']})")
    for name, n in state["nodes"].items():
        print(f"  {name:8}  {n['ip']:15} netns {n['netns']}")
        print(f"            manager {n['manager_tcp_url']}  {n['manager_url']}")
    for name, p in state["pods"].items():
        print(f"  pod {name} on {p['node']}: netns {p['netns']}")
    first = next(iter(state["nodes"].values()))
    print(f"state: {path}\n"
          f"enter a node:  nsenter --net={first['netns']} bash\n"
          f"request:       nsm nsc --manager {first['manager_url']} --service <S> --netns <pod netns>\n"
          f"tear down:     nsm lab down --prefix {prefix}")


async def _up_foreground(args: argparse.Namespace) -> int:
    """Be the lab's supervisor: build, write the state file, wait for SIGTERM/SIGINT."""
    nsm_log.setup("info")
    state_dir = Path(args.state_dir)
    lab = Lab(_topology(args), prefix=args.prefix, workdir=state_dir / args.prefix,
              state_file=state_path(args.prefix, state_dir), log_level=args.log_level,
              start_timeout=args.timeout)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stopping.set)
    try:
        building = asyncio.create_task(lab.start(), name="lab-build")
        waiting = asyncio.create_task(stopping.wait(), name="lab-signal")
        await asyncio.wait({building, waiting}, return_when=asyncio.FIRST_COMPLETED)
        if not building.done():
            building.cancel()  # tears down what was built
        try:
            await building
        except asyncio.CancelledError:
            waiting.cancel()
            print("nsm lab: interrupted while building; torn down", file=sys.stderr, flush=True)
            return 130
        except Exception as exc:
            waiting.cancel()
            text = exc.message if isinstance(exc, NsmError) else f"{type(exc).__name__}: {exc}"
            print(f"nsm lab: building the lab failed (torn down): {text}", file=sys.stderr,
                  flush=True)
            return 1
        _print_summary(lab.describe(), state_path(args.prefix, state_dir), lab.build_seconds)
        sys.stdout.flush()
        await waiting
    finally:
        await _shielded(lab.stop())
        for sig in signals:
            loop.remove_signal_handler(sig)
    print(f"lab {args.prefix!r} torn down in {lab.teardown_seconds:.1f}s", flush=True)
    return 0


async def _down(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    report = await asyncio.to_thread(cleanup, args.prefix, state_dir=args.state_dir)
    if report.empty:
        print(f"lab {args.prefix!r}: nothing to tear down")
    else:
        print(f"lab {args.prefix!r} torn down in {time.monotonic() - t0:.1f}s: "
              f"{len(report.processes)} processes ended, "
              f"{len(report.namespaces)} namespaces deleted, {len(report.files)} files removed")
    return 0


async def _status(args: argparse.Namespace) -> int:
    state = read_state(args.prefix, args.state_dir)
    leftovers = lab_namespaces(args.prefix)
    if state is None:
        if leftovers:
            print(f"lab {args.prefix!r}: no state file, but namespaces are left: "
                  f"{', '.join(leftovers)} (`nsm lab down --prefix {args.prefix}`)")
            return 1
        print(f"lab {args.prefix!r} is not up")
        return 3
    if args.json:
        print(json.dumps(state, indent=2))
    sup = state.get("supervisor") or {}
    sup_alive = is_alive(sup.get("pid"), sup.get("start_time"))
    daemons = state.get("daemons") or {}

    async def serving(url: str) -> bool:
        try:
            await wait_serving(url, timeout=1.0)
        except NsmError:
            return False
        return True

    health = await asyncio.gather(*(serving(d["url"]) for d in daemons.values()))
    ok = sup_alive and bool(state.get("ready")) and all(health)
    if not args.json:
        print(f"lab {args.prefix!r}: {'up' if ok else 'DEGRADED' if sup_alive else 'DEAD'} "
              f"(supervisor pid {sup.get('pid')} {'running' if sup_alive else 'gone'}, "
              f"{'ready' if state.get('ready') else 'building'})")
        for (key, d), good in zip(daemons.items(), health, strict=True):
            alive = is_alive(d.get("pid"), d.get("start_time"))
            what = "serving" if good else ("running, not serving" if alive else "not running")
            print(f"  {key:24} pid {d.get('pid')!s:8} {what:22} {d['url']}")
    return 0 if ok else 1

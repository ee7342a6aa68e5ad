"""What an emulated cluster is made of, described apart from building it (:mod:`nsm.lab.builder`):
nodes, pods, endpoints and services as frozen dataclasses. Nothing happens when one is made,
except that bad input is refused (``InvalidArgument``) before anything is built."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from nsm.api.registry_pb2 import Destination, Match, NetworkService
from nsm.errors import InvalidArgument
from nsm.mechanisms import PAYLOADS, validate_ifname

DEFAULT_PREFIX = "nsmlab"
DEFAULT_SUBNET = "172.30.0.0/24"
DEFAULT_MTU = 1500
#: The fabric's namespace is ``<prefix>-fab``; its bridge ``br0``.
FABRIC = "fab"
BRIDGE = "br0"

_PREFIX = re.compile(r"^[A-Za-z0-9_]{1,32}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,62}$")
_RESERVED = frozenset({FABRIC, BRIDGE, "lo"})


def validate_prefix(prefix: str) -> str:
    """A lab prefix: 1-32 of ``[A-Za-z0-9_]`` (no ``-``, so ``<prefix>-`` names only this lab)."""
    if not isinstance(prefix, str) or not _PREFIX.match(prefix):
        raise InvalidArgument(f"lab prefix {prefix!r} must be 1-32 of [A-Za-z0-9_] (no '-')")
    return prefix


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
    fabric-side interface name, so at most 15 characters. ``advertise_unix``: other nodes reach
    its manager by its unix socket (the lab's nodes share one file system) instead of its tcp URL,
    as with a manager whose socket is shared through a hostPath."""

    name: str
    advertise_unix: bool = False

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

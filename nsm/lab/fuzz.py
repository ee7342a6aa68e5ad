"""Hypothesis strategies of every server's inputs, for the fuzz tests (test tooling: only tests
import this module, and it is the only one that imports hypothesis).

Messages are arbitrary but plausible enough to get past the first checks now and then: strings
include unicode, NUL and very long ones; maps, enums and numbers are random; mechanisms are
KERNEL, VXLAN or random, with random parameters; a KERNEL ``inodeURL`` is either garbage or one
of the namespaces the caller passes (never a path of the host's), so a request that happens to
be valid builds only in the test's own pods.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hypothesis import strategies as st

from nsm.api.connection_pb2 import Connection, Mechanism, MonitorScopeSelector, PathSegment
from nsm.api.networkservice_pb2 import NetworkServiceRequest
from nsm.api.registry_pb2 import (
    NetworkService,
    NetworkServiceEndpoint,
    NetworkServiceEndpointQuery,
    NetworkServiceQuery,
)
from nsm.mechanisms import KERNEL, LOCAL, MTU, NAME, NETNS_INODE_URL, REMOTE, VNI, VXLAN

INT32 = st.integers(-(2**31), 2**31 - 1)
UINT32 = st.integers(0, 2**32 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)

#: Strings: short unicode (NUL and control characters included), ASCII names, or very long.
TEXT = st.one_of(
    st.text(max_size=20),
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=127), max_size=40),
    st.builds(lambda c, n: c * n, st.sampled_from(["x", "\x00", "é", "/"]),
              st.sampled_from([254, 1025, 4097, 8193, 70_000])),
)


#: Short strings only: the items of lists that may be repeated thousands of times.
SHORT = st.text(max_size=20)


def texts(*known: str) -> st.SearchStrategy[str]:
    """A random string, or one of ``known`` (valid values, so later checks are reached too)."""
    return st.one_of(st.sampled_from(known), TEXT) if known else TEXT


def maps(keys: st.SearchStrategy[str] = TEXT, max_size: int = 4) -> st.SearchStrategy[dict[str, str]]:
    return st.one_of(
        st.dictionaries(keys, TEXT, max_size=max_size),
        st.builds(lambda n: {f"k{i}": "v" for i in range(n)}, st.sampled_from([65, 300])),
    )


def lists(strategy: st.SearchStrategy[Any], max_size: int = 3, *,
          many: st.SearchStrategy[Any] | None = None) -> st.SearchStrategy[list[Any]]:
    """A few items, or a great many copies of one drawn from ``many`` (small items: a list of
    them still fits a message)."""
    few = st.lists(strategy, max_size=max_size)
    if many is None:
        return few
    return st.one_of(few, st.builds(lambda x, n: [x] * n, many, st.sampled_from([70, 2000])))


ADDRESS = st.one_of(st.sampled_from(["10.0.0.1/32", "172.30.0.9/32", "fd00::1/128", "10.0.0.0/8", "",
                                     "10.0.0.1"]), SHORT)


ONE_MECHANISM = st.just(Mechanism(cls=LOCAL, type=KERNEL))
ONE_SEGMENT = st.just(PathSegment(name="x"))


@st.composite
def mechanisms(draw: Any, netns: Sequence[str] = ()) -> Mechanism:
    kind = draw(texts(KERNEL, VXLAN, "MEMIF"))
    params = draw(maps(texts(NAME, NETNS_INODE_URL, MTU, VNI, "src_ip", "dst_ip")))
    if kind == KERNEL and draw(st.booleans()):
        params[NETNS_INODE_URL] = draw(st.one_of(
            st.sampled_from(list(netns) or ["file:///nonexistent"]),
            # By identity: well-formed (no such namespace, mostly) or not.
            st.builds(lambda d, i: f"inode://{d}/{i}", st.integers(0, 2**64), st.integers(0, 2**64)),
            st.sampled_from(["inode://", "inode://4", "inode://4/x", "inode://4/5/6"])))
        params[NAME] = draw(texts("nsm-1", "nsm-fuzz"))
    return Mechanism(cls=draw(texts(LOCAL, REMOTE)), type=kind, parameters=params)


@st.composite
def segments(draw: Any) -> PathSegment:
    segment = PathSegment(name=draw(texts("nsc", "fuzz")), id=draw(TEXT), token=draw(TEXT),
                          metrics=draw(maps()))
    if draw(st.booleans()):
        segment.expires.seconds = draw(INT64)
        segment.expires.nanos = draw(INT32)
    return segment


@st.composite
def connections(draw: Any, service: str = "", netns: Sequence[str] = ()) -> Connection:
    conn = Connection(
        id=draw(texts("fuzz-1")), network_service=draw(texts(service) if service else TEXT),
        network_service_endpoint_name=draw(TEXT), payload=draw(texts("IP", "ETHERNET")),
        labels=draw(maps()), state=draw(st.integers(-1, 5)))
    if draw(st.booleans()):
        conn.mechanism.CopyFrom(draw(mechanisms(netns)))
    conn.path.path_segments.extend(draw(lists(segments(), max_size=4, many=ONE_SEGMENT)))
    conn.path.index = draw(UINT32)
    ctx = conn.context
    ctx.MTU = draw(UINT32)
    ctx.extra_context.update(draw(maps()))
    ip = ctx.ip_context
    ip.src_ip_addrs.extend(draw(lists(ADDRESS, many=ADDRESS)))
    ip.dst_ip_addrs.extend(draw(lists(ADDRESS, many=ADDRESS)))
    ip.excluded_prefixes.extend(draw(lists(ADDRESS, many=ADDRESS)))
    ip.extra_prefixes.extend(draw(lists(ADDRESS, many=ADDRESS)))
    for route in draw(lists(st.tuples(ADDRESS, ADDRESS), many=st.tuples(ADDRESS, ADDRESS))):
        draw(st.sampled_from([ip.src_routes, ip.dst_routes])).add(prefix=route[0], nextHop=route[1])
    for neighbor in draw(lists(st.tuples(ADDRESS, SHORT), many=st.tuples(ADDRESS, SHORT))):
        ip.ip_neighbors.add(ip=neighbor[0], hardware_address=neighbor[1])
    ip.src_ip_required, ip.dst_ip_required = draw(st.booleans()), draw(st.booleans())
    for _ in range(draw(st.integers(0, 2))):
        ip.extra_prefix_request.add(prefix_len=draw(UINT32), required_number=draw(UINT32),
                                    requested_number=draw(UINT32))
        policy = ip.policies.add(proto=draw(TEXT), dst_port=draw(TEXT), src_port=draw(TEXT))
        policy.routes.add(prefix=draw(ADDRESS))
    for _ in range(draw(st.integers(0, 2))):
        ctx.dns_context.configs.add(dns_server_ips=draw(lists(ADDRESS, many=ADDRESS)),
                                    search_domains=draw(lists(SHORT, many=SHORT)))
    ctx.ethernet_context.src_mac, ctx.ethernet_context.dst_mac = draw(TEXT), draw(TEXT)
    ctx.ethernet_context.vlan_tag = draw(INT32)
    return conn


@st.composite
def requests(draw: Any, service: str = "", netns: Sequence[str] = ()) -> NetworkServiceRequest:
    return NetworkServiceRequest(connection=draw(connections(service, netns)),
                                 mechanism_preferences=draw(lists(mechanisms(netns), many=ONE_MECHANISM)))


@st.composite
def selectors(draw: Any) -> MonitorScopeSelector:
    return MonitorScopeSelector(path_segments=draw(lists(segments(), many=ONE_SEGMENT)),
                                network_services=draw(lists(SHORT, many=SHORT)))


@st.composite
def network_services(draw: Any) -> NetworkService:
    ns = NetworkService(name=draw(texts("fuzz-svc")), payload=draw(texts("IP", "ETHERNET")))
    for _ in range(draw(st.integers(0, 2))):
        match = ns.matches.add(source_selector=draw(maps()), fallthrough=draw(st.booleans()))
        for _ in range(draw(st.integers(0, 2))):
            match.routes.add(destination_selector=draw(maps()))
    return ns


@st.composite
def endpoints(draw: Any) -> NetworkServiceEndpoint:
    nse = NetworkServiceEndpoint(
        name=draw(texts("fuzz-nse", "")), url=draw(texts("unix:///run/fuzz.sock", "tcp://10.0.0.1:5000")),
        network_service_names=draw(lists(texts("fuzz-svc"), many=SHORT)))
    for service, labels in draw(st.dictionaries(texts("fuzz-svc"), maps(), max_size=2)).items():
        nse.network_service_labels[service].labels.update(labels)
    if draw(st.booleans()):
        nse.expiration_time.seconds = draw(INT64)
        nse.expiration_time.nanos = draw(INT32)
    if draw(st.booleans()):
        nse.initial_registration_time.seconds = draw(INT64)
        nse.initial_registration_time.nanos = draw(INT32)
    return nse


def ns_queries() -> st.SearchStrategy[NetworkServiceQuery]:
    return st.builds(lambda ns, watch: NetworkServiceQuery(network_service=ns, watch=watch),
                     network_services(), st.booleans())


def nse_queries() -> st.SearchStrategy[NetworkServiceEndpointQuery]:
    return st.builds(lambda nse, watch: NetworkServiceEndpointQuery(network_service_endpoint=nse,
                                                                    watch=watch),
                     endpoints(), st.booleans())


NAME_TEXT = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-._", min_size=1, max_size=12)
PREFIXES = st.sampled_from(["10.0.0.0/8", "192.168.0.0/16", "fd00::/8", "172.16.0.0/12", "0.0.0.0/0"])


@st.composite
def near_valid_requests(draw: Any, service: str, netns: Sequence[str]) -> NetworkServiceRequest:
    """A client's well-formed first Request for ``service`` from one of ``netns``, with random
    labels, extra context, excluded prefixes, DNS, MTU, payload and interface name: most get
    past Validate, so the later elements (selection, IPAM, the kernel) are fuzzed too."""
    from nsm.client.chain import new_request
    from nsm.mechanisms import kernel

    name = draw(st.sampled_from(["nsm-1", "nsm-fuzz", "x" * 15, "x" * 16, "", "eth0", "lo"]))
    request = new_request(service=service, name="fuzz",
                          mechanisms=[kernel(name, draw(st.sampled_from(netns)))],
                          labels=draw(st.dictionaries(NAME_TEXT, NAME_TEXT, max_size=4)))
    mech = request.mechanism_preferences[0]
    if draw(st.booleans()):
        mech.parameters[MTU] = str(draw(st.one_of(st.integers(60, 70000), st.just(1500))))
    conn = request.connection
    conn.payload = draw(st.sampled_from(["", "IP", "ETHERNET"]))
    conn.context.extra_context.update(draw(st.dictionaries(NAME_TEXT, SHORT, max_size=3)))
    conn.context.ip_context.excluded_prefixes.extend(draw(st.lists(PREFIXES, max_size=3)))
    if draw(st.booleans()):
        conn.context.dns_context.configs.add(dns_server_ips=draw(st.lists(st.sampled_from(
            ["10.0.0.53", "fd00::53"]), max_size=2)), search_domains=draw(st.lists(NAME_TEXT, max_size=2)))
    conn.context.MTU = draw(st.sampled_from([0, 1400, 9000]))
    return request

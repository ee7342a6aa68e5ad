"""Bounded inputs: every limit on what a caller may send or hold, in one place, and the pure
checks that enforce them.

A malformed or oversized field is refused with INVALID_ARGUMENT naming the limit; too many of
something held per caller (streams, watches, registrations) with RESOURCE_EXHAUSTED. Each hop
copies a connection to the next, so a limit here bounds what every hop keeps per connection.

The sizes are chosen so that any valid message fits in :data:`MAX_MESSAGE_BYTES` with a wide
margin; gRPC refuses a larger message (RESOURCE_EXHAUSTED) before it is parsed
(:mod:`nsm.transport`).

Callers are told apart by :func:`caller_key`: the SPIFFE ID when the connection is mTLS, else
the peer's address. Without TLS a unix-socket peer has no address (gRPC names every one of them
the same), so on an insecure unix socket all local callers share one budget.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nsm.errors import InvalidArgument, ResourceExhausted

if TYPE_CHECKING:
    import grpc

    from nsm.api.connection_pb2 import Connection, Mechanism, MonitorScopeSelector, PathSegment
    from nsm.api.connectioncontext_pb2 import ConnectionContext
    from nsm.security.tls import Security

# --- connections (every field a NetworkServiceRequest carries hop to hop) -----------------------

#: Labels of a connection.
MAX_LABELS = 64
#: Longest label key (connection labels, registry labels, metrics, extra context keys).
MAX_KEY_LEN = 256
#: Longest label value.
MAX_LABEL_VALUE_LEN = 1024
#: Mechanism preferences a request may offer.
MAX_MECHANISMS = 16
#: Parameters of one mechanism.
MAX_MECHANISM_PARAMETERS = 32
#: Longest mechanism parameter value (an ``inodeURL`` is a path: PATH_MAX is 4096).
MAX_PARAMETER_VALUE_LEN = 4096
#: Longest mechanism class or type.
MAX_MECHANISM_TYPE_LEN = 64
#: Segments of a path (a remote connection has 6).
MAX_PATH = 32
#: Longest path segment name or id.
MAX_SEGMENT_FIELD_LEN = 256
#: Longest path segment token (an ES256 JWT is well under 1 KiB).
MAX_TOKEN_LEN = 8 * 1024
#: Metrics of one path segment.
MAX_SEGMENT_METRICS = 16
#: Addresses on each end (``src_ip_addrs``, ``dst_ip_addrs``), extra prefixes.
MAX_IP_ADDRS = 64
#: Routes on each end (``src_routes``, ``dst_routes``), and of all policies together.
MAX_ROUTES = 256
#: Excluded prefixes of an IP context (a cluster's service and pod ranges).
MAX_EXCLUDED_PREFIXES = 1024
#: IP neighbours of an IP context.
MAX_IP_NEIGHBORS = 64
#: Extra prefix requests, and policies, of an IP context.
MAX_IP_REQUESTS = 16
#: DNS configs of a DNS context, and servers and search domains of each.
MAX_DNS_CONFIGS = 16
MAX_DNS_ENTRIES = 16
#: Longest address, prefix, MAC, DNS name, protocol or port string in a context.
MAX_CONTEXT_STRING_LEN = 256
#: Entries of ``extra_context``.
MAX_EXTRA_CONTEXT = 64
#: Longest ``extra_context`` value.
MAX_EXTRA_CONTEXT_VALUE_LEN = 4096
#: A whole serialized NetworkServiceRequest (or Connection): the bound on what one connection
#: costs every hop, whatever its fields.
MAX_REQUEST_BYTES = 256 * 1024

#: Services and path segments a MonitorConnections selector may name.
MAX_SELECTOR_ENTRIES = 64

# --- registry records ---------------------------------------------------------------------------

#: Network services one endpoint offers (``network_service_names``, ``network_service_labels``).
MAX_NSE_SERVICES = 64
#: Matches of a network service, and routes of each match.
MAX_NS_MATCHES = 64
MAX_NS_ROUTES = 64
#: A whole serialized registry record.
MAX_RECORD_BYTES = 64 * 1024

# --- messages -----------------------------------------------------------------------------------

#: The largest gRPC message a server accepts: four times the largest valid message, so a valid
#: one always fits and anything much larger is refused by gRPC before it is parsed.
MAX_MESSAGE_BYTES = 4 * max(MAX_REQUEST_BYTES, MAX_RECORD_BYTES)

# --- per caller ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Limits:
    """The per-caller limits of one daemon (tests lower them)."""

    #: MonitorConnections streams one caller may hold open at one daemon (a client chain holds
    #: one; a manager one per next hop).
    monitor_streams_per_caller: int = 256
    #: MonitorConnections streams a daemon serves at once, all callers together.
    monitor_streams: int = 1024
    #: Registry Find(watch=true) streams one caller may hold open (a manager holds a few, plus
    #: one per watch proxied for its node's forwarders and endpoints).
    watches_per_caller: int = 128
    #: Registry watch streams served at once, all callers together.
    watches: int = 1024
    #: Endpoint records one caller may own at the registry (a manager registers its node's
    #: endpoints and forwarders under its own identity).
    registrations_per_caller: int = 1024
    #: Watchers that may be sent their initial snapshot at once; the others wait their turn, so
    #: opening many watches does not slow the registry's other callers (each snapshot is the
    #: whole store, and a Find competes with every stream sending at the same time).
    snapshots_in_flight: int = 4
    #: How long a watcher may take to read its snapshot, and then any one event; a watcher that
    #: does not read is dropped with RESOURCE_EXHAUSTED.
    watch_send_timeout: float = 10.0


# --- callers and their streams ------------------------------------------------------------------


def caller_key(context: grpc.aio.ServicerContext | None, security: Security | None = None) -> str:
    """Who is calling, for per-caller limits: ``spiffe://...`` when the call is mTLS; else the
    peer's host (``ipv4:10.0.0.1``: without its port, so new connections do not make a new
    caller); ``unix:`` for every caller on an insecure unix socket (gRPC does not tell them
    apart); ``local`` for calls without a gRPC context."""
    if context is None:
        return "local"
    if security is not None and security.enabled:
        peer = security.peer_id(context)
        if peer is not None:
            return str(peer)
    address = context.peer() or "unknown"
    scheme, _, rest = address.partition(":")
    if scheme in ("ipv4", "ipv6"):
        host = rest.rsplit(":", 1)[0] if ":" in rest else rest
        return f"{scheme}:{host}"
    return f"{scheme}:" if scheme == "unix" else address


@dataclass
class StreamLimiter:
    """Counts open streams per caller and in all; :meth:`hold` refuses one past either limit
    with RESOURCE_EXHAUSTED naming it."""

    what: str
    per_caller: int
    total: int
    _open: dict[str, int] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return sum(self._open.values())

    def of(self, caller: str) -> int:
        return self._open.get(caller, 0)

    @contextlib.contextmanager
    def hold(self, caller: str) -> Iterator[None]:
        if self.count >= self.total:
            raise ResourceExhausted(f"{self.what}: {self.total} streams are open (the limit for all "
                                    f"callers)")
        if self.of(caller) >= self.per_caller:
            raise ResourceExhausted(f"{self.what}: caller {caller} has {self.per_caller} streams open "
                                    f"(the limit per caller)")
        self._open[caller] = self.of(caller) + 1
        try:
            yield
        finally:
            left = self._open[caller] - 1
            if left:
                self._open[caller] = left
            else:
                del self._open[caller]


# --- field checks -------------------------------------------------------------------------------


def check_count(items: Any, limit: int, what: str) -> None:
    if len(items) > limit:
        raise InvalidArgument(f"{what}: {len(items)} entries; at most {limit} are allowed")


def check_len(text: str, limit: int, what: str) -> None:
    if len(text) > limit:
        raise InvalidArgument(f"{what} is {len(text)} characters; at most {limit} are allowed")


def check_strings(items: Iterable[str], limit: int, what: str) -> None:
    for text in items:
        check_len(text, limit, f"{what} entry {text[:40]!r}")


def check_map(entries: Mapping[str, str], count: int, value_len: int, what: str) -> None:
    """At most ``count`` entries, keys of at most :data:`MAX_KEY_LEN`, values of ``value_len``."""
    check_count(entries, count, what)
    for key, value in entries.items():
        check_len(key, MAX_KEY_LEN, f"{what} key {key[:40]!r}")
        check_len(value, value_len, f"{what} {key[:40]!r} value")


def check_size(message: Any, limit: int, what: str) -> None:
    size = message.ByteSize()
    if size > limit:
        raise InvalidArgument(f"{what} is {size} bytes; at most {limit} are allowed")


def check_mechanism(m: Mechanism, what: str = "mechanism") -> None:
    check_len(m.cls, MAX_MECHANISM_TYPE_LEN, f"{what} class")
    check_len(m.type, MAX_MECHANISM_TYPE_LEN, f"{what} type")
    check_map(m.parameters, MAX_MECHANISM_PARAMETERS, MAX_PARAMETER_VALUE_LEN, f"{what} parameters")


def check_segment(segment: PathSegment, index: int) -> None:
    what = f"path segment {index}"
    check_len(segment.name, MAX_SEGMENT_FIELD_LEN, f"{what} name")
    check_len(segment.id, MAX_SEGMENT_FIELD_LEN, f"{what} id")
    check_len(segment.token, MAX_TOKEN_LEN, f"{what} token")
    check_map(segment.metrics, MAX_SEGMENT_METRICS, MAX_LABEL_VALUE_LEN, f"{what} metrics")


def check_context(context: ConnectionContext) -> None:
    ip = context.ip_context
    for name in ("src_ip_addrs", "dst_ip_addrs", "extra_prefixes"):
        values = getattr(ip, name)
        check_count(values, MAX_IP_ADDRS, f"ip_context.{name}")
        check_strings(values, MAX_CONTEXT_STRING_LEN, f"ip_context.{name}")
    check_count(ip.excluded_prefixes, MAX_EXCLUDED_PREFIXES, "ip_context.excluded_prefixes")
    check_strings(ip.excluded_prefixes, MAX_CONTEXT_STRING_LEN, "ip_context.excluded_prefixes")
    routes = [("src_routes", ip.src_routes), ("dst_routes", ip.dst_routes),
              ("policies routes", [r for p in ip.policies for r in p.routes])]
    for name, values in routes:
        check_count(values, MAX_ROUTES, f"ip_context.{name}")
        for route in values:
            check_strings((route.prefix, route.nextHop), MAX_CONTEXT_STRING_LEN, f"ip_context.{name}")
    check_count(ip.ip_neighbors, MAX_IP_NEIGHBORS, "ip_context.ip_neighbors")
    for neighbor in ip.ip_neighbors:
        check_strings((neighbor.ip, neighbor.hardware_address), MAX_CONTEXT_STRING_LEN,
                      "ip_context.ip_neighbors")
    check_count(ip.extra_prefix_request, MAX_IP_REQUESTS, "ip_context.extra_prefix_request")
    check_count(ip.policies, MAX_IP_REQUESTS, "ip_context.policies")
    for policy in ip.policies:
        check_strings((getattr(policy, "from"), policy.proto, policy.dst_port, policy.src_port),
                      MAX_CONTEXT_STRING_LEN, "ip_context.policies")
    check_count(context.dns_context.configs, MAX_DNS_CONFIGS, "dns_context.configs")
    for config in context.dns_context.configs:
        for name in ("dns_server_ips", "search_domains"):
            values = getattr(config, name)
            check_count(values, MAX_DNS_ENTRIES, f"dns_context.configs.{name}")
            check_strings(values, MAX_CONTEXT_STRING_LEN, f"dns_context.configs.{name}")
    eth = context.ethernet_context
    check_strings((eth.src_mac, eth.dst_mac), MAX_CONTEXT_STRING_LEN, "ethernet_context")
    check_map(context.extra_context, MAX_EXTRA_CONTEXT, MAX_EXTRA_CONTEXT_VALUE_LEN, "extra_context")


def check_connection(conn: Connection) -> None:
    """Every bounded field of a connection, then its whole size (INVALID_ARGUMENT)."""
    check_map(conn.labels, MAX_LABELS, MAX_LABEL_VALUE_LEN, "labels")
    check_count(conn.path.path_segments, MAX_PATH, "path segments")
    for index, segment in enumerate(conn.path.path_segments):
        check_segment(segment, index)
    check_context(conn.context)
    if conn.HasField("mechanism"):
        check_mechanism(conn.mechanism)
    check_size(conn, MAX_REQUEST_BYTES, "connection")


def check_selector(selector: MonitorScopeSelector) -> None:
    """A MonitorConnections selector: a bounded number of services and segments, each of a
    bounded size (every event is matched against it)."""
    check_count(selector.network_services, MAX_SELECTOR_ENTRIES, "selector network_services")
    check_strings(selector.network_services, MAX_SEGMENT_FIELD_LEN, "selector network_services")
    check_count(selector.path_segments, MAX_SELECTOR_ENTRIES, "selector path_segments")
    for index, segment in enumerate(selector.path_segments):
        check_segment(segment, index)

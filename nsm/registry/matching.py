"""Pure matching rules: registry queries, expiry, and NetworkService ``matches`` (endpoint
selection by labels), as the reference implementation applies them.

Nothing here does I/O or keeps state; times are seconds since the epoch (``time.time()``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from google.protobuf.timestamp_pb2 import Timestamp

from nsm.api.registry_pb2 import NetworkService, NetworkServiceEndpoint


def timestamp_seconds(ts: Timestamp) -> float:
    """A Timestamp as float seconds since the epoch."""
    return ts.seconds + ts.nanos / 1e9


def expiration(nse: NetworkServiceEndpoint) -> float | None:
    """When the NSE expires (seconds since the epoch), or None if it never does."""
    if not nse.HasField("expiration_time"):
        return None
    return timestamp_seconds(nse.expiration_time)


def is_expired(nse: NetworkServiceEndpoint, now: float) -> bool:
    """True when the NSE has an expiration time at or before ``now``."""
    exp = expiration(nse)
    return exp is not None and exp <= now


def is_subset(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """True when every ``key=value`` of ``selector`` is in ``labels`` (an empty selector
    matches everything)."""
    return all(key in labels and labels[key] == value for key, value in selector.items())


def service_labels(nse: NetworkServiceEndpoint, service: str) -> Mapping[str, str]:
    """The NSE's labels for one service (empty when it has none)."""
    if service in nse.network_service_labels:
        return nse.network_service_labels[service].labels
    return {}


def offers(nse: NetworkServiceEndpoint, service: str) -> bool:
    """True when the NSE lists ``service`` among its network services."""
    return service in nse.network_service_names


def match_ns(query: NetworkService, ns: NetworkService) -> bool:
    """A NetworkService query: name and payload each empty (any) or equal."""
    if query.name and query.name != ns.name:
        return False
    return not query.payload or query.payload == ns.payload


def match_nse(
    query: NetworkServiceEndpoint, nse: NetworkServiceEndpoint, *, now: float | None = None
) -> bool:
    """A NetworkServiceEndpoint query.

    - name: empty (any) or equal;
    - every service in ``query.network_service_names`` is among the NSE's;
    - for each service in ``query.network_service_labels``, the NSE's labels for that service
      include the query's labels;
    - url: empty (any) or equal;
    - with ``now`` given, an expired NSE never matches (``now=None`` skips the expiry check,
      e.g. to route a deletion event).
    """
    if query.name and query.name != nse.name:
        return False
    if query.url and query.url != nse.url:
        return False
    if now is not None and is_expired(nse, now):
        return False
    names = set(nse.network_service_names)
    if any(name not in names for name in query.network_service_names):
        return False
    return all(
        is_subset(wanted.labels, service_labels(nse, service))
        for service, wanted in query.network_service_labels.items()
    )


_TEMPLATE = re.compile(r"\{\{\s*\.(\w+)\s*\}\}")


def fill_templates(selector: Mapping[str, str], source_labels: Mapping[str, str]) -> dict[str, str]:
    """Replace ``{{.key}}`` in selector values by the client's label ``key`` (empty when the
    client has no such label), as the reference does with Go templates — e.g.
    ``{"nodeName": "{{.nodeName}}"}`` selects endpoints on the client's own node."""
    return {k: _TEMPLATE.sub(lambda m: source_labels.get(m.group(1), ""), v)
            for k, v in selector.items()}


def select_endpoints(
    ns: NetworkService,
    nses: Iterable[NetworkServiceEndpoint],
    source_labels: Mapping[str, str],
    *,
    now: float | None = None,
) -> list[NetworkServiceEndpoint]:
    """The endpoints a client with ``source_labels`` may be connected to for ``ns``, in order.

    Only NSEs offering ``ns.name`` are considered (and, with ``now`` given, only unexpired
    ones). Then:

    - ``ns`` has no matches: every such NSE;
    - otherwise the first match whose ``source_selector`` is a subset of ``source_labels`` (an
      empty selector matches every client) decides: its candidates are the NSEs whose labels
      for the service include some route's ``destination_selector`` (the union over its
      routes, in route then NSE order, without duplicates). No candidates and
      ``fallthrough``: the next applicable match decides; no candidates and no fallthrough:
      no endpoint;
    - no match applies (or every applicable one fell through): no endpoint.

    The order of ``nses`` is kept within a route, so callers can round-robin over the result.
    """
    offered = [
        nse
        for nse in nses
        if offers(nse, ns.name) and (now is None or not is_expired(nse, now))
    ]
    if not ns.matches:
        return offered
    for match in ns.matches:
        if not is_subset(match.source_selector, source_labels):
            continue
        candidates: list[NetworkServiceEndpoint] = []
        seen: set[int] = set()  # indexes into offered
        for route in match.routes:
            for index, nse in enumerate(offered):
                if index in seen:
                    continue
                wanted = fill_templates(route.destination_selector, source_labels)
                if is_subset(wanted, service_labels(nse, ns.name)):
                    seen.add(index)
                    candidates.append(nse)
        if candidates:
            return candidates
        if not match.fallthrough:
            return []
    return []

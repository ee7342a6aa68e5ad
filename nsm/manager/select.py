"""The manager's selection elements: discover endpoints, pick a forwarder, round-robin over
endpoints with fallback.

Order in the chain: Discover → SelectForwarder → RoundRobin → Connect (to the forwarder).
A failure that may be the chosen peer's fault (unreachable, exhausted, internal) moves on to the
next candidate; a failure that is the caller's fault (bad argument, missing namespace, existing
interface) returns at once (:data:`nsm.errors.RETRYABLE`).

The forwarder is told only the endpoint's *name* (``network_service_endpoint_name``): it
resolves the name through this manager's registry proxy itself, so no caller can make it dial a
URL of its choosing.

A Request with ``state=RESELECT_REQUESTED`` (a client healing a path that broke) is chosen
afresh: any forwarder and any endpoint may take it. The endpoint name it may still carry is
ignored, and the endpoint and forwarder the old path used (that name, or what this manager still
remembers of the connection) are tried *last*: the old path broke, so any other is the better
bet, and the old one is still tried when it is the only one (with one forwarder per node, the
usual case, the forwarder stays the same). Any other Request keeps what is on its path: the
endpoint it names and the forwarder of its path (or the last one used), so a refresh, or a heal
that only re-requests, changes nothing in the datapath.

The reselect is this manager's to make: the Request it sends on carries the endpoint it chose
and state UP, so the manager of the endpoint's node (a remote one) connects to that endpoint
instead of choosing again among all of them.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable, Iterable, Sequence

from nsm.api.connection_pb2 import RESELECT_REQUESTED, UP, Connection
from nsm.api.networkservice_pb2 import NetworkServiceRequest
from nsm.api.registry_pb2 import NetworkServiceEndpoint
from nsm.chain import Ctx, Element, Key, NextClose, NextRequest
from nsm.elements.connect import NEXT_URL
from nsm.errors import RETRYABLE, NotFound, NsmError, Unavailable
from nsm.manager.cache import RegistryCache
from nsm.mechanisms import PAYLOAD_IP
from nsm.registry.matching import select_endpoints, service_labels
from nsm.transport import normalize_url
from nsm.wellknown import FORWARDER_SERVICE, MANAGER_URL_LABEL, NODE_LABEL

_CANDIDATES: Key[list[NetworkServiceEndpoint]] = Key("select.candidates")
_FORWARDER: Key[str] = Key("select.forwarder")
_ENDPOINT: Key[str] = Key("select.endpoint")
#: The endpoint of the path a reselect replaces (tried last).
_OLD_ENDPOINT: Key[str] = Key("select.old-endpoint")
#: Whether the Request in flight reselects (its state, before Discover consumed it).
_RESELECT: Key[bool] = Key("select.reselect")


def reselecting(conn: Connection) -> bool:
    """Whether the client asks for a new path (its old one broke)."""
    return conn.state == RESELECT_REQUESTED


def last_of(items: list[NetworkServiceEndpoint], names: set[str]) -> list[NetworkServiceEndpoint]:
    """``items`` in order, those named in ``names`` moved to the end."""
    return [i for i in items if i.name not in names] + [i for i in items if i.name in names]


class Discover(Element):
    """Finds the NetworkService and the endpoints this client may use (its ``matches``)."""

    def __init__(self, cache: RegistryCache, *, node: str) -> None:
        self.cache = cache
        self.node = node

    async def request(self, ctx: Ctx, request: NetworkServiceRequest, next: NextRequest) -> Connection:
        conn = request.connection
        if NODE_LABEL not in conn.labels:
            conn.labels[NODE_LABEL] = self.node
        ns = await self.cache.network_service(conn.network_service)
        if ns is None:
            raise NotFound(f"network service {conn.network_service!r} not found")
        conn.payload = conn.payload or ns.payload or PAYLOAD_IP
        old = ""
        reselect = reselecting(conn)
        ctx.meta.set(_RESELECT, reselect)
        if reselect:  # a stale name must not pin the new path to the old endpoint
            old = conn.network_service_endpoint_name or ctx.meta.get(_ENDPOINT) or ""
            conn.network_service_endpoint_name = ""
            conn.state = UP  # chosen here: the hops below keep the endpoint chosen here
        ctx.meta.set(_OLD_ENDPOINT, old)
        candidates: list[NetworkServiceEndpoint] = []
        if conn.network_service_endpoint_name:
            chosen = await self.cache.endpoint(conn.network_service_endpoint_name)
            if chosen is not None and conn.network_service in chosen.network_service_names:
                candidates = [chosen]
        if not candidates:
            nses = await self.cache.endpoints(conn.network_service)
            candidates = select_endpoints(ns, nses, dict(conn.labels))
            if not candidates:
                what = "matching the client's labels " if ns.matches and nses else ""
                raise NotFound(f"no endpoint {what}for network service {conn.network_service!r}")
        ctx.meta.set(_CANDIDATES, candidates)
        return await next(ctx, request)


class SelectForwarder(Element):
    """Picks a forwarder registered for this manager: the one on the path (or used last) first,
    except on a reselect, which tries it last."""

    def __init__(self, cache: RegistryCache, *, manager_urls: Callable[[], Iterable[str]]) -> None:
        self.cache = cache
        self.manager_urls = manager_urls

    async def forwarders(self) -> list[NetworkServiceEndpoint]:
        mine = {normalize_url(u) for u in self.manager_urls()}
        return [f for f in await self.cache.endpoints(FORWARDER_SERVICE)
                if normalize_url(service_labels(f, FORWARDER_SERVICE).get(MANAGER_URL_LABEL, ""))
                in mine]

    async def request(self, ctx: Ctx, request: NetworkServiceRequest, next: NextRequest) -> Connection:
        forwarders = await self.forwarders()
        if not forwarders:
            raise Unavailable("no forwarder is registered for this manager")
        path = request.connection.path
        old = {s.name for s in path.path_segments[path.index + 1:]} | {ctx.meta.get(_FORWARDER) or ""}
        if ctx.meta.get(_RESELECT):
            forwarders = last_of(forwarders, old)
        else:
            forwarders = last_of(forwarders, {f.name for f in forwarders} - old)

        async def through(fwd: NetworkServiceEndpoint) -> Connection:
            ctx.meta.set(_FORWARDER, fwd.name)
            ctx.meta.set(NEXT_URL, fwd.url)
            return await next(ctx, request)

        return await in_turn(ctx, forwarders, through, "forwarder")


class RoundRobin(Element):
    """Tries the candidate endpoints in turn, starting after the last one used for the
    service; the chosen one's name goes down in the connection."""

    def __init__(self) -> None:
        self._counters: dict[str, itertools.count[int]] = {}

    async def request(self, ctx: Ctx, request: NetworkServiceRequest, next: NextRequest) -> Connection:
        candidates = ctx.meta.get(_CANDIDATES) or []
        conn = request.connection
        if len(candidates) > 1 and not conn.network_service_endpoint_name:
            start = next_index(self._counters, conn.network_service) % len(candidates)
            candidates = candidates[start:] + candidates[:start]
        old = ctx.meta.pop(_OLD_ENDPOINT)
        if old:
            candidates = last_of(candidates, {old})
        if not candidates:
            raise NotFound(f"no endpoint for network service {conn.network_service!r}")

        async def to(nse: NetworkServiceEndpoint) -> Connection:
            conn.network_service_endpoint_name = nse.name
            ctx.meta.set(_ENDPOINT, nse.name)
            return await next(ctx, request)

        try:
            return await in_turn(ctx, candidates, to, "endpoint")
        except BaseException:
            conn.network_service_endpoint_name = ""
            raise

    async def close(self, ctx: Ctx, conn: Connection, next: NextClose) -> None:
        await next(ctx, conn)


async def in_turn(ctx: Ctx, candidates: Sequence[NetworkServiceEndpoint],
                  attempt: Callable[[NetworkServiceEndpoint], Awaitable[Connection]],
                  what: str) -> Connection:
    """The first of ``candidates`` (at least one) that ``attempt`` succeeds with; a failure
    that may be the candidate's (:data:`nsm.errors.RETRYABLE`) moves on to the next, any other
    returns at once; when all fail, the last failure."""
    error: NsmError | None = None
    for candidate in candidates:
        try:
            return await attempt(candidate)
        except RETRYABLE as exc:
            ctx.log.warning(f"{what} failed; trying the next", **{what: candidate.name},
                            error=exc.message)
            error = exc
    assert error is not None, "in_turn needs at least one candidate"
    raise error


def next_index(counters: dict[str, itertools.count[int]], key: str) -> int:
    counter = counters.get(key)
    if counter is None:
        counter = counters[key] = itertools.count()
    return next(counter)

"""The registry: validation, NSE lifetimes and Find/watch over a :class:`Store` (which owns expiry
and compare-and-set, so a shared store can stand in for the in-memory one), and the two gRPC
servicers (``registry.NetworkServiceRegistry`` and ``registry.NetworkServiceEndpointRegistry``)
that expose it.

:class:`Registry` holds the logic and is usable without gRPC; the servicers only translate
messages and leave error mapping to :func:`nsm.errors.grpc_errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import unicodedata
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.protobuf.empty_pb2 import Empty

from nsm.api import registry_pb2_grpc
from nsm.api.registry_pb2 import (
    NetworkService,
    NetworkServiceEndpoint,
    NetworkServiceEndpointQuery,
    NetworkServiceEndpointResponse,
    NetworkServiceQuery,
    NetworkServiceResponse,
)
from nsm.errors import Conflict, InvalidArgument, ResourceExhausted, Unavailable, grpc_errors
from nsm.limits import (
    MAX_LABELS,
    MAX_NS_MATCHES,
    MAX_NS_ROUTES,
    MAX_NSE_SERVICES,
    MAX_RECORD_BYTES,
    Limits,
    StreamLimiter,
    caller_key,
    check_count,
    check_size,
)
from nsm.log import get_logger
from nsm.metrics import Metrics
from nsm.registry.authz import Caller, RegistryAuthz, RegistryPolicy, caller_of
from nsm.registry.matching import expiration, match_ns, match_nse
from nsm.registry.memory import MemoryStore
from nsm.registry.store import ABSENT, DEFAULT_WATCH_QUEUE, R, Store
from nsm.retry import Backoff, retry
from nsm.security.tls import Security
from nsm.transport import Server, parse_url

if TYPE_CHECKING:
    from nsm.security.tls import Security

log = get_logger(__name__)

T = TypeVar("T")

#: Full gRPC service names served by the registry.
SERVICE_NAMES: tuple[str, ...] = (
    "registry.NetworkServiceRegistry",
    "registry.NetworkServiceEndpointRegistry",
)
PAYLOADS: frozenset[str] = frozenset({"IP", "ETHERNET"})
DEFAULT_PAYLOAD = "IP"
DEFAULT_EXPIRY = 60.0
MAX_NAME_LENGTH = 253
MAX_LABEL_VALUE_LENGTH = 1024
MAX_URL_LENGTH = 4096
#: How long a registration may keep losing compare-and-set races (to other replicas writing
#: the same endpoint) before it fails with UNAVAILABLE.
CAS_DEADLINE = 2.0


# --- validation ------------------------------------------------------------------------------


def _has_control_chars(text: str) -> bool:
    return any(unicodedata.category(c) == "Cc" for c in text)


def check_name(what: str, name: str, *, required: bool = True) -> None:
    """Raise InvalidArgument unless ``name`` is a usable record name."""
    if not name:
        if required:
            raise InvalidArgument(f"{what} is required")
        return
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidArgument(f"{what} is longer than {MAX_NAME_LENGTH} characters")
    if _has_control_chars(name):
        raise InvalidArgument(f"{what} {name!r} contains control characters")


def _check_labels(what: str, labels: Mapping[str, str]) -> None:
    check_count(labels, MAX_LABELS, f"{what} labels")
    for key, value in labels.items():
        check_name(f"{what} label key", key)
        if len(value) > MAX_LABEL_VALUE_LENGTH:
            raise InvalidArgument(
                f"{what} label {key!r} is longer than {MAX_LABEL_VALUE_LENGTH} characters"
            )
        if _has_control_chars(value):
            raise InvalidArgument(f"{what} label {key!r} contains control characters")


def _check_url(url: str) -> None:
    if not url:
        raise InvalidArgument("network service endpoint url is required")
    if len(url) > MAX_URL_LENGTH or _has_control_chars(url):
        raise InvalidArgument("network service endpoint url is too long or malformed")
    try:
        parse_url(url)
    except InvalidArgument as exc:
        raise InvalidArgument(f"network service endpoint url: {exc.message}") from exc


def validate_ns(ns: NetworkService) -> None:
    check_size(ns, MAX_RECORD_BYTES, "network service record")
    check_name("network service name", ns.name)
    if ns.payload and ns.payload not in PAYLOADS:
        raise InvalidArgument(
            f"network service payload {ns.payload!r} is not one of {sorted(PAYLOADS)}"
        )
    check_count(ns.matches, MAX_NS_MATCHES, "network service matches")
    for match in ns.matches:
        _check_labels("source selector", match.source_selector)
        check_count(match.routes, MAX_NS_ROUTES, "network service match routes")
        for route in match.routes:
            _check_labels("destination selector", route.destination_selector)


def validate_nse(nse: NetworkServiceEndpoint) -> None:
    check_size(nse, MAX_RECORD_BYTES, "network service endpoint record")
    check_name("network service endpoint name", nse.name, required=False)
    _check_url(nse.url)
    check_count(nse.network_service_names, MAX_NSE_SERVICES, "network service endpoint services")
    check_count(nse.network_service_labels, MAX_NSE_SERVICES, "network service endpoint service labels")
    for service in nse.network_service_names:
        check_name("network service name", service)
    for service, labels in nse.network_service_labels.items():
        check_name("network service name", service)
        _check_labels(f"service {service!r}", labels.labels)


def new_nse_name() -> str:
    """A fresh, unique NSE name."""
    return f"nse-{uuid.uuid4().hex[:12]}"


def _set_timestamp(ts: Any, seconds: float) -> None:
    whole = math.floor(seconds)
    ts.seconds = whole
    ts.nanos = min(int((seconds - whole) * 1e9), 999_999_999)


# --- records per caller ----------------------------------------------------------------------


class _Owners:
    """Which caller registered each record of one store, so that no caller holds more than
    :attr:`Limits.registrations_per_caller` of them (RESOURCE_EXHAUSTED past it). Records
    that expired are noticed (and no longer count) when their caller reaches the limit."""

    def __init__(self, store: Store[Any], what: str, limits: Limits) -> None:
        self._store = store
        self._what = what
        self._limit = limits.registrations_per_caller
        self._owner: dict[str, str] = {}
        self._owned: dict[str, set[str]] = {}

    def count(self, caller: str) -> int:
        return len(self._owned.get(caller, ()))

    async def admit(self, caller: str, name: str) -> None:
        """Count ``name`` as registered by ``caller``, or raise ResourceExhausted."""
        if self._owner.get(name) == caller:
            return
        if self.count(caller) >= self._limit:
            for owned in list(self._owned.get(caller, ())):
                if await self._store.get(owned) is None:
                    self.forget(owned)
            if self.count(caller) >= self._limit:
                raise ResourceExhausted(f"caller {caller} has registered {self._limit} {self._what} "
                                        f"(the limit per caller)")
        self.forget(name)
        self._owner[name] = caller
        self._owned.setdefault(caller, set()).add(name)

    def forget(self, name: str) -> None:
        caller = self._owner.pop(name, None)
        if caller is None:
            return
        owned = self._owned[caller]
        owned.discard(name)
        if not owned:
            del self._owned[caller]


# --- the registry ----------------------------------------------------------------------------


class Registry:
    """Network services and endpoints over two stores, with NSE lifetimes and watches.

    Use as ``async with Registry(expiry=60.0) as registry:`` (or ``start()``/``stop()``).
    ``expiry`` is both the default lifetime of an NSE registered without ``expiration_time``
    and the longest lifetime granted (a later requested time is shortened to it, as the
    reference does), so a vanished endpoint never lingers longer. The NSE store removes an
    endpoint when its ``expiration_time`` passes.

    ``security`` and ``policy``: who may register and unregister what
    (:mod:`nsm.registry.authz`); the registration methods take the ``caller`` (None: a call
    from within this process, or insecure mode, to which no rule applies).
    """

    def __init__(
        self,
        *,
        expiry: float = DEFAULT_EXPIRY,
        ns_store: Store[NetworkService] | None = None,
        nse_store: Store[NetworkServiceEndpoint] | None = None,
        watch_queue: int = DEFAULT_WATCH_QUEUE,
        security: Security | None = None,
        policy: RegistryPolicy | None = None,
        limits: Limits | None = None,
    ) -> None:
        if not expiry > 0:
            raise ValueError("expiry must be positive")
        self.expiry = expiry
        # ``is None``, not ``or``: an empty store has no length, so it is falsy.
        self.ns_store: Store[NetworkService] = (
            MemoryStore(kind="network service") if ns_store is None else ns_store)
        self.nse_store: Store[NetworkServiceEndpoint] = (
            MemoryStore(kind="endpoint") if nse_store is None else nse_store)
        self.watch_queue = watch_queue
        self.authz = RegistryAuthz(security, policy)
        self.security = self.authz.security
        self.limits = limits or Limits()
        self._watches = StreamLimiter("registry watch", self.limits.watches_per_caller,
                                      self.limits.watches)
        #: Watchers being sent their snapshot (created on first use: it needs the running loop).
        self._snapshots: asyncio.Semaphore | None = None
        #: Its metrics: its status, and its calls by method and status (``nse.Register``...).
        self.metrics = Metrics("registry", status=self.status)
        #: Watchers being sent their snapshot now, and the most there were at once.
        self.snapshots_sending = 0
        self.snapshots_sending_peak = 0
        self._owners = {"ns": _Owners(self.ns_store, "network services", self.limits),
                        "nse": _Owners(self.nse_store, "endpoints", self.limits)}
        self._closed = False

    # lifecycle

    async def start(self) -> None:
        self._closed = False

    async def stop(self) -> None:
        """End every watch stream (with UNAVAILABLE, so watchers know to watch again elsewhere
        or later) and close the stores. Idempotent."""
        self._closed = True
        await self.authz.close()
        await self.ns_store.close()
        await self.nse_store.close()

    def status(self) -> dict[str, int]:
        """Records and watch streams of each in-memory store (the daemon logs it on SIGUSR1)."""
        out = {}
        for kind, store in (("services", self.ns_store), ("endpoints", self.nse_store)):
            if isinstance(store, MemoryStore):
                out[kind] = len(store)
                out[f"{kind}_watchers"] = store.watcher_count
        return out

    async def __aenter__(self) -> Registry:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # network services

    async def register_ns(self, ns: NetworkService, *, caller: Caller | None = None,
                          key: str = "local") -> NetworkService:
        """Register or replace a network service (``caller``: who registers it, for the
        authorization; ``key``: whose records it counts against, for the limit per caller)."""
        validate_ns(ns)
        record = NetworkService()
        record.CopyFrom(ns)
        if not record.payload:
            record.payload = DEFAULT_PAYLOAD

        async def write() -> NetworkService | None:
            """Read, check the owner, write back unless changed meanwhile (None: unchanged)."""
            existing = await self.ns_store.get(record.name)
            now = time.time()
            if caller is not None and self.authz.unchanged(existing, record, now=now):
                return None  # the same again: a no-op anyone may make
            owner = self.authz.owner_for(caller, existing, f"network service {record.name!r}",
                                         now=now)
            revision = ABSENT if existing is None else existing.revision
            return (await self.ns_store.put(record, revision=revision, owner=owner)).record

        await self._owners["ns"].admit(key, record.name)
        stored = await self._cas(write, f"network service {record.name!r}")
        if stored is None:
            return record
        log.info("network service registered", name=stored.name, payload=stored.payload)
        return stored

    async def unregister_ns(self, name: str, *, caller: Caller | None = None) -> None:
        check_name("network service name", name)
        if await self._unregister(self.ns_store, name, f"network service {name!r}", caller):
            log.info("network service unregistered", name=name)
        self._owners["ns"].forget(name)

    def find_ns(
        self, query: NetworkService, *, watch: bool = False, caller: str = "local"
    ) -> AsyncIterator[tuple[NetworkService, bool]]:
        """Matching services as ``(record, deleted)``; with ``watch``, then live changes until
        the consumer stops iterating (``caller``: for the limit of watches per caller)."""
        q = NetworkService()
        q.CopyFrom(query)
        return self._find(self.ns_store, lambda ns: match_ns(q, ns), watch, caller)

    # network service endpoints

    async def register_nse(self, nse: NetworkServiceEndpoint, *, caller: Caller | None = None,
                           key: str = "local") -> NetworkServiceEndpoint:
        """Register or refresh an NSE; returns the stored record (name, expiration and initial
        registration time filled in). ``caller``: who registers it, for the limit of records
        per caller."""
        validate_nse(nse)
        if nse.name and caller is not None and self.authz.policy.owner:
            # The owner first: another's name is refused before its URL is dialed (a caller
            # must not make the registry connect where it likes, for a record it cannot have).
            held = await self.nse_store.get(nse.name)
            if held is not None:
                self.authz.owner_for(caller, held, f"endpoint {nse.name!r}", now=time.time())
        await self.authz.admit_nse(caller, nse)
        record = NetworkServiceEndpoint()
        record.CopyFrom(nse)
        if not record.name:
            record.name = new_nse_name()
        now = time.time()
        requested = expiration(record)
        if requested is not None and requested <= now:
            raise InvalidArgument(
                f"network service endpoint {record.name!r}: expiration_time is in the past"
            )
        longest = now + self.expiry
        if requested is None or requested > longest:
            _set_timestamp(record.expiration_time, longest)
        elif not 0 <= record.expiration_time.nanos < 1_000_000_000:
            _set_timestamp(record.expiration_time, requested)  # normalize a malformed Timestamp
        exp = expiration(record)
        assert exp is not None
        await self._owners["nse"].admit(key, record.name)
        refreshed = False

        async def write() -> NetworkServiceEndpoint:
            """Read, keep the first registration time, write back unless changed meanwhile."""
            nonlocal refreshed
            existing = await self.nse_store.get(record.name)
            owner = self.authz.owner_for(caller, existing, f"endpoint {record.name!r}",
                                         now=time.time())
            refreshed = existing is not None
            if existing is not None and existing.record.HasField("initial_registration_time"):
                record.initial_registration_time.CopyFrom(existing.record.initial_registration_time)
            else:
                _set_timestamp(record.initial_registration_time, now)
            revision = ABSENT if existing is None else existing.revision
            entry = await self.nse_store.put(record, expires=exp, revision=revision, owner=owner)
            return entry.record

        stored = await self._cas(write, f"network service endpoint {record.name!r}")
        if not refreshed:
            log.info("endpoint registered", name=stored.name, url=stored.url,
                     services=",".join(stored.network_service_names))
        else:
            log.debug("endpoint refreshed", name=stored.name, expires_in=round(exp - now, 3))
        return stored

    async def unregister_nse(self, name: str, *, caller: Caller | None = None) -> None:
        check_name("network service endpoint name", name)
        if await self._unregister(self.nse_store, name, f"endpoint {name!r}", caller):
            log.info("endpoint unregistered", name=name)
        self._owners["nse"].forget(name)

    def find_nse(
        self, query: NetworkServiceEndpoint, *, watch: bool = False, caller: str = "local"
    ) -> AsyncIterator[tuple[NetworkServiceEndpoint, bool]]:
        """Matching unexpired endpoints as ``(record, deleted)``; with ``watch``, then live
        changes (register/refresh, unregister/expiry) until the consumer stops iterating
        (``caller``: for the limit of watches per caller)."""
        q = NetworkServiceEndpoint()
        q.CopyFrom(query)
        return self._find(self.nse_store, lambda nse: match_nse(q, nse, now=time.time()), watch,
                          caller)

    # internals

    @staticmethod
    async def _cas(write: Callable[[], Awaitable[T]], what: str) -> T:
        """``write()`` (read, compute, compare-and-set), again while it loses races."""
        try:
            return await retry(write, what=f"registering {what}", retry_on=(Conflict,),
                               backoff=Backoff(0.005, 0.2), deadline=CAS_DEADLINE)
        except Conflict as exc:
            raise Unavailable(f"{what} keeps changing under this registration: "
                              f"{exc.message}") from exc

    async def _unregister(self, store: Store[R], name: str, what: str,
                          caller: Caller | None) -> bool:
        """Remove ``name`` if ``caller`` may (the store's owner check, compared and set);
        whether there was one."""
        if caller is None:
            return await store.delete(name) is not None

        async def remove() -> bool:
            existing = await store.get(name)
            if existing is None:
                return False
            self.authz.check_unregister(caller, existing, what, now=time.time())
            return await store.delete(name, revision=existing.revision) is not None

        return await self._cas(remove, what)

    async def _find(
        self, store: Store[R], matches: Callable[[R], bool], watch: bool, caller: str
    ) -> AsyncIterator[tuple[R, bool]]:
        if not watch:
            for record in await store.list():
                if matches(record):
                    yield record, False
            return
        if self._closed:
            raise Unavailable("registry is shutting down")
        with self._watches.hold(caller):
            async with contextlib.aclosing(self._watch(store, matches)) as items:
                async for item in items:
                    yield item

    async def _watch(self, store: Store[R], matches: Callable[[R], bool]) -> AsyncIterator[tuple[R, bool]]:
        """A watch: its snapshot, then its events. Only a few watchers are sent their snapshot
        at once (:attr:`Limits.snapshots_in_flight`): each snapshot is the whole store, and every
        stream sending at the same time slows every other call (a Find among 500 watchers
        receiving their snapshots got 1/500 of the registry's turns). One that takes longer than
        :attr:`Limits.watch_send_timeout` to read it is dropped."""
        if self._snapshots is None:
            self._snapshots = asyncio.Semaphore(self.limits.snapshots_in_flight)
        # The watcher hears of deletions (and of updates that stop matching) only for records
        # it was told about; ``sent`` holds their names.
        sent: set[str] = set()
        loop = asyncio.get_running_loop()
        gate = self._snapshots
        await gate.acquire()
        sending_snapshot = True
        self.snapshots_sending += 1
        self.snapshots_sending_peak = max(self.snapshots_sending_peak, self.snapshots_sending)

        def sent_snapshot() -> None:
            nonlocal sending_snapshot
            sending_snapshot = False
            self.snapshots_sending -= 1
            gate.release()

        try:
            async with await store.watch(maxsize=self.watch_queue) as sub:
                deadline = loop.time() + self.limits.watch_send_timeout
                for record in sub.snapshot:
                    if matches(record):
                        sent.add(record.name)  # type: ignore[attr-defined]
                        yield record, False
                        if loop.time() > deadline:
                            raise ResourceExhausted(
                                f"watcher took more than {self.limits.watch_send_timeout:g} s to "
                                f"read its snapshot and was dropped")
                sent_snapshot()
                async for event in sub:
                    name: str = event.record.name  # type: ignore[attr-defined]
                    if not event.deleted and matches(event.record):
                        sent.add(name)
                        yield event.record, False
                    elif name in sent:
                        sent.discard(name)
                        yield event.record, True
        finally:
            if sending_snapshot:
                sent_snapshot()
        if self._closed:  # the store ended the subscription because the registry stops
            raise Unavailable("registry is shutting down")


# --- gRPC servicers --------------------------------------------------------------------------


async def _send(context: grpc.aio.ServicerContext, found: AsyncIterator[tuple[R, bool]],
                response: Callable[[R, bool], Any], timeout: float) -> None:
    """Write a response for every record ``found``. A caller that does not read one within
    ``timeout`` is dropped: its watch ends here (no snapshot slot, subscription or queue is
    held for it any more) and it gets RESOURCE_EXHAUSTED after what gRPC had buffered for it."""
    async with contextlib.aclosing(found):
        async for record, deleted in found:
            try:
                await asyncio.wait_for(context.write(response(record, deleted)), timeout)
            except TimeoutError:
                raise ResourceExhausted(f"the caller read nothing for {timeout:g} s and was "
                                        f"dropped") from None


def registrant_key(context: grpc.aio.ServicerContext, security: Security | None) -> str:
    """Whose records a registration counts against: the registrant's SPIFFE ID (the endpoint's
    when a manager registers on its behalf), else :func:`nsm.limits.caller_key`."""
    caller = caller_of(security, context) if security is not None else None
    return caller.owner if caller is not None else caller_key(context, security)


class NetworkServiceRegistryServicer(registry_pb2_grpc.NetworkServiceRegistryServicer):
    """``registry.NetworkServiceRegistry`` over a :class:`Registry`; ``security``: how callers
    are identified (default: the registry's, which also dials URLs to check them: give the
    registry and its server the same one)."""

    def __init__(self, registry: Registry, security: Security | None = None) -> None:
        self._registry = registry
        self._security = registry.security if security is None else security

    @grpc_errors
    async def Register(
        self, request: NetworkService, context: grpc.aio.ServicerContext
    ) -> NetworkService:
        with self._registry.metrics.measure("ns.Register"):
            return await self._registry.register_ns(
                request, caller=caller_of(self._security, context),
                key=registrant_key(context, self._security))

    @grpc_errors
    async def Find(self, request: NetworkServiceQuery, context: grpc.aio.ServicerContext) -> None:
        with self._registry.metrics.measure("ns.Watch" if request.watch else "ns.Find"):
            found = self._registry.find_ns(request.network_service, watch=request.watch,
                                           caller=caller_key(context, self._security))
            await _send(context, found, lambda ns, deleted: NetworkServiceResponse(
                network_service=ns, deleted=deleted), self._registry.limits.watch_send_timeout)

    @grpc_errors
    async def Unregister(self, request: NetworkService, context: grpc.aio.ServicerContext) -> Empty:
        with self._registry.metrics.measure("ns.Unregister"):
            await self._registry.unregister_ns(request.name, caller=caller_of(self._security, context))
        return Empty()


class NetworkServiceEndpointRegistryServicer(
    registry_pb2_grpc.NetworkServiceEndpointRegistryServicer
):
    """``registry.NetworkServiceEndpointRegistry`` over a :class:`Registry`; ``security`` as
    for :class:`NetworkServiceRegistryServicer`."""

    def __init__(self, registry: Registry, security: Security | None = None) -> None:
        self._registry = registry
        self._security = registry.security if security is None else security

    @grpc_errors
    async def Register(
        self, request: NetworkServiceEndpoint, context: grpc.aio.ServicerContext
    ) -> NetworkServiceEndpoint:
        with self._registry.metrics.measure("nse.Register"):
            return await self._registry.register_nse(
                request, caller=caller_of(self._security, context),
                key=registrant_key(context, self._security))

    @grpc_errors
    async def Find(self, request: NetworkServiceEndpointQuery, context: grpc.aio.ServicerContext) -> None:
        with self._registry.metrics.measure("nse.Watch" if request.watch else "nse.Find"):
            found = self._registry.find_nse(request.network_service_endpoint, watch=request.watch,
                                            caller=caller_key(context, self._security))
            await _send(context, found, lambda nse, deleted: NetworkServiceEndpointResponse(
                network_service_endpoint=nse, deleted=deleted),
                self._registry.limits.watch_send_timeout)

    @grpc_errors
    async def Unregister(
        self, request: NetworkServiceEndpoint, context: grpc.aio.ServicerContext
    ) -> Empty:
        with self._registry.metrics.measure("nse.Unregister"):
            await self._registry.unregister_nse(request.name,
                                                caller=caller_of(self._security, context))
        return Empty()


def add_to_server(registry: Registry, server: Server) -> None:
    """Serve both registry services of ``registry`` on ``server`` (before it starts). A secure
    server needs a secure registry (``Registry(security=...)``, the same): it identifies the
    callers and proves their URLs."""
    if server.security.enabled and not registry.security.enabled:
        raise ValueError("a secure server serves a registry with a Security (its authorization)")
    registry_pb2_grpc.add_NetworkServiceRegistryServicer_to_server(
        NetworkServiceRegistryServicer(registry, server.security), server.grpc
    )
    registry_pb2_grpc.add_NetworkServiceEndpointRegistryServicer_to_server(
        NetworkServiceEndpointRegistryServicer(registry, server.security), server.grpc
    )
    server.add_service_names(SERVICE_NAMES)

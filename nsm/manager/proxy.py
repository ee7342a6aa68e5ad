"""The manager's registry proxy: endpoints and forwarders of a node register through it.

An endpoint's registration is forwarded to the registry with the URL replaced by this manager's
advertised (tcp) URL, when it has one, so that managers on other nodes reach the endpoint through
this one; the endpoint's own URL is remembered in :class:`LocalEndpoints`, which is also how the
manager knows that an endpoint is on its node (it registered through this manager), whatever the
URL scheme. The endpoint is also labelled ``nodeName=<this node>`` for each of its services (for
selectors). Forwarder registrations, services, finds and unregistrations pass through unchanged.

The proxies remember the last record they forwarded for every service and endpoint (until it is
unregistered or expires), and :meth:`Replay.replay` registers them all again: the manager calls
it when its registry channel reconnects, so a restarted (in-memory) registry knows this node's
endpoints within a second or two instead of at their next refresh. Endpoints whose records have
expired are not brought back.

An endpoint that dies without unregistering (SIGKILL, its pod deleted) is unregistered by the
proxy it registered through, about a second after it became unreachable
(:class:`~nsm.manager.alive.EndpointLiveness`), instead of lingering until its registration
expires.

Every call to the registry goes through the one :class:`~nsm.registry.client.RegistryClient`.

Secure (a :class:`~nsm.security.tls.Security` with identities), the proxy checks its callers
before it forwards anything (each rule switchable, :class:`~nsm.registry.authz.RegistryPolicy`),
and tells the registry on whose behalf it registers (the caller's SPIFFE ID,
:data:`~nsm.registry.authz.REGISTRANT_HEADER`), which the registry makes the record's owner:

- ``url``: the endpoint's own URL (what this node's forwarder will dial) must be served by the
  caller: it proves it (:mod:`nsm.security.prove`) before the URL is kept in
  :class:`LocalEndpoints`;
- ``forwarder``: forwarder records only from a forwarder identity of this node, naming this
  manager (one of its URLs) in their ``nsmgrURL`` label;
- ``node``: no record that names another node in its ``nodeName`` label;
- ``owner``: a name registered through this proxy is registered again or unregistered only by
  the same identity (the registry enforces it for every name; the proxy does so first, so that a
  refused takeover never touches what it answers for the name).

Finds rewrite only records that name this manager (or the endpoint's own URL): a record of the
same name registered elsewhere is answered as the registry has it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TypeVar

import grpc
from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import Message

from nsm.api import registry_pb2, registry_pb2_grpc
from nsm.api.registry_pb2 import NetworkService, NetworkServiceEndpoint
from nsm.errors import NsmError, grpc_errors
from nsm.log import get_logger
from nsm.manager.alive import DEFAULT_GRACE, EndpointLiveness
from nsm.registry.authz import (
    Caller,
    RegistryPolicy,
    UrlProofs,
    check_url,
    deny,
    is_forwarder,
    record_nodes,
)
from nsm.registry.client import RegistryClient
from nsm.registry.matching import expiration, service_labels
from nsm.security.ids import FORWARDER, SpiffeId
from nsm.security.tls import Security
from nsm.transport import normalize_url, parse_url
from nsm.wellknown import FORWARDER_SERVICE, MANAGER_URL_LABEL, NODE_LABEL

log = get_logger("nsm.manager.proxy")

M = TypeVar("M", bound=Message)


class LocalEndpoints:
    """Endpoints registered through this manager, so on its node: NSE name → the URL it really
    listens on."""

    def __init__(self) -> None:
        self._urls: dict[str, str] = {}

    def set(self, name: str, url: str) -> None:
        self._urls[name] = url

    def get(self, name: str) -> str | None:
        """The endpoint's own URL when it registered through this manager, else None."""
        return self._urls.get(name)

    def drop(self, name: str) -> None:
        self._urls.pop(name, None)

    def __len__(self) -> int:
        return len(self._urls)


async def _register_all(register: Callable[..., Awaitable[M]], records: dict[str, M],
                        registrants: dict[str, str | None]) -> int:
    """Register every record again, each on behalf of its registrant; how many succeeded
    (failures are logged)."""
    done = 0
    for name, record in list(records.items()):
        try:
            await register(record, registrant=registrants.get(name))
            done += 1
        except NsmError as exc:
            log.warning("registering again after a reconnect failed", name=name,
                        error=exc.message)
    return done


class Replay:
    """The records forwarded to the registry through this manager, by name, and on whose
    behalf (the SPIFFE ID that registered each; None when insecure)."""

    def __init__(self, registry: RegistryClient) -> None:
        self.registry = registry
        self.services: dict[str, NetworkService] = {}
        self.endpoints: dict[str, NetworkServiceEndpoint] = {}
        self.service_registrants: dict[str, str | None] = {}
        self.registrants: dict[str, str | None] = {}

    def forget_endpoint(self, name: str) -> None:
        self.endpoints.pop(name, None)
        self.registrants.pop(name, None)

    async def replay(self) -> tuple[int, int]:
        """Register every remembered service and unexpired endpoint again; (services,
        endpoints) registered. Failures are logged (the endpoint's own refresh follows)."""
        now = time.time()
        for name, nse in list(self.endpoints.items()):
            exp = expiration(nse)
            if exp is not None and exp <= now:
                self.forget_endpoint(name)
        return (await _register_all(self.registry.register_ns, self.services,
                                    self.service_registrants),
                await _register_all(self.registry.register_nse, self.endpoints, self.registrants))


def _registrant(security: Security, context: grpc.aio.ServicerContext) -> str | None:
    caller = security.peer_id(context)
    return None if caller is None else str(caller)


class NsProxy(registry_pb2_grpc.NetworkServiceRegistryServicer):
    """Services pass through, registered on behalf of the caller."""

    def __init__(self, registry: RegistryClient, replay: Replay | None = None, *,
                 security: Security | None = None) -> None:
        self.registry = registry
        self.replay = replay or Replay(registry)
        self.security = security or Security.insecure()

    @grpc_errors
    async def Register(self, request: NetworkService, context: grpc.aio.ServicerContext) -> NetworkService:
        registrant = _registrant(self.security, context)
        result = await self.registry.register_ns(request, registrant=registrant)
        self.replay.services[result.name] = result
        self.replay.service_registrants.setdefault(result.name, registrant)
        return result

    @grpc_errors
    async def Find(self, request: registry_pb2.NetworkServiceQuery, context: grpc.aio.ServicerContext
                   ) -> AsyncIterator[registry_pb2.NetworkServiceResponse]:
        async for response in self.registry.query_ns(request):
            yield response

    @grpc_errors
    async def Unregister(self, request: NetworkService, context: grpc.aio.ServicerContext) -> Empty:
        await self.registry.unregister_ns(request.name,
                                          registrant=_registrant(self.security, context))
        self.replay.services.pop(request.name, None)
        self.replay.service_registrants.pop(request.name, None)
        return Empty()


class NseProxy(registry_pb2_grpc.NetworkServiceEndpointRegistryServicer):
    """``advertise()``: the URL this manager registers its endpoints under (None: none; the
    endpoint is registered with its own URL); ``own_urls()``: every URL of this manager.

    Finds answer the records of endpoints registered through this manager with their real URL
    (what the node's forwarder dials), and leave out records that name this manager but that it
    does not know (yet: after a restart, until the endpoint registers again), so a forwarder
    never mistakes its manager for an endpoint.

    ``gone_grace``: an endpoint registered here that stays unreachable this long after it was
    reached is unregistered (:meth:`gone`); None: never (its registration expires). Stop the
    watches with :meth:`shutdown`. ``security`` and ``policy``: the checks of its callers (see
    the module)."""

    def __init__(self, registry: RegistryClient, *, local: LocalEndpoints,
                 advertise: Callable[[], str | None], own_urls: Callable[[], Iterable[str]] = list,
                 node: str = "", replay: Replay | None = None,
                 gone_grace: float | None = DEFAULT_GRACE, security: Security | None = None,
                 policy: RegistryPolicy | None = None) -> None:
        self.security = security or Security.insecure()
        self.policy = policy or RegistryPolicy()
        self.proofs = UrlProofs(self.security)
        self.registry = registry
        self.replay = replay or Replay(registry)
        self.local = local
        self.advertise = advertise
        self.own_urls = own_urls
        self.node = node
        self.liveness = (EndpointLiveness(self.gone, grace=gone_grace, security=self.security)
                         if gone_grace is not None else None)

    async def gone(self, name: str) -> None:
        """The endpoint ``name`` died without unregistering: unregister it on its behalf."""
        try:
            await self.registry.unregister_nse(name, registrant=self.replay.registrants.get(name))
        except NsmError as exc:
            log.warning("unregistering a dead endpoint failed: its registration will expire",
                        nse=name, error=exc.message)
        self.local.drop(name)
        self.replay.forget_endpoint(name)

    async def shutdown(self) -> None:
        if self.liveness is not None:
            await self.liveness.shutdown()
        await self.proofs.close()

    def _local_view(self, nse: NetworkServiceEndpoint) -> NetworkServiceEndpoint | None:
        """The record as this node sees it: one naming this manager with the endpoint's real
        URL (None when this manager does not know it), any other as it is."""
        if not nse.url:
            return nse
        url = normalize_url(nse.url)
        advertised = self.advertise()
        ours = {normalize_url(u) for u in (*self.own_urls(), *([advertised] if advertised else []))}
        real = self.local.get(nse.name)
        if url not in ours:
            return nse  # the endpoint's own URL, or a record of that name from elsewhere
        if real is None:
            return None
        out = NetworkServiceEndpoint()
        out.CopyFrom(nse)
        out.url = real
        return out

    async def _admit(self, caller: SpiffeId, request: NetworkServiceEndpoint) -> None:
        """The proxy's checks of a registration by ``caller`` (see the module)."""
        who = Caller(caller, caller)
        forwarder = is_forwarder(request)
        if self.policy.forwarder and forwarder and (caller.role != FORWARDER
                                                     or caller.node != self.node):
            raise deny(f"only the forwarder of node {self.node} registers forwarder records "
                       f"through its manager, and {caller} is not it", who)
        if self.policy.forwarder and forwarder:
            mine = {normalize_url(u) for u in self.own_urls()}
            named = service_labels(request, FORWARDER_SERVICE).get(MANAGER_URL_LABEL, "")
            if mine and (not named or normalize_url(named) not in mine):
                raise deny(f"a forwarder registering through this manager serves it: its "
                           f"{MANAGER_URL_LABEL} label must be one of this manager's URLs, not "
                           f"{named or '(none)'}", who)
        if self.policy.node and self.node:
            nodes = record_nodes(request)
            if nodes - {self.node} or (forwarder and not nodes):
                raise deny(f"this manager registers records of node {self.node} only, not with "
                           f"{NODE_LABEL} {', '.join(sorted(nodes)) or '(none)'}", who)
        if self.policy.owner and request.name:
            self._check_owner(who, request.name, "register")
        if self.policy.url:
            await check_url(self.proofs, request.url, {caller}, who)

    def _check_owner(self, who: Caller, name: str, action: str) -> None:
        known = self.replay.registrants.get(name)
        record = self.replay.endpoints.get(name)
        exp = None if record is None else expiration(record)
        if exp is not None and exp <= time.time():
            known = None  # its registration expired: the name is free again
        if known is not None and known != who.owner:
            raise deny(f"endpoint {name!r} was registered by {known}: only it may {action} it",
                       who)

    @grpc_errors
    async def Register(self, request: NetworkServiceEndpoint,
                       context: grpc.aio.ServicerContext) -> NetworkServiceEndpoint:
        caller = self.security.peer_id(context)
        if caller is not None:
            await self._admit(caller, request)
        registrant = None if caller is None else str(caller)
        if is_forwarder(request):
            result = await self.registry.register_nse(request, registrant=registrant)
            self._remember(result, registrant)
            return result
        real = str(parse_url(request.url))
        if self.liveness is not None:
            await self.liveness.settle(request.name)  # a removal of its dead predecessor first
        out = NetworkServiceEndpoint()
        out.CopyFrom(request)
        advertised = self.advertise()
        if advertised is not None:
            out.url = advertised
        if self.node:  # endpoints are labelled with their node, for selectors and forwarders
            for service in out.network_service_names:
                labels = out.network_service_labels[service].labels
                labels.setdefault(NODE_LABEL, self.node)
        # Known here before the registry announces it: a forwarder watching through us must
        # see the real URL from the first event on.
        known = self.local.get(request.name)
        self.local.set(request.name, real)
        try:
            result = await self.registry.register_nse(out, registrant=registrant)
        except BaseException:
            if known is None:
                self.local.drop(request.name)
            else:
                self.local.set(request.name, known)
            raise
        self.local.set(result.name, real)
        self._remember(result, registrant)
        if self.liveness is not None:
            self.liveness.watch(result.name, real)
        result.url = request.url  # the endpoint sees its own URL back
        return result

    def _remember(self, record: NetworkServiceEndpoint, registrant: str | None) -> None:
        kept = NetworkServiceEndpoint()
        kept.CopyFrom(record)
        self.replay.endpoints[record.name] = kept
        self.replay.registrants[record.name] = registrant

    @grpc_errors
    async def Find(self, request: registry_pb2.NetworkServiceEndpointQuery,
                   context: grpc.aio.ServicerContext
                   ) -> AsyncIterator[registry_pb2.NetworkServiceEndpointResponse]:
        async for response in self.registry.query_nse(request):
            view = self._local_view(response.network_service_endpoint)
            if view is None:
                continue
            if view is not response.network_service_endpoint:
                response.network_service_endpoint.CopyFrom(view)
            yield response

    @grpc_errors
    async def Unregister(self, request: NetworkServiceEndpoint,
                         context: grpc.aio.ServicerContext) -> Empty:
        caller = self.security.peer_id(context)
        registrant = None if caller is None else str(caller)
        if caller is not None and self.policy.owner:
            self._check_owner(Caller(caller, caller), request.name, "unregister")
        if self.liveness is not None:
            self.liveness.forget(request.name)
        await self.registry.unregister_nse(request.name, registrant=registrant)
        self.local.drop(request.name)
        self.replay.forget_endpoint(request.name)
        return Empty()

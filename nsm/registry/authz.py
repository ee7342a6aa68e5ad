"""Who may register what: the registry's authorization rules, and the URL proofs they rest on.

With a secure :class:`~nsm.security.tls.Security` the caller of every registration is a SPIFFE
ID (its TLS certificate). Rules, each switchable (:class:`RegistryPolicy`), all on by default; a
refused call raises :class:`~nsm.errors.PermissionDenied` with the reason, and is logged:

- ``owner``: the first registrant owns a name. An NSE's (and an NS's) owner is the SPIFFE ID
  that registered it first; only the owner may register it again (any change, or a refresh of
  an NSE) or unregister it. The owner is kept by the store with the entry
  (:attr:`nsm.registry.store.Entry.owner`), never taken from the caller's message, and ends with
  the entry (expiry, unregistration). Registering an NS again unchanged is a no-op anyone may do
  (endpoints of one service each make sure it exists).
- ``node``: a manager (``spiffe://<td>/nsm/node/<N>/manager``) registers, through its registry
  proxy, the records of its node's endpoints and forwarders: the registry accepts from it only
  records whose ``nodeName`` labels all name ``N``. It says on whose behalf it registers in the
  metadata :data:`REGISTRANT_HEADER`, which is trusted only from a manager identity (from anyone
  else, naming another ID is refused); the owner is then that registrant, so another endpoint
  of the same node cannot take a record over through the proxy either. A manager unregisters
  only records of its node, on behalf of their owner.
- ``forwarder``: a record of network service ``forwarder`` may be registered only by a
  forwarder identity, whose node is the record's ``nodeName`` (through its node's manager, or
  directly).
- ``url``: a record's URL must belong to its registrant. The registry dials it and asks the
  server to prove who it is (:func:`nsm.security.prove.prove`): the proven ID must be the
  registrant (or, for a record a manager proxies, the manager: its own URL, which it registers
  its endpoints under). A URL the registry cannot reach is refused with FAILED_PRECONDITION,
  except a ``unix://`` URL of a proxied record: it is node-local (a forwarder on the node's
  socket), the registry need not reach it, and the manager proved it itself before forwarding.
  Proofs are cached per URL (:class:`UrlProofs`), so refreshes cost nothing.

Find is not restricted: every identity of the trust domain may look up every record.

In insecure mode there are no identities (:meth:`RegistryAuthz.caller` is None) and none of
these rules applies; the registry's structural checks still do.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, ClassVar

import grpc
from google.protobuf.message import Message

from nsm.api.registry_pb2 import NetworkServiceEndpoint
from nsm.errors import (
    FailedPrecondition,
    InvalidArgument,
    NsmError,
    PermissionDenied,
    Unauthenticated,
    Unsupported,
)
from nsm.log import get_logger
from nsm.registry.store import Entry
from nsm.security import prove
from nsm.security.ids import FORWARDER, MANAGER, SpiffeId, parse_id
from nsm.security.policy import Switches
from nsm.security.tls import Security
from nsm.transport import dial, parse_url
from nsm.wellknown import FORWARDER_SERVICE, NODE_LABEL

log = get_logger("nsm.registry.authz")

#: Metadata of a manager's registration: the SPIFFE ID it registers on behalf of.
REGISTRANT_HEADER = "nsm-registrant"
#: How long a URL's proof is trusted before the server is asked again.
PROOF_TTL = 300.0
#: Timeout of one proof (dial and answer).
PROOF_TIMEOUT = 3.0
#: URL proofs remembered at most (the cache starts over when full).
MAX_PROOFS = 4096


@dataclass(frozen=True)
class RegistryPolicy(Switches):
    """Which rules apply (module docstring); all on by default."""

    KIND: ClassVar[str] = "registry policy"

    owner: bool = True
    node: bool = True
    forwarder: bool = True
    url: bool = True


@dataclass(frozen=True)
class Caller:
    """Who registers: ``peer`` is the TLS identity of the call, ``registrant`` the identity the
    record is registered for (``peer`` unless a manager registers on an endpoint's behalf)."""

    peer: SpiffeId
    registrant: SpiffeId

    @property
    def proxied(self) -> bool:
        return self.registrant != self.peer

    @property
    def owner(self) -> str:
        return str(self.registrant)


def _who(caller: Caller | SpiffeId | None) -> dict[str, str]:
    if isinstance(caller, Caller):
        return {"peer": str(caller.peer), "registrant": str(caller.registrant)}
    return {"peer": str(caller)}


def deny(reason: str, caller: Caller | SpiffeId | None = None) -> PermissionDenied:
    """A :class:`PermissionDenied` with ``reason``, logged."""
    log.warning("denied", reason=reason, **_who(caller))
    return PermissionDenied(reason)


def record_nodes(nse: NetworkServiceEndpoint) -> set[str]:
    """Every node the record's ``nodeName`` labels name."""
    return {labels.labels[NODE_LABEL] for labels in nse.network_service_labels.values()
            if NODE_LABEL in labels.labels}


def is_forwarder(nse: NetworkServiceEndpoint) -> bool:
    return FORWARDER_SERVICE in nse.network_service_names


def live(entry: Entry[Any] | None, now: float) -> Entry[Any] | None:
    """``entry`` unless its time ran out (its owner's claim ends with it, even before the store
    got round to removing it)."""
    if entry is None or (entry.expires is not None and entry.expires <= now):
        return None
    return entry


class UrlProofs:
    """Who serves at a URL, proven (:mod:`nsm.security.prove`) and remembered for ``ttl``
    seconds; one proof in flight per URL however many registrations ask. A remembered proof is
    used only when it names an identity the caller expects: any other answer is asked for
    again, so a server that changed at a URL is never judged by its predecessor's proof."""

    def __init__(self, security: Security, *, ttl: float = PROOF_TTL,
                 timeout: float = PROOF_TIMEOUT) -> None:
        self.security = security
        self.ttl = ttl
        self.timeout = timeout
        self._proven: dict[str, tuple[SpiffeId, float]] = {}
        self._inflight: dict[str, asyncio.Future[SpiffeId]] = {}

    async def served_by(self, url: str, expected: Collection[SpiffeId]) -> SpiffeId:
        """The ID proven by the server at ``url`` (from the cache when it is one of
        ``expected``). Raises the domain error of a failed dial (Unavailable, DeadlineExceeded)
        or proof (Unauthenticated)."""
        held = self._proven.get(url)
        if held is not None and held[0] in expected and time.monotonic() - held[1] < self.ttl:
            return held[0]
        future = self._inflight.get(url)
        if future is None:
            future = self._inflight[url] = asyncio.ensure_future(self._prove(url))
            future.add_done_callback(lambda f: self._inflight.pop(url, None))
            future.add_done_callback(lambda f: f.cancelled() or f.exception())
        return await asyncio.shield(future)

    async def _prove(self, url: str) -> SpiffeId:
        channel = dial(url, self.security)
        try:
            sid, _ = await prove.prove(channel, self.security, timeout=self.timeout)
        finally:
            await channel.close()
        if len(self._proven) >= MAX_PROOFS:
            self._proven.clear()
        self._proven[url] = (sid, time.monotonic())
        return sid

    async def close(self) -> None:
        inflight, self._inflight = list(self._inflight.values()), {}
        for future in inflight:
            future.cancel()
        for future in inflight:
            with contextlib.suppress(BaseException):
                await future


async def check_url(proofs: UrlProofs, url: str, allowed: Collection[SpiffeId],
                    caller: Caller | SpiffeId | None, *, node_local_ok: bool = False) -> None:
    """Refuse unless the server at ``url`` proves one of ``allowed``: PermissionDenied when it
    proves another identity (or none), FailedPrecondition when it cannot be reached (unless
    ``node_local_ok`` and the URL is a unix socket)."""
    try:
        sid = await proofs.served_by(url, allowed)
    except (Unauthenticated, Unsupported, InvalidArgument) as exc:
        raise deny(f"the server at {url} does not prove an identity of the trust domain "
                   f"({exc.message})", caller) from exc
    except NsmError as exc:
        if node_local_ok and parse_url(url).is_unix:
            return
        log.warning("denied", reason="URL unreachable", url=url, error=exc.message, **_who(caller))
        raise FailedPrecondition(
            f"cannot check that {url} belongs to {_names(allowed)}: the registry cannot reach it "
            f"({exc.code.name}: {exc.message})") from exc
    if sid not in allowed:
        raise deny(f"{url} is served by {sid}, not by {_names(allowed)}", caller)


def _names(ids: Collection[SpiffeId]) -> str:
    return " or ".join(sorted(str(i) for i in ids))


def caller_of(security: Security, context: grpc.aio.ServicerContext) -> Caller | None:
    """Who calls (None when insecure): the TLS identity, and the registrant a manager names in
    :data:`REGISTRANT_HEADER`. Anyone else naming an identity other than its own is refused."""
    peer = security.peer_id(context)
    if peer is None:
        return None
    named = dict(context.invocation_metadata() or ()).get(REGISTRANT_HEADER)
    if not named:
        return Caller(peer, peer)
    if not isinstance(named, str):
        raise InvalidArgument(f"{REGISTRANT_HEADER} must be text")
    registrant = parse_id(named)
    if registrant == peer:
        return Caller(peer, peer)
    if peer.role != MANAGER:
        raise deny(f"only a manager registers on behalf of another identity, and {peer} is "
                   f"not one ({REGISTRANT_HEADER}: {registrant})", peer)
    if registrant.trust_domain != peer.trust_domain:
        raise deny(f"registrant {registrant} is not of trust domain {peer.trust_domain}", peer)
    if registrant.role not in (None, FORWARDER):
        raise deny(f"a manager registers on behalf of its node's endpoints and forwarders, "
                   f"not of {registrant}", peer)
    if registrant.role == FORWARDER and registrant.node != peer.node:
        raise deny(f"{peer} may not register on behalf of {registrant}, a forwarder of "
                   "another node", peer)
    return Caller(peer, registrant)


class RegistryAuthz:
    """The rules of the module docstring over one registry's :class:`Security`."""

    def __init__(self, security: Security | None = None, policy: RegistryPolicy | None = None,
                 *, proofs: UrlProofs | None = None) -> None:
        self.security = security or Security.insecure()
        self.policy = policy or RegistryPolicy()
        self.proofs = proofs or UrlProofs(self.security)

    @property
    def enabled(self) -> bool:
        return self.security.enabled

    def caller(self, context: grpc.aio.ServicerContext) -> Caller | None:
        return caller_of(self.security, context)

    # -- ownership -----------------------------------------------------------------------

    def owner_for(self, caller: Caller | None, existing: Entry[Any] | None, what: str,
                  *, now: float) -> str | None:
        """The owner to store with a write of ``what`` replacing ``existing``: the existing
        owner, or the registrant when the name is free; PermissionDenied when it is someone
        else's."""
        current = live(existing, now)
        if caller is None:
            return None if current is None else current.owner
        if current is None or current.owner is None:
            return caller.owner
        if current.owner != caller.owner and self.policy.owner:
            raise deny(f"{what} is owned by {current.owner}: only its owner may register it "
                       "again", caller)
        return current.owner

    def check_unregister(self, caller: Caller | None, existing: Entry[Any], what: str,
                         *, now: float) -> None:
        """Refuse unless ``caller`` may remove ``existing`` (its owner; a manager only on its
        node)."""
        current = live(existing, now)
        if caller is None or current is None:
            return
        if self.policy.owner and current.owner is not None and current.owner != caller.owner:
            raise deny(f"{what} is owned by {current.owner}: only its owner may unregister it",
                       caller)
        record = current.record
        if (self.policy.node and caller.peer.role == MANAGER
                and isinstance(record, NetworkServiceEndpoint)):
            self._check_node(caller, record, "unregister")

    def unchanged(self, existing: Entry[Any] | None, record: Message, *, now: float) -> bool:
        current = live(existing, now)
        return current is not None and current.record == record

    # -- what a record may say -----------------------------------------------------------

    async def admit_nse(self, caller: Caller | None, nse: NetworkServiceEndpoint) -> None:
        """The ``node``, ``forwarder`` and ``url`` rules for a registration of ``nse``."""
        if caller is None:
            return
        if self.policy.node and caller.peer.role == MANAGER:
            self._check_node(caller, nse, "register")
        if self.policy.forwarder and is_forwarder(nse):
            self._check_forwarder(caller, nse)
        if self.policy.url:
            allowed = {caller.registrant, caller.peer}
            await check_url(self.proofs, nse.url, allowed, caller, node_local_ok=caller.proxied)

    def _check_node(self, caller: Caller, nse: NetworkServiceEndpoint, action: str) -> None:
        node = caller.peer.node
        nodes = record_nodes(nse)
        if not nodes:
            raise deny(f"{caller.peer} may {action} only records of node {node}: "
                       f"{nse.name or 'the record'} has no {NODE_LABEL} label", caller)
        if nodes != {node}:
            raise deny(f"{caller.peer} may {action} only records of node {node}, not of "
                       f"{', '.join(sorted(nodes - {node}))}", caller)

    def _check_forwarder(self, caller: Caller, nse: NetworkServiceEndpoint) -> None:
        who = caller.registrant
        if who.role != FORWARDER:
            raise deny(f"only a forwarder registers records of network service "
                       f"{FORWARDER_SERVICE!r}, and {who} is not one", caller)
        nodes = record_nodes(nse)
        if nodes != {who.node}:
            raise deny(f"{who} registers forwarder records of its node {who.node} only, not "
                       f"with {NODE_LABEL} {', '.join(sorted(nodes)) or '(none)'}", caller)

    async def close(self) -> None:
        await self.proofs.close()

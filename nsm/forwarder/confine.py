"""Namespace confinement: the forwarder programs only the namespaces of the pods it serves.

Every namespace a KERNEL mechanism names — the client's (upstream) and the one the endpoint
answers with (downstream) — is checked here, in one place, before any datapath element builds
anything in it:

1. **Who may name a namespace**: only the forwarder's own node's manager sends it a KERNEL
   mechanism (``ctx.peer``; remote callers reach pods of this node only through it).
2. **Structure** (:class:`~nsm.kernel.netns.NodeNetns`): the path is opened once; the file must
   be on nsfs, a network namespace (``NS_GET_NSTYPE``), and neither the node's own namespace
   (the forwarder's) nor PID 1's. The proof then runs on that file descriptor, never on the
   path again.
3. **Ownership** (:mod:`nsm.security.netns`): the identity on whose behalf the namespace is used
   — the client's (its path segment's token ``sub``) or the endpoint's (the last segment's) —
   must have a proof listener inside that namespace, answering with a valid SVID of that ID and
   a signature over a fresh nonce. Only the first Request of a connection, and a Request whose
   namespace changed, is proven; refreshes with the same namespace skip it. The client's proof
   runs while the endpoint is asked (a refusal then closes what the endpoint did). So does the
   endpoint's, when the endpoint answered the last connection with a namespace and identity
   (:class:`_Guess`): that namespace is opened, checked and proven while the endpoint is asked;
   the proof counts only if the answer names the same namespace (its checked file has the same
   identity while both are open, so it is the same namespace) for the same identity; otherwise
   the answer's namespace is proven as usual. Either way the proof is made during the Request
   it is for, on a namespace checked during it.

A refusal is PERMISSION_DENIED with the reason (a missing namespace stays NOT_FOUND), logged.
With ``--insecure`` there are no identities: only the structural checks apply.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from nsm.api.connection_pb2 import Connection, Mechanism
from nsm.api.networkservice_pb2 import NetworkServiceRequest
from nsm.chain import Ctx, Element, Key, NextClose, NextRequest
from nsm.errors import NsmError, PermissionDenied
from nsm.forwarder.mechanism import PAIR, UPSTREAM, close_downstream
from nsm.kernel.netns import CheckedNetns, NetnsFinder, NetnsId, NodeNetns
from nsm.mechanisms import KERNEL, LOCAL, NETNS_INODE_URL, validate_netns_url
from nsm.security.ids import MANAGER, SpiffeId, node_id
from nsm.security.netns import PROOF_TIMEOUT, NetnsProof, claimed_id
from nsm.security.tls import Security


@dataclass(frozen=True)
class Proven:
    """A namespace checked for a connection: its identity and on whose behalf (None: insecure)."""

    ident: NetnsId
    owner: str | None


#: Endpoints remembered for the speculative proof of their namespace (the last answer of each).
GUESSES = 256

_CLIENT: Key[Proven] = Key("confine.client")
_ENDPOINT: Key[Proven] = Key("confine.endpoint")
_PENDING: Key[asyncio.Future[Proven | None]] = Key("confine.pending")


def _kernel_netns(m: Mechanism | None) -> str | None:
    """The ``inodeURL`` of a KERNEL mechanism (a path or ``inode://``), None for any other."""
    if m is None or (m.cls, m.type) != (LOCAL, KERNEL) or not m.parameters.get(NETNS_INODE_URL):
        return None
    url = m.parameters[NETNS_INODE_URL]
    validate_netns_url(url)
    return url


class Confine:
    """The checks (module docstring), as two elements of the forwarder's chain: :attr:`before`
    right after SelectMechanism (the caller, the client's namespace: structure at once, its
    proof started) and :attr:`after` right after the datapath elements (the client's proof
    awaited and the endpoint's namespace checked, on the answer's way back, before any datapath
    element builds)."""

    def __init__(self, security: Security, *, node: str, nodens: NodeNetns | None = None,
                 finder: NetnsFinder | None = None, timeout: float = PROOF_TIMEOUT) -> None:
        self.security = security
        self.node = node
        self.nodens = nodens or NodeNetns()
        #: Where a namespace named by inode is (the datapath elements share it).
        self.finder = finder or NetnsFinder()
        self.proof = NetnsProof(security, timeout=timeout)
        #: Endpoint name -> (namespace path, owner) of its last proven answer.
        self.guesses: dict[str, tuple[str, str]] = {}
        self.before = _Before(self)
        self.after = _After(self)

    def manager_id(self) -> str:
        return node_id(self.security.trust_domain, self.node, MANAGER)

    def denied(self, ctx: Ctx, exc: PermissionDenied) -> PermissionDenied:
        ctx.log.warning("denied", peer=str(getattr(ctx, "peer", None) or ""), reason=exc.message)
        return exc

    def check_caller(self, ctx: Ctx) -> None:
        """Only this node's manager may send a namespace (None: insecure, or no TLS peer)."""
        peer: SpiffeId | None = getattr(ctx, "peer", None)
        if peer is not None and str(peer) != self.manager_id():
            raise self.denied(ctx, PermissionDenied(
                f"{peer} may not name a network namespace: only this node's manager "
                f"({self.manager_id()}) sends KERNEL mechanisms to its forwarder"))

    def open(self, ctx: Ctx, url: str) -> CheckedNetns:
        """The namespace an ``inodeURL`` names, opened and checked (:class:`NodeNetns`)."""
        try:
            return self.nodens.open(self.finder.resolve(url, exists=False))
        except PermissionDenied as exc:
            raise self.denied(ctx, exc) from None

    async def prove(self, ctx: Ctx, ns: CheckedNetns, owner: SpiffeId | None, who: str,
                    key: Key[Proven]) -> Proven | None:
        """Prove (and then close) the checked namespace ``ns`` for ``owner``; what to record
        for the connection, None when it was proven already."""
        try:
            before = ctx.meta.get(key)
            if not self.security.enabled:
                proven = Proven(ns.ident, None)
                return None if before == proven else proven
            if owner is None:
                raise self.denied(ctx, PermissionDenied(
                    f"the {who}'s network namespace {ns.path} cannot be proven: its path "
                    "segment carries no token naming its identity"))
            proven = Proven(ns.ident, str(owner))
            if before == proven:
                return None  # a refresh: the same namespace, proven for the same identity
            try:
                await self.proof.prove(ns.fd, owner, where=f"the {who}'s network namespace {ns.path}")
            except PermissionDenied as exc:
                raise self.denied(ctx, exc) from None
            ctx.log.debug("namespace proven", side=who, netns=ns.path, owner=str(owner))
            return proven
        finally:
            ns.close()


class _Before(Element):
    def __init__(self, confine: Confine) -> None:
        self.confine = confine

    async def request(self, ctx: Ctx, request: NetworkServiceRequest, next: NextRequest) -> Connection:
        url = _kernel_netns(ctx.meta.get(UPSTREAM))
        if url is None:
            return await next(ctx, request)
        c = self.confine
        c.check_caller(ctx)
        ns = c.open(ctx, url)
        segments = request.connection.path.path_segments
        owner = claimed_id(segments[0]) if segments else None
        pending = asyncio.ensure_future(c.prove(ctx, ns, owner, "client", _CLIENT))
        ctx.meta.set(_PENDING, pending)
        try:
            return await next(ctx, request)
        finally:
            ctx.meta.pop(_PENDING)
            if not pending.done():
                pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)


@dataclass
class _Guess:
    """A speculative proof of an endpoint's namespace: the namespace it named last time, opened
    and checked (kept open until :meth:`end`, so that its identity stays its own), and the proof
    under way."""

    ns: CheckedNetns
    owner: str
    task: asyncio.Future[SpiffeId]

    def matches(self, ns: CheckedNetns, owner: SpiffeId) -> bool:
        """Whether the answer's checked namespace is this one (both open now) for the same owner."""
        return ns.ident == self.ns.ident and str(owner) == self.owner

    async def proven(self) -> bool:
        """Whether the proof succeeded (a refusal is not reported here: the answer's namespace is
        then proven as usual, with the usual refusal)."""
        try:
            await asyncio.shield(self.task)
        except NsmError:
            return False
        return True

    async def end(self) -> None:
        if not self.task.done():
            self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        self.ns.close()


class _After(Element):
    def __init__(self, confine: Confine) -> None:
        self.confine = confine

    async def request(self, ctx: Ctx, request: NetworkServiceRequest, next: NextRequest) -> Connection:
        pending = ctx.meta.get(_PENDING)
        pair = ctx.meta.get(PAIR)
        to_endpoint = pair is not None and pair[1] == KERNEL
        if pending is None and not to_endpoint:
            return await next(ctx, request)
        first = ctx.meta.get(_CLIENT) is None and ctx.meta.get(_ENDPOINT) is None
        guess = self._guess(request) if to_endpoint and ctx.meta.get(_ENDPOINT) is None else None
        try:
            try:
                conn = await next(ctx, request)
            except BaseException:
                if pending is not None:
                    pending.cancel()
                raise
            try:
                client = await pending if pending is not None else None
                endpoint = await self._endpoint(ctx, conn, guess) if to_endpoint else None
            except BaseException as exc:
                if first:
                    await close_downstream(self, ctx, conn, exc, "namespace refused")
                raise
        finally:
            if guess is not None:
                await guess.end()
        if client is not None:
            ctx.meta.set(_CLIENT, client)
        if endpoint is not None:
            ctx.meta.set(_ENDPOINT, endpoint)
        return conn

    def _guess(self, request: NetworkServiceRequest) -> _Guess | None:
        """The speculative proof of the namespace the endpoint answered last time (module
        docstring), started; None when there is nothing to guess or it cannot be checked."""
        c = self.confine
        known = c.guesses.get(request.connection.network_service_endpoint_name)
        if known is None or not c.security.enabled:
            return None
        path, owner = known
        try:
            ns = c.nodens.open(path)
        except NsmError:
            return None
        return _Guess(ns, owner, asyncio.ensure_future(
            c.proof.prove(ns.fd, owner, where=f"the endpoint's network namespace {path}")))

    async def _endpoint(self, ctx: Ctx, conn: Connection, guess: _Guess | None) -> Proven | None:
        url = _kernel_netns(conn.mechanism)
        if url is None:
            return None  # not a KERNEL answer: the datapath element refuses it
        c = self.confine
        ns = c.open(ctx, url)
        segments = conn.path.path_segments
        owner = claimed_id(segments[-1]) if segments else None
        if guess is not None and owner is not None and guess.matches(ns, owner) and await guess.proven():
            ns.close()
            ctx.log.debug("namespace proven", side="endpoint", netns=ns.path, owner=str(owner))
            proven: Proven | None = Proven(ns.ident, str(owner))
        else:
            proven = await c.prove(ctx, ns, owner, "endpoint", _ENDPOINT)
        if proven is not None and proven.owner is not None:
            if len(c.guesses) >= GUESSES:
                c.guesses.clear()
            c.guesses[conn.network_service_endpoint_name] = (ns.path, proven.owner)
        return proven

    async def close(self, ctx: Ctx, conn: Connection, next: NextClose) -> None:
        await next(ctx, conn)

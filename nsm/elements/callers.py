"""callers: who may call a role at all, one rule (and one switchable policy) each, ahead of
everything else in the role's chain (see :mod:`nsm.role`):

- :class:`RemoteFromForwarders` (manager, ``remote_from_forwarders``): only forwarders request
  REMOTE mechanisms (VXLAN, ...): a workload cannot have a manager build a tunnel toward it;
- :class:`NodeManagerOnly` (forwarder, ``forwarder_callers``): only the manager of the
  forwarder's own node (by the node in both SPIFFE IDs) sends it Requests and Closes;
- :class:`ForwardersOnly` (endpoint, ``endpoint_callers``): only forwarders do.

Internal events pass; with ``--insecure`` (no identities) the rules are skipped.
"""

from __future__ import annotations

from typing import ClassVar

from nsm.api.connection_pb2 import Connection
from nsm.api.networkservice_pb2 import NetworkServiceRequest
from nsm.chain import Ctx, Element, NextClose, NextRequest
from nsm.errors import Unauthenticated
from nsm.mechanisms import REMOTE
from nsm.security.ids import FORWARDER, MANAGER, SpiffeId
from nsm.security.policy import (
    ENDPOINT_CALLERS,
    FORWARDER_CALLERS,
    REMOTE_FROM_FORWARDERS,
    Policies,
    deny,
)
from nsm.security.tls import Security


class CallerRule(Element):
    """One rule on the caller: :meth:`refused` says why a call is refused (None: allowed)."""

    policy: ClassVar[str]

    def __init__(self, security: Security, policies: Policies) -> None:
        self.security = security
        self.enabled = bool(getattr(policies, self.policy))

    def refused(self, peer: SpiffeId, request: NetworkServiceRequest | None) -> str | None:
        raise NotImplementedError

    def _check(self, ctx: Ctx, request: NetworkServiceRequest | None) -> None:
        if not self.enabled or not self.security.enabled or ctx.internal:
            return
        if ctx.peer is None:
            raise Unauthenticated("the caller is not authenticated")
        why = self.refused(ctx.peer, request)
        if why is not None:
            raise deny(self.policy, why, peer=str(ctx.peer))

    async def request(self, ctx: Ctx, request: NetworkServiceRequest, next: NextRequest) -> Connection:
        self._check(ctx, request)
        return await next(ctx, request)

    async def close(self, ctx: Ctx, conn: Connection, next: NextClose) -> None:
        self._check(ctx, None)
        await next(ctx, conn)


class RemoteFromForwarders(CallerRule):
    policy = REMOTE_FROM_FORWARDERS

    def refused(self, peer: SpiffeId, request: NetworkServiceRequest | None) -> str | None:
        if request is None or peer.role == FORWARDER:
            return None
        mechanisms = [*request.mechanism_preferences]
        if request.connection.HasField("mechanism"):
            mechanisms.append(request.connection.mechanism)
        remote = [m.type for m in mechanisms if m.cls == REMOTE]
        if remote:
            return f"only forwarders may request {REMOTE} mechanisms ({', '.join(remote)[:100]})"
        return None


class NodeManagerOnly(CallerRule):
    policy = FORWARDER_CALLERS

    def refused(self, peer: SpiffeId, request: NetworkServiceRequest | None) -> str | None:
        node = self.security.svid.spiffe_id.node
        if node is None:
            return f"this forwarder's own ID {self.security.svid.id} names no node"
        if peer.role != MANAGER or peer.node != node:
            return f"a forwarder serves only the manager of its node ({node})"
        return None


class ForwardersOnly(CallerRule):
    policy = ENDPOINT_CALLERS

    def refused(self, peer: SpiffeId, request: NetworkServiceRequest | None) -> str | None:
        return None if peer.role == FORWARDER else "an endpoint serves only forwarders"

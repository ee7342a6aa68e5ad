"""owner: a connection is refreshed and closed only by the identity that holds it
(policy ``connection_owner``).

The caller's SPIFFE ID is recorded at a connection's first Request at this hop; a later Request
or Close of that connection id from another identity is refused (PERMISSION_DENIED), and so is
a first Request whose path names this hop's segment of a connection another identity holds (a
caller replaying another client's path through this hop: what this hop sends on would be that
connection at the next hop, where this hop is its holder). Internal events (an expiry) pass;
with ``--insecure`` nothing is recorded or checked.
"""

from __future__ import annotations

from nsm.api.connection_pb2 import Connection
from nsm.api.networkservice_pb2 import NetworkServiceRequest
from nsm.chain import Ctx, Element, Key, NextClose, NextRequest
from nsm.security.policy import CONNECTION_OWNER, Policies, deny
from nsm.security.tls import Security

#: (holder's SPIFFE ID, this hop's segment id) of a connection.
_HOLDER: Key[tuple[str, str]] = Key("owner.holder")


class Ownership(Element):
    def __init__(self, security: Security, policies: Policies) -> None:
        self.security = security
        self.enabled = policies.connection_owner
        #: This hop's segment id of each held connection → its holder.
        self._segments: dict[str, str] = {}

    def _caller(self, ctx: Ctx) -> str | None:
        if not self.security.enabled or not self.enabled or ctx.internal or ctx.peer is None:
            return None
        return str(ctx.peer)

    def _check(self, ctx: Ctx, what: str) -> None:
        caller = self._caller(ctx)
        held = ctx.meta.get(_HOLDER)
        if caller is not None and held is not None and held[0] != caller:
            raise deny(CONNECTION_OWNER, f"connection {ctx.conn_id} is held by another identity: "
                       f"{what} refused", peer=caller)

    async def request(self, ctx: Ctx, request: NetworkServiceRequest, next: NextRequest) -> Connection:
        self._check(ctx, "Request")
        caller = self._caller(ctx)
        segment = request.connection.id  # this hop's segment id (after UpdatePath)
        if caller is not None and ctx.meta.get(_HOLDER) is None:
            other = self._segments.get(segment)
            if other is not None and other != caller:
                raise deny(CONNECTION_OWNER, f"path segment {segment} of this hop belongs to a "
                           "connection of another identity", peer=caller)
        conn = await next(ctx, request)
        if caller is not None:
            held = ctx.meta.get(_HOLDER)
            if held is None or held[1] != segment:
                if held is not None:
                    self._forget(held)
                ctx.meta.set(_HOLDER, (caller if held is None else held[0], segment))
                self._segments[segment] = caller if held is None else held[0]
        return conn

    async def close(self, ctx: Ctx, conn: Connection, next: NextClose) -> None:
        self._check(ctx, "Close")
        try:
            await next(ctx, conn)
        finally:
            held = ctx.meta.pop(_HOLDER)
            if held is not None:
                self._forget(held)

    def _forget(self, held: tuple[str, str]) -> None:
        if self._segments.get(held[1]) == held[0]:
            del self._segments[held[1]]

    def __len__(self) -> int:
        return len(self._segments)

"""tokens: the path tokens of a hop, both sides (see :mod:`nsm.security.tokens` and
:mod:`nsm.security.policy`).

- **Server side** (:class:`PathTokens`, in every role's prefix after UpdatePath): the caller's
  token (metadata ``nsm-client-token``) goes into the caller's path segment, whose expiry becomes
  the token's (this hop's own segment never outlives it); then the token policies
  (``tokens_valid``, ``tokens_chained``, ``tokens_expired``, ``prev_token_signed``) on the path
  up to here. A Close carries a fresh token too, checked the same way. The last hop (the
  endpoint) signs its own segment for the caller, so that the caller can check it.
- **Client side** (:class:`HopTokens`, used by the server chains' ``Connect`` and the client
  chain's ``ManagerConnect``): before each Request or Close to the next hop, this hop signs its
  own segment for the identity the next hop proved (``Channels.peer``: once per channel; the
  roles preconnect, which proves too), and sends the token as metadata; after the answer,
  ``next_token_signed``.

With ``--insecure`` (no identity) nothing is signed or checked. Internal events (an expiry's
Close) carry no caller and pass.
"""

from __future__ import annotations

import datetime as dt
import time

from nsm.api.connection_pb2 import Connection, PathSegment
from nsm.api.networkservice_pb2 import NetworkServiceRequest
from nsm.chain import Ctx, Element, NextClose, NextRequest
from nsm.elements.updatepath import ts
from nsm.errors import PermissionDenied, Unauthenticated
from nsm.security import policy
from nsm.security.policy import Policies, check_next_token, check_tokens
from nsm.security.tls import Security
from nsm.security.tokens import TOKEN_HEADER, mint
from nsm.transport import Channels

#: Seconds a Close's token is valid from its signing (see :meth:`HopTokens.sign`).
CLOSE_TOKEN_LIFETIME = 60.0


def _set_expiry(segment: PathSegment, expires: float) -> None:
    segment.expires.CopyFrom(ts(expires))


def _expiry(segment: PathSegment) -> float:
    return segment.expires.seconds + segment.expires.nanos / 1e9


class PathTokens(Element):
    """The server side of the path tokens (``last_hop``: this hop signs its own segment too)."""

    def __init__(self, security: Security, policies: Policies, *, last_hop: bool = False) -> None:
        self.security = security
        self.policies = policies
        self.last_hop = last_hop

    def _caller(self, ctx: Ctx) -> bool:
        """Whether the event comes from an authenticated caller whose tokens are checked."""
        if not self.security.enabled or ctx.internal:
            return False
        if ctx.peer is None:
            raise Unauthenticated("the caller is not authenticated")
        return True

    async def request(self, ctx: Ctx, request: NetworkServiceRequest, next: NextRequest) -> Connection:
        if not self._caller(ctx):
            return await next(ctx, request)
        assert ctx.peer is not None
        path = request.connection.path
        index = path.index
        segments = path.path_segments
        if index == 0:
            raise policy.deny(policy.TOKENS_VALID, "the caller's path segment is missing", peer=str(ctx.peer))
        own_id = self.security.svid.id
        token = ctx.headers.get(TOKEN_HEADER, "")
        prev = segments[index - 1]
        prev.token = token
        claims = check_tokens(self.policies, [s.token for s in segments[:index]], own_id=own_id,
                              peer=ctx.peer, peer_cert=ctx.peer_cert)
        own = segments[index]
        caller = claims[-1] if claims else None
        if caller is not None:
            _set_expiry(prev, caller.exp)  # the caller's segment expires with its token
            if _expiry(own) > caller.exp:
                _set_expiry(own, caller.exp)
        if self.last_hop:
            signed = mint(self.security.svid, str(ctx.peer), expires=_expiry(own))
            own.token = signed.text
            _set_expiry(own, signed.expires)
        return await next(ctx, request)

    async def close(self, ctx: Ctx, conn: Connection, next: NextClose) -> None:
        if self._caller(ctx):
            assert ctx.peer is not None
            token = ctx.headers.get(TOKEN_HEADER, "")
            check_tokens(self.policies, [token] if token else [], own_id=self.security.svid.id,
                         peer=ctx.peer, peer_cert=ctx.peer_cert)
        await next(ctx, conn)


class HopTokens:
    """The client side of a hop's tokens, over the channels it calls the next hop on."""

    def __init__(self, channels: Channels, policies: Policies) -> None:
        self.channels = channels
        self.policies = policies

    @property
    def enabled(self) -> bool:
        return self.channels.security.enabled

    async def sign(self, url: str, conn: Connection, *, close: bool = False) -> list[tuple[str, str]]:
        """Sign this hop's own segment of ``conn`` (the one at ``path.index``) for the next hop
        at ``url``: the segment's token and expiry are set; the metadata to send with it.

        ``close``: for a Close, whose token says who closes, not how long the connection lives:
        valid for :data:`CLOSE_TOKEN_LIFETIME` from now even when the segment has expired (a
        Close of a connection whose refreshes failed, or of one a cancelled heal rebuilt under
        the same id, must still be accepted, not refused as ``tokens_expired``)."""
        if not self.enabled:
            return []
        next_id, _ = await self.channels.peer(url)
        segments = conn.path.path_segments
        if not segments:
            return []
        own = segments[conn.path.index]
        expires = _expiry(own) if own.HasField("expires") and _expiry(own) > 0 else None
        if close:
            expires = time.time() + CLOSE_TOKEN_LIFETIME
        signed = mint(self.channels.security.svid, str(next_id),
                      expires=expires if expires is not None else float("inf"))
        own.token = signed.text
        _set_expiry(own, signed.expires)
        return list(signed.metadata())

    async def check(self, url: str, answer: Connection, index: int) -> None:
        """``next_token_signed`` on the path the next hop at ``url`` answered (this hop's segment
        at ``index``)."""
        if not self.enabled or not self.policies.next_token_signed:
            return
        next_id, next_cert = await self.channels.peer(url)
        if next_cert is None:  # its identity is known from the handshake, its certificate not
            next_id, next_cert = await self.channels.peer(url, again=True)
        segments = answer.path.path_segments
        token = segments[index + 1].token if index + 1 < len(segments) else ""
        if not token:
            raise policy.deny(policy.NEXT_TOKEN_SIGNED, "the next hop answered no token for its segment",
                       next_hop=str(next_id))
        try:
            check_next_token(self.policies, token, next_id=next_id, next_cert=next_cert, quiet=True)
            return
        except PermissionDenied:
            # The next hop may have restarted (a new key) behind the same channel since it
            # proved who it is: ask again, once, then decide.
            next_id, next_cert = await self.channels.peer(url, again=True)
        # Its token may also be signed with the key it had a moment ago (it rotated between
        # signing and the proof): any certificate it proved lately, still valid, of the same
        # identity, is its.
        when = dt.datetime.now(dt.UTC)
        for sid, cert in self.channels.proven(url)[1:]:
            if sid == next_id and cert.not_valid_after_utc >= when:
                try:
                    check_next_token(self.policies, token, next_id=next_id, next_cert=cert, quiet=True)
                    return
                except PermissionDenied:
                    continue
        check_next_token(self.policies, token, next_id=next_id, next_cert=next_cert)

"""Authorization policies of the NetworkService and MonitorConnection servers, each switchable
(``--policy-<name>`` / ``--no-policy-<name>``, ``NSM_POLICY_<NAME>``; all on by default), and
the path-token checks themselves.

Token policies (the reference's names, ``sdk:pkg/tools/opa/policies``):

- ``tokens_valid``: every token on the path up to this hop is a well-formed ES256 path token;
  the caller's verifies with the caller's TLS certificate (the others' signers' keys are not at
  hand: they are checked structurally; their signers' next hops verified each when it came);
- ``tokens_chained``: each token's ``aud`` names the next token's ``sub``, and the caller's
  ``aud`` names this hop;
- ``tokens_expired``: none has expired;
- ``prev_token_signed``: the caller's token verifies with the caller's TLS certificate and its
  ``sub`` is the caller's SPIFFE ID (a token stolen from another identity, or one signed by
  another key, is refused);
- ``next_token_signed`` (client side of a hop): the next hop's token in the path it answers
  verifies with the certificate the next hop proved, and its ``sub`` is that hop.

Connection and role policies: ``connection_owner`` (only the identity that made a connection
refreshes or closes it), ``monitor_owner`` (a watcher sees only the connections it is on;
``--observers`` see everything), ``remote_from_forwarders`` (only forwarders request REMOTE
mechanisms from a manager), ``forwarder_callers`` (a forwarder serves only its node's manager),
``endpoint_callers`` (an endpoint serves only forwarders).

In ``--insecure`` mode there are no identities and no tokens: every policy is skipped (the
roles log it once at start).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Self

from cryptography import x509

from nsm.config import flag
from nsm.errors import InvalidArgument, PermissionDenied
from nsm.log import get_logger
from nsm.security.ids import SpiffeId, parse_id
from nsm.security.tokens import Claims, claims_of, verify

log = get_logger("nsm.policy")

TOKENS_VALID = "tokens_valid"
TOKENS_CHAINED = "tokens_chained"
TOKENS_EXPIRED = "tokens_expired"
PREV_TOKEN_SIGNED = "prev_token_signed"
NEXT_TOKEN_SIGNED = "next_token_signed"
CONNECTION_OWNER = "connection_owner"
MONITOR_OWNER = "monitor_owner"
REMOTE_FROM_FORWARDERS = "remote_from_forwarders"
FORWARDER_CALLERS = "forwarder_callers"
ENDPOINT_CALLERS = "endpoint_callers"


@dataclass(frozen=True)
class Switches:
    """Named rules, each a ``bool`` field of a subclass, on unless switched off."""

    #: What one rule is called in an error.
    KIND: ClassVar[str] = "policy"

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.type in ("bool", bool)]

    def off(self) -> list[str]:
        """The names of the rules switched off."""
        return [name for name in self.names() if not getattr(self, name)]

    @classmethod
    def without(cls, names: Iterable[str]) -> Self:
        """Every rule on except ``names`` (InvalidArgument for an unknown one)."""
        off = set(names)
        unknown = off - set(cls.names())
        if unknown:
            raise InvalidArgument(f"unknown {cls.KIND} {', '.join(sorted(unknown))} "
                                  f"(known: {', '.join(cls.names())})")
        return dataclasses.replace(cls(), **{name: False for name in off})


@dataclass(frozen=True)
class Policies(Switches):
    """Which policies apply (all by default) and who may monitor every connection."""

    tokens_valid: bool = True
    tokens_chained: bool = True
    tokens_expired: bool = True
    prev_token_signed: bool = True
    next_token_signed: bool = True
    connection_owner: bool = True
    monitor_owner: bool = True
    remote_from_forwarders: bool = True
    forwarder_callers: bool = True
    endpoint_callers: bool = True
    #: SPIFFE IDs that may monitor every connection (an operator's tool, a test harness).
    observers: frozenset[str] = frozenset()


POLICY_NAMES = tuple(Policies.names())


def add_policy_flags(parser: argparse.ArgumentParser) -> None:
    """``--policy-<name>``/``--no-policy-<name>`` for each policy, and ``--observers``."""
    for name in POLICY_NAMES:
        flag(parser, f"--policy-{name.replace('_', '-')}", switch=True, default=True,
             help=f"authorization policy {name} (see nsm.security.policy)")
    flag(parser, "--observers", many=True, default=[], type=_observer,
         help="SPIFFE IDs that may monitor every connection")


def _observer(text: str) -> str:
    try:
        return str(parse_id(text.strip()))
    except Exception as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def policies_from_args(args: argparse.Namespace) -> Policies:
    values = {name: bool(getattr(args, f"policy_{name}")) for name in POLICY_NAMES}
    return Policies(**values, observers=frozenset(getattr(args, "observers", None) or ()))


def deny(policy: str, why: str, **fields: str) -> PermissionDenied:
    """The refusal of ``policy``, logged."""
    log.warning("denied", policy=policy, reason=why, **fields)
    return PermissionDenied(f"{policy}: {why}", reason=policy.upper())


def check_tokens(policies: Policies, tokens: Sequence[str], *, own_id: str, peer: SpiffeId,
                 peer_cert: x509.Certificate | None, now: float | None = None) -> list[Claims | None]:
    """Apply the server's token policies to the tokens on the path up to this hop, the
    caller's last; their claims (None for one that does not decode, when ``tokens_valid`` is
    off). PermissionDenied naming the policy when one refuses."""
    when = time.time() if now is None else now
    caller = str(peer)
    claims: list[Claims | None] = []
    for i, token in enumerate(tokens):
        try:
            claims.append(claims_of(token))
        except PermissionDenied as exc:
            if policies.tokens_valid:
                which = "the caller's token" if i == len(tokens) - 1 else f"path segment {i}"
                raise deny(TOKENS_VALID, f"{which}: {exc.message}", peer=caller) from exc
            claims.append(None)
    if not tokens or not tokens[-1]:
        if policies.tokens_valid or policies.prev_token_signed:
            raise deny(TOKENS_VALID, "the caller sent no token", peer=caller)
        return claims
    if policies.tokens_valid or policies.prev_token_signed:
        if peer_cert is None:
            raise deny(PREV_TOKEN_SIGNED, "the caller's certificate is unknown", peer=caller)
        try:
            signed = verify(tokens[-1], peer_cert)
        except PermissionDenied as exc:
            policy = PREV_TOKEN_SIGNED if policies.prev_token_signed else TOKENS_VALID
            raise deny(policy, f"the caller's token: {exc.message}", peer=caller) from exc
        if policies.prev_token_signed and signed.sub != caller:
            raise deny(PREV_TOKEN_SIGNED, f"the caller's token is of {signed.sub[:200]}, not of the "
                       "caller", peer=caller)
    if policies.tokens_chained:
        for i in range(len(claims)):
            this = claims[i]
            target = own_id if i == len(claims) - 1 else (claims[i + 1].sub if claims[i + 1] else None)
            if this is not None and target is not None and target not in this.aud:
                whom = "this hop" if i == len(claims) - 1 else f"the signer of segment {i + 1}"
                raise deny(TOKENS_CHAINED, f"the token of path segment {i} ({this.sub[:200]}) is not "
                           f"for {whom} ({target[:200]})", peer=caller)
    if policies.tokens_expired:
        for i, c in enumerate(claims):
            if c is not None and c.expired(when):
                raise deny(TOKENS_EXPIRED, f"the token of path segment {i} ({c.sub[:200]}) expired "
                           f"{when - c.exp:.0f} s ago", peer=caller)
    return claims


def check_next_token(policies: Policies, token: str, *, next_id: SpiffeId,
                     next_cert: x509.Certificate, quiet: bool = False) -> None:
    """``next_token_signed``: the next hop's token (in the path it answered) verifies with the
    certificate it proved and is of it (``quiet``: a bad signature is not logged: the caller
    asks the next hop to prove itself again first)."""
    if not policies.next_token_signed:
        return
    try:
        claims = verify(token, next_cert)
    except PermissionDenied as exc:
        if quiet:
            raise
        raise deny(NEXT_TOKEN_SIGNED, f"the next hop's token: {exc.message}",
                   next_hop=str(next_id)) from exc
    if claims.sub != str(next_id):
        raise deny(NEXT_TOKEN_SIGNED, f"the next hop's token is of {claims.sub[:200]}, not of "
                   f"{next_id}", next_hop=str(next_id))

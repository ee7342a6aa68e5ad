"""Path tokens: each hop signs a token for its own path segment (an ES256 JWT made with its
SVID key), as the reference does (``sdk:pkg/networkservice/common/updatetoken``).

Claims: ``sub`` = the signer's SPIFFE ID, ``aud`` = [the next hop's SPIFFE ID, as the next hop
proved it], ``exp`` (to the millisecond: a NumericDate may be fractional) = the segment's
expiry, never later than the signer's SVID,
``iat``. The token also travels as gRPC metadata (:data:`TOKEN_HEADER`, and its expiry in RFC
3339 as :data:`EXPIRES_HEADER`); the receiving hop copies it into the caller's segment, whose
expiry is then the token's (the timeout element closes the connection at it).

Checks: :func:`verify` (the signature with a given certificate's key, and the structure) and
:func:`claims_of` (the structure only, for policies that need no key, e.g. segments signed by
hops the verifier has no certificate of). Neither checks expiry: that is a policy of its own.

Minting and verifying are done here with ``cryptography`` directly (the JWS compact form of RFC
7515 with ES256, RFC 7518 §3.4: the signature is R || S, 32 bytes each, over
``base64url(header) "." base64url(payload)``), not by PyJWT, which costs about three times as
much for the same work on every hop of every Request; PyJWT reads the tokens we make the same
way (the tests check both directions).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from nsm.errors import InvalidArgument, PermissionDenied
from nsm.security.svid import Svid

#: gRPC metadata carrying the caller's token, and its expiry (RFC 3339), as in the reference.
TOKEN_HEADER = "nsm-client-token"
EXPIRES_HEADER = "nsm-client-token-expires"
ALGORITHM = "ES256"
#: Longest token accepted at all (a JWT of a few SPIFFE IDs is ~600 bytes).
MAX_TOKEN = 8 * 1024
#: Seconds of clock difference tolerated on ``iat``.
LEEWAY = 5
#: The protected header of every token we mint (as PyJWT writes it).
_HEADER = {"alg": ALGORITHM, "typ": "JWT"}
#: Bytes of R and of S in an ES256 signature (P-256).
_HALF = 32
#: Header parameters that would change how the token is read (RFC 7515 §4.1.11, RFC 7797):
#: refused, as PyJWT refuses them without a detached payload.
_REFUSED_HEADERS = ("crit", "b64")


@dataclass(frozen=True)
class Claims:
    """The claims of a path token that the policies use."""

    sub: str
    aud: tuple[str, ...]
    exp: float
    iat: float | None = None

    def expired(self, at: float | None = None) -> bool:
        return self.exp <= (time.time() if at is None else at)


@dataclass(frozen=True)
class Token:
    """A token just minted: its text and claims."""

    text: str
    claims: Claims

    @property
    def expires(self) -> float:
        return self.claims.exp

    def metadata(self) -> tuple[tuple[str, str], tuple[str, str]]:
        """The gRPC metadata that carries it."""
        return ((TOKEN_HEADER, self.text), (EXPIRES_HEADER, rfc3339(self.claims.exp)))


def rfc3339(seconds: float) -> str:
    """``2026-12-01T14:00:00.250Z`` (to the millisecond)."""
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def mint(svid: Svid, audience: str | Sequence[str], *, expires: float,
         now: float | None = None) -> Token:
    """A token of ``svid``'s identity for ``audience``, expiring at ``expires`` (seconds since
    the epoch) or at the SVID's expiry, whichever is first (to the millisecond: rounding to
    whole seconds took up to a second off every segment's life, and refreshes came early)."""
    aud = (audience,) if isinstance(audience, str) else tuple(audience)
    if not aud:
        raise InvalidArgument("a path token needs an audience")
    issued = int(time.time() if now is None else now)
    exp = math.floor(min(expires, svid.expires.timestamp()) * 1000) / 1000
    claims = Claims(sub=svid.id, aud=aud, exp=exp, iat=issued)
    signing_input = (_b64(_json(_HEADER)) + "." + _b64(_json(
        {"sub": claims.sub, "aud": list(aud), "exp": exp, "iat": issued}))).encode()
    r, s = decode_dss_signature(svid.key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
    signature = r.to_bytes(_HALF, "big") + s.to_bytes(_HALF, "big")
    return Token(signing_input.decode() + "." + _b64(signature), claims)


def _json(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(payload: dict[str, Any]) -> Claims:
    sub, aud, exp, iat = payload.get("sub"), payload.get("aud"), payload.get("exp"), payload.get("iat")
    if isinstance(aud, str):
        aud = [aud]
    if not isinstance(sub, str) or not sub:
        raise PermissionDenied("the token has no subject")
    if not isinstance(aud, list) or not aud or not all(isinstance(a, str) for a in aud):
        raise PermissionDenied("the token has no audience")
    if not isinstance(exp, int | float) or isinstance(exp, bool) or not math.isfinite(exp):
        raise PermissionDenied("the token has no expiry (a NumericDate)")
    if iat is not None and (not isinstance(iat, int | float) or isinstance(iat, bool)
                            or not math.isfinite(iat)):
        raise PermissionDenied("the token's issue time is not a NumericDate")
    return Claims(sub=sub, aud=tuple(aud), exp=exp, iat=iat)


#: The claims :func:`verify` requires of a payload.
_REQUIRED = ("sub", "aud", "exp")


def _check_size(token: str) -> None:
    if not token:
        raise PermissionDenied("no token")
    if len(token) > MAX_TOKEN:
        raise PermissionDenied(f"the token is longer than {MAX_TOKEN} bytes")


def _b64json(part: str, what: str) -> Any:
    try:
        return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    except (ValueError, UnicodeDecodeError) as exc:
        raise PermissionDenied(f"the token's {what} does not decode") from exc


def _parts(token: str) -> tuple[list[str], dict[str, Any]]:
    """The three parts of a well-formed ES256 token and its payload (not yet its claims)."""
    _check_size(token)
    parts = token.split(".")
    if len(parts) != 3 or not all(parts):
        raise PermissionDenied("the token is not a signed JWT (three parts)")
    header = _b64json(parts[0], "header")
    payload = _b64json(parts[1], "payload")
    if not isinstance(header, dict) or header.get("alg") != ALGORITHM:
        alg = header.get("alg") if isinstance(header, dict) else None
        raise PermissionDenied(f"the token is not {ALGORITHM} but {str(alg)[:20]}")
    if any(h in header for h in _REFUSED_HEADERS):
        raise PermissionDenied(f"the token's header has {sorted(h for h in _REFUSED_HEADERS if h in header)}")
    if not isinstance(payload, dict):
        raise PermissionDenied("the token's payload is not a JSON object")
    return parts, payload


def claims_of(token: str) -> Claims:
    """The claims of ``token`` without checking its signature (a token whose signer's key is not
    at hand): PermissionDenied when it is not a well-formed ES256 path token."""
    return _claims(_parts(token)[1])


def verify(token: str, signer: x509.Certificate | ec.EllipticCurvePublicKey) -> Claims:
    """The claims of ``token`` after checking it is signed with the key of ``signer`` (a
    certificate or its public key, P-256); PermissionDenied when not (expiry is not checked)."""
    key = signer.public_key() if isinstance(signer, x509.Certificate) else signer
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise PermissionDenied("the signer's key is not an EC key: it cannot sign ES256 tokens")
    if not isinstance(key.curve, ec.SECP256R1):
        raise PermissionDenied(f"the signer's key is on {key.curve.name}, not P-256: it cannot sign "
                               f"{ALGORITHM} tokens")
    parts, payload = _parts(token)
    for claim in _REQUIRED:
        if claim not in payload:
            raise PermissionDenied(f"the token does not decode: it has no {claim!r} claim")
    try:
        raw = base64.b64decode(parts[2] + "=" * (-len(parts[2]) % 4), altchars=b"-_", validate=True)
    except ValueError as exc:
        raise PermissionDenied("the token's signature does not decode") from exc
    if len(raw) != 2 * _HALF:
        raise PermissionDenied("the token's signature does not verify with the signer's key")
    der = encode_dss_signature(int.from_bytes(raw[:_HALF], "big"), int.from_bytes(raw[_HALF:], "big"))
    try:
        key.verify(der, f"{parts[0]}.{parts[1]}".encode(), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as exc:
        raise PermissionDenied("the token's signature does not verify with the signer's key") from exc
    return _claims(payload)

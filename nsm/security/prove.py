"""Who serves at a URL: a server proves its SPIFFE ID to a client that asks.

grpcio gives a client no access to the server's certificate, so a client cannot read the
server's SPIFFE ID off the TLS session. Every secure server therefore also serves
``nsm.security.Identity/Prove``: the client sends a fresh random nonce, the server answers with
its SVID chain and an ES256 signature of the nonce made with its SVID key; the client checks the
chain against its own trust bundle and the signature. The server thus proves it holds the key
of that SVID (the TLS handshake, on the same connection, already proved it holds a key of the
trust domain). Used for token audiences, a registrant's URL, and the next hop's token checks.

**Without the round trip**, when the client knows whom to expect (``nsm nsc --manager-id``:
:meth:`nsm.transport.Channels.expect`): its channel asks for the expected identity's own DNS
name (:func:`~nsm.security.ids.identity_name`, in every SVID of the built-in CA), so the
handshake proves the server holds the key of a certificate of the trust domain issued for that
identity, and the client signs its token for it at once. It sends :data:`WANT_HEADER` with its
Request; the server answers with its SVID chain in the initial metadata (:data:`CHAIN_HEADER`,
:func:`chain_metadata`), which the client checks like a proof's (:func:`chain_from`: chain to
the bundle, the expected identity) before it verifies the server's token with it. A server
whose certificate lacks the name fails the handshake (:func:`name_refused`): the client then
falls back to ``Prove``.
"""

from __future__ import annotations

import base64
import json
import secrets
from typing import Any

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf.wrappers_pb2 import BytesValue

from nsm.errors import InvalidArgument, Unauthenticated, from_rpc_error
from nsm.security.ids import SpiffeId
from nsm.security.svid import verify_chain

SERVICE = "nsm.security.Identity"
METHOD = f"/{SERVICE}/Prove"
#: What is signed: this context string, then the nonce.
CONTEXT = b"nsm-identity-proof\x00"
NONCE_SIZE = 32
#: Timeout of one Prove call.
PROVE_TIMEOUT = 5.0
#: Largest answer accepted (a chain of a few certificates).
MAX_ANSWER = 16 * 1024
#: Request metadata: send your SVID chain with the answer (the client expects your identity).
WANT_HEADER = "nsm-want-svid"
#: Initial metadata of such an answer: the server's SVID chain, one DER certificate a value.
CHAIN_HEADER = "nsm-svid-bin"
#: What grpc core says when the server's certificate lacks the DNS name the channel asked for.
_NAME_REFUSED = ("Hostname Verification Check failed", "is not in peer certificate")


def _sign(security: Any, nonce: bytes) -> bytes:
    svid = security.svid
    signature = svid.key.sign(CONTEXT + nonce, ec.ECDSA(hashes.SHA256()))
    return json.dumps({
        "chain": [base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode() for c in svid.chain],
        "sig": base64.b64encode(signature).decode(),
    }).encode()


def handler(security: Any) -> grpc.GenericRpcHandler:
    """The ``Prove`` method of a secure server."""

    async def prove(request: BytesValue, context: grpc.aio.ServicerContext) -> BytesValue:
        if len(request.value) != NONCE_SIZE:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"a nonce is {NONCE_SIZE} bytes")
        return BytesValue(value=_sign(security, request.value))

    method = grpc.unary_unary_rpc_method_handler(
        prove, request_deserializer=BytesValue.FromString, response_serializer=BytesValue.SerializeToString)
    return grpc.method_handlers_generic_handler(SERVICE, {"Prove": method})


def check_answer(answer: bytes, nonce: bytes, bundle: tuple[x509.Certificate, ...],
                 trust_domain: str) -> tuple[SpiffeId, x509.Certificate]:
    """The SPIFFE ID and leaf certificate proven by ``answer`` to ``nonce``; Unauthenticated
    when the chain is not of the trust domain or the signature does not verify."""
    if len(answer) > MAX_ANSWER:
        raise Unauthenticated("identity proof too large")
    try:
        doc = json.loads(answer)
        chain = tuple(x509.load_der_x509_certificate(base64.b64decode(c)) for c in doc["chain"])
        signature = base64.b64decode(doc["sig"])
    except (ValueError, KeyError, TypeError) as exc:
        raise Unauthenticated(f"malformed identity proof: {exc}") from exc
    sid = verify_chain(chain, bundle, trust_domain)
    key = chain[0].public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise Unauthenticated(f"{sid}: SVID key is not EC")
    try:
        key.verify(signature, CONTEXT + nonce, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as exc:
        raise Unauthenticated(f"{sid} did not prove its identity (bad signature)") from exc
    return sid, chain[0]


async def prove(channel: grpc.aio.Channel, security: Any, *,
                timeout: float = PROVE_TIMEOUT) -> tuple[SpiffeId, x509.Certificate]:
    """Ask the server on ``channel`` who it is; its proven SPIFFE ID and leaf certificate."""
    if not security.enabled:
        raise InvalidArgument("an insecure channel has no identity to prove")
    nonce = secrets.token_bytes(NONCE_SIZE)
    call = channel.unary_unary(METHOD, request_serializer=BytesValue.SerializeToString,
                               response_deserializer=BytesValue.FromString)
    try:
        answer = await call(BytesValue(value=nonce), timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc, "identity proof") from exc
    svid = security.svid
    return check_answer(answer.value, nonce, svid.bundle, security.trust_domain)


def chain_metadata(security: Any) -> tuple[tuple[str, bytes], ...]:
    """The initial metadata that carries this server's SVID chain (:data:`CHAIN_HEADER`)."""
    return tuple((CHAIN_HEADER, c.public_bytes(serialization.Encoding.DER)) for c in security.svid.chain)


def chain_from(metadata: Any, security: Any, expected: SpiffeId) -> x509.Certificate | None:
    """The leaf certificate of the SVID chain a server sent in ``metadata`` (an answer's
    initial metadata), checked against this process's trust bundle and ``expected``; None when
    it sent none; Unauthenticated when it is malformed, too large, not of the trust domain or
    of another identity."""
    values = [v for k, v in (metadata or ()) if k == CHAIN_HEADER]
    if not values:
        return None
    if sum(len(v) for v in values) > MAX_ANSWER or not all(isinstance(v, bytes) for v in values):
        raise Unauthenticated("the server's certificate chain is malformed or too large")
    try:
        chain = tuple(x509.load_der_x509_certificate(v) for v in values)
    except ValueError as exc:
        raise Unauthenticated(f"malformed server certificate chain: {exc}") from exc
    svid = security.svid
    sid = verify_chain(chain, svid.bundle, security.trust_domain)
    if sid != expected:
        raise Unauthenticated(f"the server's certificate is of {sid}, not of {expected}")
    return chain[0]


def name_refused(message: str) -> bool:
    """Whether a failed connection's message says the server's certificate lacks the DNS name
    the channel asked for (see :func:`~nsm.security.ids.identity_name`)."""
    return any(marker in message for marker in _NAME_REFUSED)

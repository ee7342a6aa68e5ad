"""Who serves at a URL: a server proves its SPIFFE ID to a client that asks.

grpcio gives a client no access to the server's certificate, so a client cannot read the
server's SPIFFE ID off the TLS session. Every secure server therefore also serves
``nsm.security.Identity/Prove``: the client sends a fresh random nonce, the server answers with
its SVID chain and an ES256 signature of the nonce made with its SVID key; the client checks the
chain against its own trust bundle and the signature. The server thus proves it holds the key
of that SVID (the TLS handshake, on the same connection, already proved it holds a key of the
trust domain). Used for token audiences, a registrant's URL, and the next hop's token checks.
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

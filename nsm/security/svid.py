"""X.509-SVIDs: a process's certificate chain, key and trust bundle, and their checks."""

from __future__ import annotations

import datetime as dt
import itertools
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from nsm.errors import InvalidArgument, Unauthenticated
from nsm.security.ids import SpiffeId, parse_id


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def spiffe_id_of(cert: x509.Certificate) -> SpiffeId:
    """The one SPIFFE ID (URI SAN) of an SVID; Unauthenticated when it has none or several."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound as exc:
        raise Unauthenticated("certificate has no SPIFFE ID (no subject alternative name)") from exc
    uris = [u for u in san.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith("spiffe://")]
    if len(uris) != 1:
        raise Unauthenticated(f"certificate has {len(uris)} SPIFFE IDs, an SVID has exactly one")
    try:
        return parse_id(uris[0])
    except InvalidArgument as exc:
        raise Unauthenticated(f"certificate's SPIFFE ID is malformed: {exc.message}") from exc


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    key = issuer.public_key()
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            assert cert.signature_hash_algorithm is not None
            key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
        elif isinstance(key, rsa.RSAPublicKey):
            assert cert.signature_hash_algorithm is not None
            key.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(),
                       cert.signature_hash_algorithm)
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes)
        else:
            return False
    except InvalidSignature:
        return False
    return True


def verify_chain(chain: list[x509.Certificate] | tuple[x509.Certificate, ...],
                 bundle: list[x509.Certificate] | tuple[x509.Certificate, ...],
                 trust_domain: str, *, at: dt.datetime | None = None) -> SpiffeId:
    """Check that ``chain`` (leaf first) is a valid X.509-SVID of ``trust_domain`` issued under
    one of ``bundle``'s authorities, valid at ``at``; its SPIFFE ID. Unauthenticated if not."""
    if not chain:
        raise Unauthenticated("no certificate")
    when = at or now()
    leaf = chain[0]
    sid = spiffe_id_of(leaf)
    if sid.trust_domain != trust_domain:
        raise Unauthenticated(f"{sid} is not of trust domain {trust_domain}")
    for cert in chain:
        if not cert.not_valid_before_utc <= when <= cert.not_valid_after_utc:
            raise Unauthenticated(f"certificate of {spiffe_id_of(leaf)} is not valid now "
                                  f"(valid {cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ} to "
                                  f"{cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ})")
    for child, parent in itertools.pairwise(chain):
        if not _signed_by(child, parent):
            raise Unauthenticated(f"certificate chain of {sid} is broken")
    top = chain[-1]
    if not any(top == anchor or _signed_by(top, anchor) for anchor in bundle):
        raise Unauthenticated(f"certificate of {sid} is not issued by trust domain {trust_domain}'s "
                              "authority")
    return sid


def load_pem_chain(data: bytes, what: str) -> tuple[x509.Certificate, ...]:
    try:
        certs = tuple(x509.load_pem_x509_certificates(data))
    except ValueError as exc:
        raise InvalidArgument(f"{what} is not PEM certificates: {exc}") from exc
    if not certs:
        raise InvalidArgument(f"{what} holds no certificate")
    return certs


def load_pem_key(data: bytes, what: str) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise InvalidArgument(f"{what} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise InvalidArgument(f"{what}: an SVID key must be EC P-256 (tokens are ES256)")
    return key


@dataclass(frozen=True)
class Svid:
    """One X.509-SVID: the certificate chain (leaf first), its private key and the trust bundle
    (the trust domain's authorities) it is checked against, with PEM forms for grpcio."""

    chain: tuple[x509.Certificate, ...]
    key: ec.EllipticCurvePrivateKey
    bundle: tuple[x509.Certificate, ...]
    spiffe_id: SpiffeId = field(init=False)
    chain_pem: bytes = field(init=False, repr=False)
    key_pem: bytes = field(init=False, repr=False)
    bundle_pem: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.chain or not self.bundle:
            raise InvalidArgument("an SVID needs a certificate and a trust bundle")
        sid = spiffe_id_of(self.chain[0])
        pub = self.chain[0].public_key()
        if not isinstance(pub, ec.EllipticCurvePublicKey) or pub.public_numbers() != \
                self.key.public_key().public_numbers():
            raise InvalidArgument(f"the key does not belong to the certificate of {sid}")
        object.__setattr__(self, "spiffe_id", sid)
        object.__setattr__(self, "chain_pem", b"".join(
            c.public_bytes(serialization.Encoding.PEM) for c in self.chain))
        object.__setattr__(self, "key_pem", self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        object.__setattr__(self, "bundle_pem", b"".join(
            c.public_bytes(serialization.Encoding.PEM) for c in self.bundle))

    @property
    def id(self) -> str:
        return str(self.spiffe_id)

    @property
    def trust_domain(self) -> str:
        return self.spiffe_id.trust_domain

    @property
    def expires(self) -> dt.datetime:
        return min(c.not_valid_after_utc for c in self.chain)

    @classmethod
    def from_pem(cls, chain: bytes, key: bytes, bundle: bytes) -> Svid:
        return cls(load_pem_chain(chain, "SVID certificate"), load_pem_key(key, "SVID key"),
                   load_pem_chain(bundle, "trust bundle"))

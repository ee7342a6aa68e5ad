"""The built-in certificate authority: short-lived X.509-SVIDs with no setup.

For the lab, the demo, the tests and a single machine, a CA directory (``ca.pem`` and
``ca.key``, mode 0700) is created on first use; every process given that directory issues its
own SVID from it (EC P-256, URI SAN = its SPIFFE ID, DNS SANs = the TLS server name and the
ID's own name under it, default TTL 1 h, renewed at half its life). Whoever can read the
directory can mint any identity of the trust domain: it is for one machine's root processes;
production uses SPIRE or PEM files (:mod:`nsm.security.sources`).
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from nsm.errors import FailedPrecondition, InvalidArgument
from nsm.security.ids import check_trust_domain, identity_name, parse_id
from nsm.security.svid import Svid, load_pem_chain, load_pem_key, now

#: Lifetime of an SVID the built-in CA issues unless configured.
DEFAULT_SVID_TTL = 3600.0
#: Lifetime of the built-in CA's own certificate.
CA_TTL = dt.timedelta(days=365)
CA_CERT = "ca.pem"
CA_KEY = "ca.key"
#: Backdating of every certificate, for clocks a little apart.
SKEW = dt.timedelta(seconds=60)


def _name(text: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIFFE"),
                      x509.NameAttribute(NameOID.COMMON_NAME, text[:64])])


class CertificateAuthority:
    """A trust domain's authority: its key and self-signed certificate, and SVIDs issued under it."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate, trust_domain: str) -> None:
        self.key = key
        self.cert = cert
        self.trust_domain = check_trust_domain(trust_domain)

    @classmethod
    def create(cls, trust_domain: str) -> CertificateAuthority:
        """A new authority held in memory only."""
        check_trust_domain(trust_domain)
        key = ec.generate_private_key(ec.SECP256R1())
        start = now() - SKEW
        name = _name(f"nsm {trust_domain} CA")
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(start).not_valid_after(start + CA_TTL)
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False,
                                             key_agreement=False, key_cert_sign=True, crl_sign=True,
                                             encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]), critical=False)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))
        return cls(key, cert, trust_domain)

    @classmethod
    def open(cls, directory: str | Path, trust_domain: str, *, create: bool = True) -> CertificateAuthority:
        """The authority kept in ``directory``, created there (mode 0700) when absent (unless
        not ``create``: FailedPrecondition then). Two processes creating it at once agree on
        one (the files are linked into place)."""
        path = Path(directory)
        cert_path, key_path = path / CA_CERT, path / CA_KEY
        if not cert_path.exists() and not create:
            raise FailedPrecondition(f"no built-in CA in {path} (make one with `nsm ca-init`, or give "
                                     "--svid-dir, --spiffe-socket or --insecure)")
        if not cert_path.exists():
            try:
                path.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as exc:
                raise FailedPrecondition(f"cannot create CA directory {path}: {exc.strerror}") from exc
            ca = cls.create(trust_domain)
            tag = secrets.token_hex(4)
            tmp_key, tmp_cert = path / f".{CA_KEY}.{tag}", path / f".{CA_CERT}.{tag}"
            fd = os.open(tmp_key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(ca.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
            tmp_cert.write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
            try:
                os.link(tmp_key, key_path)
                os.link(tmp_cert, cert_path)  # the certificate last: its presence means complete
            except FileExistsError:
                pass  # another process won the race: use its files
            finally:
                tmp_key.unlink(missing_ok=True)
                tmp_cert.unlink(missing_ok=True)
        try:
            cert = load_pem_chain(cert_path.read_bytes(), f"{cert_path}")[0]
            key = load_pem_key(key_path.read_bytes(), f"{key_path}")
        except OSError as exc:
            raise FailedPrecondition(f"cannot read the CA in {path}: {exc.strerror}") from exc
        ca = cls(key, cert, trust_domain)
        held = ca.trust_domain_of_cert()
        if held != trust_domain:
            raise InvalidArgument(f"the CA in {path} is for trust domain {held}, not {trust_domain}")
        return ca

    def trust_domain_of_cert(self) -> str:
        san = self.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
            if uri.startswith("spiffe://"):
                return uri[len("spiffe://"):].split("/")[0]
        return ""

    def issue(self, spiffe_id: str, *, ttl: float = DEFAULT_SVID_TTL, dns_names: tuple[str, ...] = (),
              not_before: dt.datetime | None = None) -> Svid:
        """A new key and an SVID for ``spiffe_id`` valid ``ttl`` seconds (capped by the CA's own
        validity); ``dns_names`` go into the SAN too (grpcio checks the server's DNS name), each
        also as the ID's own name under it (:func:`~nsm.security.ids.identity_name`)."""
        sid = parse_id(spiffe_id)
        if sid.trust_domain != self.trust_domain:
            raise InvalidArgument(f"{spiffe_id} is not of trust domain {self.trust_domain}")
        if not ttl > 0:
            raise InvalidArgument(f"SVID lifetime must be positive, not {ttl}")
        key = ec.generate_private_key(ec.SECP256R1())
        start = (not_before or now()) - SKEW
        end = min(start + SKEW + dt.timedelta(seconds=ttl), self.cert.not_valid_after_utc)
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(sid))]
        for d in dns_names:
            sans.append(x509.DNSName(d))
            own = identity_name(sid, d)
            if own is not None:
                sans.append(x509.DNSName(own))
        cert = (x509.CertificateBuilder().subject_name(_name(str(sid)))
                .issuer_name(self.cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(start).not_valid_after(end)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                             key_encipherment=True, data_encipherment=False,
                                             key_agreement=True, key_cert_sign=False, crl_sign=False,
                                             encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                               critical=False)
                .sign(self.key, hashes.SHA256()))
        return Svid((cert,), key, (self.cert,))

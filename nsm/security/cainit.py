"""``nsm ca-init``: make (or check) a built-in CA directory to share between machines.

    nsm ca-init --dir ./nsm-ca --trust-domain k8s.nsm
    kubectl -n nsm-system create secret generic nsm-ca --from-file=./nsm-ca/ca.pem --from-file=./nsm-ca/ca.key

Every daemon without a SPIFFE socket or SVID files issues itself an SVID from the CA in
``--ca-dir``, creating one when there is none: on one machine they all share it. Across
machines (a cluster's pods) each would make its own and none would trust another; this command
makes the CA once, to be given to every process (in Kubernetes: the Secret ``nsm-ca``, mounted
read-only, ``NSM_CA_DIR`` pointing at it). A directory that already holds a CA of the trust
domain is kept as it is. Whoever can read ``ca.key`` can mint any identity of the trust domain:
a development default; production uses SPIRE.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from cryptography.hazmat.primitives import hashes

from nsm.config import EXIT_FAILED, EXIT_USAGE, fail, flag
from nsm.errors import InvalidArgument, NsmError
from nsm.security.ca import CA_CERT, CA_KEY, CertificateAuthority
from nsm.security.ids import DEFAULT_TRUST_DOMAIN, check_trust_domain

PROG = "nsm ca-init"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    flag(parser, "--dir", required=True,
         help=f"directory to hold the CA ({CA_CERT}, {CA_KEY}; created mode 0700)")
    flag(parser, "--trust-domain", default=DEFAULT_TRUST_DOMAIN, help="SPIFFE trust domain of the CA")


async def run(args: argparse.Namespace) -> int:
    return await asyncio.to_thread(init, Path(args.dir), args.trust_domain)


def init(path: Path, trust_domain: str) -> int:
    """Make (or keep) the CA in ``path``, print what is there; the exit status."""
    try:
        trust_domain = check_trust_domain(trust_domain)
    except InvalidArgument as exc:
        return fail(PROG, exc.message, EXIT_USAGE)
    if path.exists() and not path.is_dir():
        return fail(PROG, f"--dir {path} is not a directory", EXIT_USAGE)
    existed = (path / CA_CERT).exists()
    try:
        ca = CertificateAuthority.open(path, trust_domain)
    except NsmError as exc:
        return fail(PROG, exc.message, EXIT_USAGE if isinstance(exc, InvalidArgument) else EXIT_FAILED)
    fingerprint = ca.cert.fingerprint(hashes.SHA256()).hex(":")
    print(f"{'kept the existing' if existed else 'created a'} CA for trust domain {trust_domain} in {path}")
    print(f"  {path / CA_CERT}: certificate (the trust bundle), valid until "
          f"{ca.cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}, sha256 {fingerprint}")
    print(f"  {path / CA_KEY}: private key (whoever reads it can mint any identity of {trust_domain})")
    print(f"Kubernetes: kubectl -n nsm-system create secret generic nsm-ca "
          f"--from-file={path / CA_CERT} --from-file={path / CA_KEY}", flush=True)
    return 0

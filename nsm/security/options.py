"""The security flags every command shares, and the :class:`Security` they make.

Where the SVID comes from, first match wins: ``--insecure`` (none: plaintext, logged loudly);
``--spiffe-socket`` (or ``SPIFFE_ENDPOINT_SOCKET``): the SPIFFE Workload API; ``--svid-dir``:
PEM files; otherwise the built-in CA in ``--ca-dir`` (created when absent), so that a machine
runs secure with no setup.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from nsm.config import duration, flag
from nsm.errors import InvalidArgument
from nsm.security.ca import DEFAULT_SVID_TTL
from nsm.security.ids import DEFAULT_TRUST_DOMAIN, check_trust_domain, parse_id
from nsm.security.sources import CaSource, FilesSource, SvidSource, WorkloadApiSource
from nsm.security.tls import Security

#: Where the built-in CA lives unless configured.
DEFAULT_CA_DIR = "/run/nsm/ca"


def add_security_flags(parser: argparse.ArgumentParser) -> None:
    flag(parser, "--insecure", switch=True, default=False,
         help="plaintext gRPC with no identity, tokens or authorization (never in production)")
    flag(parser, "--trust-domain", default=DEFAULT_TRUST_DOMAIN, help="SPIFFE trust domain")
    flag(parser, "--spiffe-id", default=None,
         help="this process's SPIFFE ID, when the built-in CA issues it (default: by role)")
    flag(parser, "--spiffe-socket", default=os.environ.get("SPIFFE_ENDPOINT_SOCKET"),
         help="SPIFFE Workload API socket (unix:///path; default $SPIFFE_ENDPOINT_SOCKET)")
    flag(parser, "--svid-dir", default=None,
         help="directory of PEM SVID files, reloaded on change (svid.pem/svid_key.pem/"
              "svid_bundle.pem, or tls.crt/tls.key/ca.crt)")
    flag(parser, "--ca-dir", default=DEFAULT_CA_DIR,
         help="the built-in CA's directory (created when absent), used without a socket or files")
    flag(parser, "--svid-ttl", type=duration, default=DEFAULT_SVID_TTL,
         help="lifetime of an SVID the built-in CA issues (renewed at half)")
    flag(parser, "--tls-server-name", default=None,
         help="DNS name every SVID carries and every dial checks (default: the trust domain)")


def security_from_args(args: argparse.Namespace, default_id: str, *, create_ca: bool = True) -> Security:
    """The :class:`Security` of a command's parsed flags; ``default_id`` is the SPIFFE ID the
    built-in CA issues when ``--spiffe-id`` is not given."""
    if args.insecure:
        return Security.insecure()
    trust_domain = check_trust_domain(args.trust_domain)
    server_name = args.tls_server_name or trust_domain
    source: SvidSource
    if args.spiffe_socket:
        source = WorkloadApiSource(args.spiffe_socket, trust_domain=trust_domain)
    elif args.svid_dir:
        source = FilesSource.directory(Path(args.svid_dir), trust_domain=trust_domain)
    else:
        spiffe_id = args.spiffe_id or default_id
        if parse_id(spiffe_id).trust_domain != trust_domain:
            raise InvalidArgument(f"--spiffe-id {spiffe_id} is not of trust domain {trust_domain}")
        source = CaSource(args.ca_dir, spiffe_id, trust_domain=trust_domain, ttl=args.svid_ttl,
                          dns_names=(server_name,), create=create_ca)
    return Security(source, trust_domain=trust_domain, server_name=server_name)


def security_from_environment(default_id: str) -> Security:
    """The :class:`Security` the ``NSM_*`` security variables of this process's environment
    describe (as the flags would), for programs using the SDK without a command line."""
    parser = argparse.ArgumentParser(add_help=False)
    add_security_flags(parser)
    return security_from_args(parser.parse_args([]), default_id)

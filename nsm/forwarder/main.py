"""``nsm forwarder``: programs the kernel for the connections of one node."""

from __future__ import annotations

import argparse

from nsm.config import duration, flag, run_command
from nsm.daemon import add_role_flags, role_runner
from nsm.elements.updatepath import DEFAULT_LIFETIME
from nsm.forwarder.forwarder import Forwarder
from nsm.forwarder.vxlan import DEFAULT_ADOPT_GRACE
from nsm.names import check_name
from nsm.security.ids import FORWARDER, node_id
from nsm.security.options import security_from_args
from nsm.security.policy import policies_from_args
from nsm.security.tls import Security


def add_arguments(parser: argparse.ArgumentParser) -> None:
    flag(parser, "--name", help="forwarder name", required=True)
    flag(parser, "--listen", help="listen URL(s)", many=True, required=True)
    flag(parser, "--manager", help="URL of the manager this forwarder serves", required=True)
    flag(parser, "--registry", help="registry URL to register at", required=True)
    flag(parser, "--node", help="node name (default: the forwarder name)", default=None)
    flag(parser, "--lifetime", help="max lifetime of this hop's path segment", type=duration,
         default=DEFAULT_LIFETIME)
    flag(parser, "--request-timeout", help="timeout of a Request to the next hop", type=duration,
         default=15.0)
    flag(parser, "--expiry", help="registration expiry to ask for", type=duration, default=None)
    flag(parser, "--tunnel-ip", help="this node's VXLAN tunnel address (default: the first "
         "global address of an up interface)", default=None)
    flag(parser, "--adopt-grace", help="after a restart, how long the datapath an earlier run "
         "left is kept for its connections to claim (their next Request adopts it); what none "
         "claims is removed then", type=duration, default=DEFAULT_ADOPT_GRACE)
    add_role_flags(parser)


def build(args: argparse.Namespace) -> tuple[Forwarder, Security]:
    check_name(args.name, "forwarder name (--name)")
    if args.node is not None:
        check_name(args.node, "node name (--node)")
    security = security_from_args(args, node_id(args.trust_domain, args.node or args.name, FORWARDER))
    return Forwarder(name=args.name, listen=args.listen, manager_url=args.manager,
                     registry_url=args.registry, node=args.node or "", lifetime=args.lifetime,
                     request_timeout=args.request_timeout, expiry=args.expiry,
                     tunnel_ip=args.tunnel_ip, adopt_grace=args.adopt_grace, security=security,
                     policies=policies_from_args(args)), security


run = role_runner(build)


def main(argv: list[str] | None = None) -> int:
    return run_command("nsm forwarder", __doc__ or "", add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())

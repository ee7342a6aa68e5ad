"""``nsm forwarder``: programs the kernel for the connections of one node."""

from __future__ import annotations

import argparse

from nsm import log as nsmlog
from nsm.config import duration, flag, run_command
from nsm.daemon import serve_role
from nsm.elements.updatepath import DEFAULT_LIFETIME
from nsm.forwarder.forwarder import Forwarder
from nsm.forwarder.vxlan import DEFAULT_ADOPT_GRACE
from nsm.names import check_name
from nsm.security.ids import FORWARDER, node_id
from nsm.security.options import add_security_flags, security_from_args
from nsm.security.policy import add_policy_flags, policies_from_args


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
    add_security_flags(parser)
    add_policy_flags(parser)
    flag(parser, "--log-level", help="log level", default="info")
    flag(parser, "--log-json", help="log JSON lines", switch=True, default=False)


async def run(args: argparse.Namespace) -> int:
    check_name(args.name, "forwarder name (--name)")
    if args.node is not None:
        check_name(args.node, "node name (--node)")
    nsmlog.setup(args.log_level, args.log_json)
    security = security_from_args(args, node_id(args.trust_domain, args.node or args.name, FORWARDER))
    fwd = Forwarder(name=args.name, listen=args.listen, manager_url=args.manager,
                    registry_url=args.registry, node=args.node or "", lifetime=args.lifetime,
                    request_timeout=args.request_timeout, expiry=args.expiry,
                    tunnel_ip=args.tunnel_ip, adopt_grace=args.adopt_grace, security=security,
                    policies=policies_from_args(args))
    return await serve_role(fwd, security)


def main(argv: list[str] | None = None) -> int:
    return run_command("nsm forwarder", __doc__ or "", add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())

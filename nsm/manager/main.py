"""``nsm manager``: the per-node network service manager."""

from __future__ import annotations

import argparse

from nsm import log as nsmlog
from nsm.config import duration, flag, run_command
from nsm.daemon import serve_role
from nsm.elements.updatepath import DEFAULT_LIFETIME
from nsm.manager.manager import Manager
from nsm.names import check_name
from nsm.security.ids import MANAGER, node_id
from nsm.security.options import add_security_flags, security_from_args
from nsm.security.policy import add_policy_flags, policies_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    flag(parser, "--name", help="manager (node) name", required=True)
    flag(parser, "--listen", help="listen URL(s): unix:///path or tcp://host:port", many=True,
         required=True)
    flag(parser, "--registry", help="registry URL", required=True)
    flag(parser, "--advertise", help="other URL(s) this manager is reached by", many=True,
         default=[])
    flag(parser, "--lifetime", help="max lifetime of this hop's path segment", type=duration,
         default=DEFAULT_LIFETIME)
    flag(parser, "--request-timeout", help="timeout of a Request to the next hop", type=duration,
         default=15.0)
    add_security_flags(parser)
    add_policy_flags(parser)
    flag(parser, "--log-level", help="log level", default="info")
    flag(parser, "--log-json", help="log JSON lines", switch=True, default=False)


async def run(args: argparse.Namespace) -> int:
    check_name(args.name, "manager name (--name)")
    nsmlog.setup(args.log_level, args.log_json)
    security = security_from_args(args, node_id(args.trust_domain, args.name, MANAGER))
    mgr = Manager(name=args.name, listen=args.listen, registry_url=args.registry,
                  advertise=args.advertise, lifetime=args.lifetime,
                  request_timeout=args.request_timeout, security=security,
                  policies=policies_from_args(args))
    return await serve_role(mgr, security)


def main(argv: list[str] | None = None) -> int:
    return run_command("nsm manager", __doc__ or "", add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())

"""``nsm manager``: the per-node network service manager."""

from __future__ import annotations

import argparse

from nsm.config import duration, flag, run_command
from nsm.daemon import add_role_flags, role_runner
from nsm.elements.updatepath import DEFAULT_LIFETIME
from nsm.manager.manager import Manager
from nsm.names import check_name
from nsm.security.ids import MANAGER, node_id
from nsm.security.options import security_from_args
from nsm.security.policy import policies_from_args
from nsm.security.tls import Security


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
    add_role_flags(parser)


def build(args: argparse.Namespace) -> tuple[Manager, Security]:
    check_name(args.name, "manager name (--name)")
    security = security_from_args(args, node_id(args.trust_domain, args.name, MANAGER))
    return Manager(name=args.name, listen=args.listen, registry_url=args.registry,
                   advertise=args.advertise, lifetime=args.lifetime,
                   request_timeout=args.request_timeout, security=security,
                   policies=policies_from_args(args)), security


run = role_runner(build)


def main(argv: list[str] | None = None) -> int:
    return run_command("nsm manager", __doc__ or "", add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())

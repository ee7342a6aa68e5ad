"""``nsm nse``: a network service endpoint daemon.

    nsm nse --name nse-1 --service blue --cidr 172.16.0.0/24 \\
        --listen unix:///run/nsm/nse-1.sock --registry tcp://127.0.0.1:5002 --label app=blue

Every flag also reads ``NSM_<FLAG>`` (``NSM_NAME``, ``NSM_SERVICE``, ``NSM_CIDR``, ...). Bad input
exits 2 with a one-line message; an unreachable registry is retried (with a log line) until it
answers; SIGTERM/SIGINT unregister, stop and exit 0. Runnable as ``python -m nsm.endpoint.main``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from nsm import log as nsm_log
from nsm.config import (
    EXIT_FAILED,
    EXIT_USAGE,
    StopSignals,
    duration,
    fail,
    flag,
    label,
    log_flags,
    run_command,
)
from nsm.daemon import settle_heap, status_on_signal
from nsm.elements.updatepath import DEFAULT_LIFETIME
from nsm.endpoint.endpoint import DEFAULT_EXPIRY, Endpoint
from nsm.errors import InvalidArgument, NotFound, NsmError
from nsm.log import get_logger
from nsm.metrics import add_metrics_flags, serving_metrics
from nsm.names import check_name
from nsm.security.ids import workload_id
from nsm.security.options import add_security_flags, security_from_args
from nsm.security.policy import add_policy_flags, policies_from_args

log = get_logger("nsm.endpoint")

PROG = "nsm nse"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The endpoint's flags (each also settable as ``NSM_<FLAG>``)."""
    flag(parser, "--name", required=True, help="endpoint name (unique in the registry)")
    flag(parser, "--service", many=True, required=True,
         help="network service offered; repeatable")
    flag(parser, "--cidr", required=True,
         help="addresses handed out in point-to-point pairs, e.g. 172.16.0.0/24 or fd00::/64")
    flag(parser, "--netns",
         help="network namespace (path, or name under /var/run/netns) where the forwarder puts "
              "this endpoint's interfaces (default: this process's)")
    flag(parser, "--listen", many=True, required=True,
         help="URL to serve on, unix:///path or tcp://host:port; repeatable")
    flag(parser, "--advertise", help="URL registered for this endpoint (default: first --listen)")
    flag(parser, "--registry", required=True, help="registry URL, e.g. tcp://127.0.0.1:5002")
    flag(parser, "--node", default="",
         help="node this endpoint runs on, registered as its nodeName label (set when it "
              "registers at the registry directly; a manager it registers through adds it)")
    flag(parser, "--label", many=True, type=label, default=[],
         help="endpoint label key=value (for the services' matches); repeatable")
    flag(parser, "--expiry", type=duration, default=DEFAULT_EXPIRY,
         help="registration lifetime, refreshed at a third of it, e.g. 60s")
    flag(parser, "--lifetime", type=duration, default=DEFAULT_LIFETIME,
         help="longest a connection lives without a refresh, e.g. 10m")
    add_security_flags(parser)
    add_policy_flags(parser)
    add_metrics_flags(parser)
    log_flags(parser)


async def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM or SIGINT; returns the exit status."""
    nsm_log.setup(args.log_level, args.log_json)
    try:
        check_name(args.name, "endpoint name")
        security = security_from_args(args, workload_id(args.trust_domain, args.name))
        endpoint = Endpoint(
            name=args.name, services=args.service, cidr=args.cidr, netns=args.netns,
            listen=args.listen, registry_url=args.registry, advertise=args.advertise,
            node=args.node,
            labels=dict(args.label or []), expiry=args.expiry, lifetime=args.lifetime,
            security=security,
            policies=policies_from_args(args))
    except NsmError as exc:
        return fail(PROG, exc.message, EXIT_USAGE)

    status = 0
    async with StopSignals() as stop:
        try:
            with status_on_signal(endpoint.status):
                await stop.first(security.start())
                async with serving_metrics(args, endpoint.metrics, security):
                    await stop.first(endpoint.start())
                    settle_heap()
                    await stop.wait()
            log.info("endpoint stopping", name=endpoint.name)
        except NsmError as exc:
            usage = isinstance(exc, InvalidArgument | NotFound)
            status = fail(PROG, exc.message, EXIT_USAGE if usage else EXIT_FAILED)
        except Exception as exc:
            log.error("endpoint failed", exc_info=True, error=repr(exc))
            status = fail(PROG, f"{type(exc).__name__}: {exc}")
        finally:
            await endpoint.stop()
            await security.close()
    return status


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(PROG, "A network service endpoint.", add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())

"""``nsm nse``: a network service endpoint daemon.

    nsm nse --name nse-1 --service blue --cidr 172.16.0.0/24 \\
        --listen unix:///run/nsm/nse-1.sock --registry tcp://127.0.0.1:5002 --label app=blue

Every flag also reads ``NSM_<FLAG>`` (``NSM_NAME``, ``NSM_SERVICE``, ``NSM_CIDR``, ...). Bad input
exits 2 with a one-line message; an unreachable registry is retried (with a log line) until it
answers; SIGTERM/SIGINT unregister, stop and exit 0. Runnable as ``python -m nsm.endpoint.main``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Sequence

from nsm import log as nsm_log
from nsm.config import duration, flag, label
from nsm.endpoint.endpoint import DEFAULT_EXPIRY, Endpoint
from nsm.errors import InvalidArgument, NotFound, NsmError
from nsm.log import get_logger

log = get_logger("nsm.endpoint")

PROG = "nsm nse"
LOG_LEVELS = ["debug", "info", "warning", "error"]
#: Input errors: exit status 2, like argparse's.
EXIT_USAGE = 2


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
    flag(parser, "--lifetime", type=duration, default=600.0,
         help="longest a connection lives without a refresh, e.g. 10m")
    flag(parser, "--log-level", default="info", choices=LOG_LEVELS, help="log level")
    flag(parser, "--log-json", switch=True, default=False, help="log JSON lines")


def _fail(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)


async def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM or SIGINT; returns the exit status."""
    nsm_log.setup(args.log_level, args.log_json)
    try:
        endpoint = Endpoint(
            name=args.name, services=args.service, cidr=args.cidr, netns=args.netns,
            listen=args.listen, registry_url=args.registry, advertise=args.advertise,
            node=args.node,
            labels=dict(args.label or []), expiry=args.expiry, lifetime=args.lifetime)
    except NsmError as exc:
        _fail(exc.message)
        return EXIT_USAGE

    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stopping.set)
    status = 0
    starting = asyncio.create_task(endpoint.start(), name="nse-start")
    waiting = asyncio.create_task(stopping.wait(), name="nse-signal")
    try:
        await asyncio.wait({starting, waiting}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            starting.result()  # raises what start raised
            await waiting
        log.info("endpoint stopping", name=endpoint.name)
    except NsmError as exc:
        _fail(exc.message)
        status = EXIT_USAGE if isinstance(exc, InvalidArgument | NotFound) else 1
    except Exception as exc:
        log.error("endpoint failed", exc_info=True, error=repr(exc))
        _fail(f"{type(exc).__name__}: {exc}")
        status = 1
    finally:
        for task in (starting, waiting):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await endpoint.stop()
        for sig in signals:
            loop.remove_signal_handler(sig)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description="A network service endpoint.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())

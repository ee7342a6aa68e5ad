"""``nsm nsc``: request a network service, print the connection, keep it until told to stop.

    nsm nsc --manager unix:///run/nsm/nsm.sock --service blue --netns /var/run/netns/pod1

On success prints one line to stdout::

    connected id=<connection id> ifname=nsm-1 src=172.16.0.2/32 dst=172.16.0.1/32 endpoint=nse-1

(and an ``updated ...`` line whenever a refresh or heal changes the endpoint or the addresses),
then refreshes the connection until SIGTERM/SIGINT, Closes it and exits 0. ``--once`` closes right
after printing; ``--hold SECONDS`` keeps the connection that long. A failed request prints
``nsm nsc: request failed: CODE: message`` on stderr and exits 1; bad flags exit 2. Every flag also
reads ``NSM_<FLAG>``. Runnable as ``python -m nsm.client.main``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Sequence

from nsm import log as nsm_log
from nsm.api.connection_pb2 import Connection
from nsm.client.sdk import DEFAULT_IFNAME, DEFAULT_LIFETIME, DEFAULT_TIMEOUT, Client
from nsm.config import duration, flag, label
from nsm.errors import NsmError
from nsm.mechanisms import NAME
from nsm.names import check_name

PROG = "nsm nsc"
LOG_LEVELS = ["debug", "info", "warning", "error"]
EXIT_FAILED = 1
EXIT_USAGE = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The client's flags (each also settable as ``NSM_<FLAG>``)."""
    flag(parser, "--manager", required=True,
         help="the node's manager URL, e.g. unix:///run/nsm/nsm.sock")
    flag(parser, "--service", required=True, help="network service to request")
    flag(parser, "--netns", help="network namespace (path) for the client's interface "
                                 "(default: this process's)")
    flag(parser, "--ifname", default=DEFAULT_IFNAME, help="interface name in the client's namespace")
    flag(parser, "--name", help="this client's path segment name (default nsc-<random>)")
    flag(parser, "--label", many=True, type=label, default=[],
         help="connection label key=value (matched against the service's matches); repeatable")
    flag(parser, "--lifetime", type=duration, default=DEFAULT_LIFETIME,
         help="connection lifetime without a refresh, e.g. 10m (refreshed at a third of it)")
    flag(parser, "--timeout", type=duration, default=DEFAULT_TIMEOUT,
         help="timeout of each Request/Close, e.g. 15s")
    flag(parser, "--once", switch=True, default=False, help="request, print, close and exit")
    flag(parser, "--hold", type=duration,
         help="keep the connection this long (e.g. 30s), then close and exit")
    flag(parser, "--log-level", default="warning", choices=LOG_LEVELS, help="log level")
    flag(parser, "--log-json", switch=True, default=False, help="log JSON lines")


def summary(conn: Connection, ifname: str = "") -> str:
    """``id=... ifname=... src=... dst=... endpoint=...`` for one connection."""
    ip = conn.context.ip_context
    name = conn.mechanism.parameters.get(NAME, "") or ifname
    return (f"id={conn.id} ifname={name} src={','.join(ip.src_ip_addrs) or '-'} "
            f"dst={','.join(ip.dst_ip_addrs) or '-'} endpoint={conn.network_service_endpoint_name or '-'}")


def _fail(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


async def run(args: argparse.Namespace) -> int:
    """Request, print, hold until a signal (or ``--once``/``--hold``), close; the exit status."""
    nsm_log.setup(args.log_level, args.log_json)
    printed: list[str] = []

    def on_update(conn: Connection) -> None:
        line = summary(conn, args.ifname)
        if printed and printed[-1] != line:
            print(f"updated {line}", flush=True)
            printed.append(line)

    try:
        if args.name is not None:
            check_name(args.name, "client name (--name)")
        client = Client(manager_url=args.manager, service=args.service, netns=args.netns,
                        ifname=args.ifname, name=args.name, labels=dict(args.label or []),
                        lifetime=args.lifetime, request_timeout=args.timeout, on_update=on_update)
    except NsmError as exc:
        _fail(exc.message)
        return EXIT_USAGE

    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stopping.set)
    requesting = asyncio.create_task(client.request(), name="nsc-request")
    waiting = asyncio.create_task(stopping.wait(), name="nsc-signal")
    try:
        await asyncio.wait({requesting, waiting}, return_when=asyncio.FIRST_COMPLETED)
        if not requesting.done():
            return 0  # stopped before the connection was up
        try:
            conn = requesting.result()
        except NsmError as exc:
            _fail(f"request failed: {exc.code.name}: {exc.message}")
            return EXIT_FAILED
        line = summary(conn, args.ifname)
        printed.append(line)
        print(f"connected {line}", flush=True)
        if args.once:
            return 0
        if args.hold is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(waiting), args.hold)
        else:
            await waiting
        return 0
    finally:
        for task in (requesting, waiting):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        try:
            await client.close(raise_errors=True)
        except NsmError as exc:
            _fail(f"close failed: {exc.code.name}: {exc.message}")
        for sig in signals:
            loop.remove_signal_handler(sig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description="Request a network service.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())

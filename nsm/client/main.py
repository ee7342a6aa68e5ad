"""``nsm nsc``: request a network service, print the connection, keep it until told to stop.

    nsm nsc --manager unix:///run/nsm/nsm.sock --service blue --netns /var/run/netns/pod1

On success prints one line to stdout::

    connected id=<connection id> ifname=nsm-1 src=172.16.0.2/32 dst=172.16.0.1/32 endpoint=nse-1

(and an ``updated ...`` line whenever a refresh or heal changes the endpoint or the addresses),
then refreshes and heals the connection until SIGTERM/SIGINT, Closes it and exits 0.

Healing (:mod:`nsm.client.heal`) watches the manager's monitor stream and checks the data plane
from the client's namespace every ``--liveness-interval`` (200 ms; each check at most
``--liveness-timeout``, 1 s; ``--no-liveness`` turns the check off, ``--no-heal`` all healing).

The connection id is ``--id``, else ``<name>-0`` when ``--name`` is given (else random). With a
stable id a restarted ``nsm nsc`` (killed without Close) adopts the connection the manager still
has when its interface is still in the namespace: it refreshes it instead of building a second
one, and the interface keeps its index. ``--once`` closes right
after printing; ``--hold SECONDS`` keeps the connection that long. A failed request prints
``nsm nsc: request failed: CODE: message`` on stderr and exits 1; bad flags exit 2. Each state
change of the connection is a log line on stderr (down, failed and healed are warnings, so they
show at the default level). Every flag also reads ``NSM_<FLAG>``. Runnable as ``python -m nsm.client.main``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence

from nsm import log as nsm_log
from nsm.api.connection_pb2 import Connection
from nsm.client.heal import DEFAULT_INTERVAL, HealOptions
from nsm.client.heal import DEFAULT_TIMEOUT as DEFAULT_LIVENESS_TIMEOUT
from nsm.client.sdk import DEFAULT_IFNAME, DEFAULT_LIFETIME, DEFAULT_TIMEOUT, Client
from nsm.config import EXIT_USAGE, StopSignals, duration, fail, flag, label, log_flags, run_command
from nsm.daemon import settle_heap
from nsm.errors import NsmError
from nsm.mechanisms import NAME
from nsm.names import check_name
from nsm.security.ids import workload_id
from nsm.security.options import add_security_flags, security_from_args

PROG = "nsm nsc"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The client's flags (each also settable as ``NSM_<FLAG>``)."""
    flag(parser, "--manager", required=True,
         help="the node's manager URL, e.g. unix:///run/nsm/nsm.sock")
    flag(parser, "--manager-id", default=None,
         help="the SPIFFE ID the manager must have (e.g. spiffe://<td>/nsm/node/<node>/manager): "
              "any other is refused, and its TLS handshake proves it (no identity round trip)")
    flag(parser, "--service", required=True, help="network service to request")
    flag(parser, "--netns", help="network namespace (path, or name under /var/run/netns) for the "
                                 "client's interface (default: this process's)")
    flag(parser, "--ifname", default=DEFAULT_IFNAME, help="interface name in the client's namespace")
    flag(parser, "--name", help="this client's path segment name (default nsc-<random>)")
    flag(parser, "--id", help="the connection id (default <name>-0 with --name, else random): a "
                              "restarted client with the same id adopts its live connection")
    flag(parser, "--label", many=True, type=label, default=[],
         help="connection label key=value (matched against the service's matches); repeatable")
    flag(parser, "--lifetime", type=duration, default=DEFAULT_LIFETIME,
         help="connection lifetime without a refresh, e.g. 45s (refreshed at a third of the "
              "shortest on its path: each hop caps it at its own --lifetime)")
    flag(parser, "--timeout", type=duration, default=DEFAULT_TIMEOUT,
         help="timeout of each Request/Close, e.g. 15s")
    heal_flags(parser)
    flag(parser, "--once", switch=True, default=False, help="request, print, close and exit")
    flag(parser, "--hold", type=duration,
         help="keep the connection this long (e.g. 30s), then close and exit")
    add_security_flags(parser)
    log_flags(parser, level="warning")


def heal_flags(parser: argparse.ArgumentParser) -> None:
    """``--heal``, ``--liveness`` and the data-plane check's ``--liveness-interval`` and
    ``--liveness-timeout`` (read back by :func:`heal_options`)."""
    for name, what in (("--heal", "heal connections that break (monitor stream, data-plane check)"),
                       ("--liveness", "check the data plane from the client's namespace (ICMP to "
                                      "the endpoint's addresses)")):
        flag(parser, name, switch=True, default=True, help=what)
    for name, default, what in (
            ("--liveness-interval", DEFAULT_INTERVAL, "time between two data-plane checks, e.g. 200ms"),
            ("--liveness-timeout", DEFAULT_LIVENESS_TIMEOUT,
             "how long one data-plane check may take before the connection is dead, e.g. 1s")):
        flag(parser, name, type=duration, default=default, help=what)


def heal_options(args: argparse.Namespace) -> HealOptions | None:
    """The :class:`HealOptions` of :func:`heal_flags` (None with ``--no-heal``)."""
    if not args.heal:
        return None
    return HealOptions(liveness=args.liveness, interval=args.liveness_interval,
                       timeout=args.liveness_timeout)


def summary(conn: Connection, ifname: str = "") -> str:
    """``id=... ifname=... src=... dst=... endpoint=...`` for one connection."""
    ip = conn.context.ip_context
    name = conn.mechanism.parameters.get(NAME, "") or ifname
    return (f"id={conn.id} ifname={name} src={','.join(ip.src_ip_addrs) or '-'} "
            f"dst={','.join(ip.dst_ip_addrs) or '-'} endpoint={conn.network_service_endpoint_name or '-'}")


def default_identity(args: argparse.Namespace) -> str:
    """The workload name of this client's SPIFFE ID when the built-in CA issues it: its pod
    (the name of the namespace it requests for), else its name, else ``nsc``."""
    netns = str(args.netns or "")
    pod = "" if not netns or netns.startswith("/proc/") else os.path.basename(netns.rstrip("/"))
    return re.sub(r"[^A-Za-z0-9._-]", "-", pod or args.name or "nsc").strip(".") or "nsc"


async def run(args: argparse.Namespace) -> int:
    """Request, print, hold until a signal (or ``--once``/``--hold``), close; the exit status.
    Every state change of the connection is a log line (down, failed and healed are warnings)."""
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
        conn_id = args.id
        if conn_id is not None:
            check_name(conn_id, "connection id (--id)")
        elif args.name is not None:
            conn_id = f"{args.name}-0"
        security = security_from_args(args, workload_id(args.trust_domain, default_identity(args)))
        client = Client(manager_url=args.manager, service=args.service, netns=args.netns,
                        ifname=args.ifname, name=args.name, labels=dict(args.label or []),
                        lifetime=args.lifetime, request_timeout=args.timeout, on_update=on_update,
                        conn_id=conn_id, heal=heal_options(args), security=security,
                        manager_id=args.manager_id)
    except NsmError as exc:
        return fail(PROG, exc.message, EXIT_USAGE)

    async with StopSignals() as stop:
        try:
            try:
                await security.start()
                conn = await stop.first(client.request())
            except NsmError as exc:
                return fail(PROG, f"request failed: {exc.code.name}: {exc.message}")
            if conn is None:
                return 0  # stopped before the connection was up
            line = summary(conn, args.ifname)
            printed.append(line)
            print(f"connected {line}", flush=True)
            if not args.once:
                settle_heap()  # it holds the connection from here on (refresh, heal)
                await stop.wait(args.hold)
            return 0
        finally:
            try:
                await client.close(raise_errors=True)
            except NsmError as exc:
                fail(PROG, f"close failed: {exc.code.name}: {exc.message}")
            finally:
                await security.close()


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(PROG, "Request a network service.", add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())

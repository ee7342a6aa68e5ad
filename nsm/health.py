"""``nsm health``: ask a daemon's ``grpc.health.v1.Health`` once; exit 0 when it is SERVING.

    nsm health                          # the first URL of NSM_LISTEN (the container's own daemon)
    nsm health --url unix:///run/nsm/forwarder.sock --service networkservice.NetworkService

For Kubernetes exec probes: a daemon listening only on a unix socket (the forwarder, the CNI
agent) cannot have a native ``grpc:`` probe, which dials a TCP port. Run in the daemon's
container, the probe inherits its environment, so without ``--url`` it checks the first URL the
daemon listens on (``NSM_LISTEN``), with the daemon's security settings (``NSM_CA_DIR``,
``NSM_SPIFFE_SOCKET``, ``NSM_TRUST_DOMAIN``...): the probe has an identity of its own (default
``spiffe://<td>/nsm/health``, or the container's SVID from the Workload API). Its other flags are
not read from the environment (there they are the daemon's: an endpoint's ``NSM_SERVICE``).
Exit 1 (with one line on stderr) when the daemon answers anything but SERVING, or does not
answer within ``--timeout``; 2 on bad input.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nsm.config import EXIT_FAILED, EXIT_USAGE, duration, fail
from nsm.errors import NsmError
from nsm.security.options import add_security_flags, security_from_args
from nsm.security.tls import Security
from nsm.transport import dial, parse_url

PROG = "nsm health"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Not read from NSM_URL/NSM_SERVICE/NSM_TIMEOUT: a probe runs with its daemon's environment,
    # where those are the daemon's own settings (an endpoint's NSM_SERVICE is its network
    # service, not a health service name). The security flags are read from it on purpose.
    parser.add_argument("--url", default=None, help="the daemon's URL, unix:///path or tcp://host:port "
                                                    "(default: the first of NSM_LISTEN)")
    parser.add_argument("--service", default="", help="the service to ask about (default: the whole server)")
    parser.add_argument("--timeout", type=duration, default=3.0, help="how long to wait for the answer")
    add_security_flags(parser)


def default_url(environ: Mapping[str, str] | None = None) -> str | None:
    """The first URL of ``NSM_LISTEN`` (comma-separated), None when it is not set."""
    raw = (os.environ if environ is None else environ).get("NSM_LISTEN", "")
    urls = [u.strip() for u in raw.split(",") if u.strip()]
    return urls[0] if urls else None


async def one_shot(prog: str, url: str | None, variable: str, args: argparse.Namespace,
                   spiffe_id: str) -> tuple[str, Security] | int:
    """What a one-shot command against a daemon (``nsm health``, ``nsm metrics``) starts with:
    the daemon's URL (``--url``, else ``variable`` gave it) and the command's identity, started
    (``spiffe_id`` from the built-in CA, or the container's SVID); or its exit status, the
    reason on stderr, when either is missing or bad."""
    if not url:
        return fail(prog, f"--url (or {variable}) is required", EXIT_USAGE)
    try:
        parse_url(url)
    except NsmError as exc:
        return fail(prog, exc.message, EXIT_USAGE)
    try:
        security = security_from_args(args, spiffe_id, create_ca=False)
        await security.start()
    except NsmError as exc:
        return fail(prog, f"no identity: {exc.message}", EXIT_FAILED)
    return url, security


async def run(args: argparse.Namespace) -> int:
    ready = await one_shot(PROG, args.url or default_url(), "NSM_LISTEN", args,
                           f"spiffe://{args.trust_domain}/nsm/health")
    if isinstance(ready, int):
        return ready
    url, security = ready
    channel = dial(url, security)
    try:
        resp = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
    except grpc.aio.AioRpcError as exc:
        return fail(PROG, f"{url}: {exc.code().name}: {exc.details()}", EXIT_FAILED)
    finally:
        await channel.close()
        await security.close()
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    if resp.status != health_pb2.HealthCheckResponse.SERVING:
        return fail(PROG, f"{url}: {status}", EXIT_FAILED)
    print(f"{url}: {status}", flush=True)
    return 0

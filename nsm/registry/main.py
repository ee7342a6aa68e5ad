"""The registry daemon: ``nsm registry --listen URL [--listen URL ...] --expiry 60s``.

Serves ``registry.NetworkServiceRegistry``, ``registry.NetworkServiceEndpointRegistry``,
health and reflection on every listen URL, and stops gracefully on SIGTERM/SIGINT.
:class:`RegistryDaemon` is the same thing as an ``async with`` block for tests and demos.
Runnable as ``python -m nsm.registry.main``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from nsm import log as nsm_log
from nsm.config import duration, flag
from nsm.daemon import serve_until_signal
from nsm.errors import NsmError
from nsm.metrics import add_metrics_flags, serving_metrics
from nsm.registry.authz import RegistryPolicy
from nsm.registry.server import DEFAULT_EXPIRY, Registry, add_to_server
from nsm.registry.store import DEFAULT_WATCH_QUEUE
from nsm.security.ids import registry_id
from nsm.security.options import add_security_flags, security_from_args
from nsm.security.tls import Security
from nsm.transport import Server, Url

log = nsm_log.get_logger(__name__)

#: Where the registry listens when no ``--listen`` is given (the reference's port).
DEFAULT_LISTEN = "tcp://0.0.0.0:5002"
LOG_LEVELS = ["debug", "info", "warning", "error"]


class RegistryDaemon:
    """A registry served over gRPC on ``urls``::

        async with RegistryDaemon(["unix:///tmp/reg.sock", "tcp://127.0.0.1:0"]) as daemon:
            daemon.urls      # bound URLs as strings, tcp port 0 replaced by the real port
            daemon.url       # the first of them
            daemon.registry  # the Registry itself

    ``security``: mTLS and the authorization of registrations (:mod:`nsm.registry.authz`,
    rules switched off by ``policy``); None: plaintext, no rules.
    """

    def __init__(
        self,
        urls: Sequence[str | Url],
        *,
        expiry: float = DEFAULT_EXPIRY,
        watch_queue: int = DEFAULT_WATCH_QUEUE,
        grace: float = 1.0,
        registry: Registry | None = None,
        security: Security | None = None,
        policy: RegistryPolicy | None = None,
    ) -> None:
        self.security = security or Security.insecure()
        self.registry = registry or Registry(expiry=expiry, watch_queue=watch_queue,
                                             security=self.security, policy=policy)
        self._server = Server(urls, security=self.security)
        self._grace = grace
        add_to_server(self.registry, self._server)
        self.urls: list[str] = []
        self._started = False

    @property
    def url(self) -> str:
        if not self.urls:
            raise RuntimeError("RegistryDaemon not started")
        return self.urls[0]

    async def start(self) -> None:
        await self.registry.start()
        try:
            await self._server.start()
        except BaseException:
            await self.registry.stop()
            raise
        self.urls = [str(url) for url in self._server.urls]
        self._started = True

    async def stop(self) -> None:
        """Stop serving (idempotent)."""
        if not self._started:
            return
        self._started = False
        # Watch streams end first (UNAVAILABLE, so watchers reconnect), then the server drains.
        await self.registry.stop()
        await self._server.stop(self._grace)

    async def __aenter__(self) -> RegistryDaemon:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The registry's flags (each also settable as ``NSM_<FLAG>``)."""
    flag(parser, "--listen", many=True,
         help=f"URL to serve on, unix:///path or tcp://host:port; repeatable "
              f"(default {DEFAULT_LISTEN})")
    flag(parser, "--expiry", type=duration, default=DEFAULT_EXPIRY,
         help="lifetime of an endpoint registration unless refreshed, e.g. 60s")
    add_security_flags(parser)
    flag(parser, "--policy-off", many=True, default=[],
         help="switch a registration rule off (repeatable): owner (the first registrant owns a "
              "name), node (a manager registers its node's records only), forwarder (forwarder "
              "records only by that node's forwarder), url (a record's URL must prove the "
              "registrant's identity)", type=_policy_name)
    add_metrics_flags(parser)
    flag(parser, "--log-level", default="info", choices=LOG_LEVELS, help="log level")
    flag(parser, "--log-json", switch=True, default=False, help="log JSON lines")


def _policy_name(text: str) -> str:
    if text not in RegistryPolicy.names():
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a registration rule ({', '.join(RegistryPolicy.names())})")
    return text


async def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM or SIGINT; returns the exit status."""
    nsm_log.setup(args.log_level, args.log_json)
    try:
        security = security_from_args(args, registry_id(args.trust_domain))
    except NsmError as exc:
        log.error("registry failed", error=exc.message)
        return 1

    try:
        daemon = RegistryDaemon(args.listen or [DEFAULT_LISTEN], expiry=args.expiry,
                                security=security, policy=RegistryPolicy.without(args.policy_off))
    except NsmError as exc:  # e.g. a bad listen URL
        log.error("registry failed", error=exc.message)
        return 1

    started = False

    async def start() -> None:
        nonlocal started
        await daemon.start()
        started = True
        log.info("registry serving", urls=",".join(daemon.urls), expiry=args.expiry)

    async def stop() -> None:
        if started:
            log.info("registry stopping")
            await daemon.stop()

    try:
        async with security, serving_metrics(args, daemon.registry.metrics, security):
            await serve_until_signal(start, stop, status=daemon.registry.status)
    except NsmError as exc:  # e.g. a busy listen URL
        log.error("registry failed", error=exc.message)
        return 1
    log.info("registry stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nsm registry", description="The NSM registry daemon.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())

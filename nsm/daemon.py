"""Running a daemon until SIGTERM/SIGINT, shared by every ``nsm`` subcommand; and its status on
SIGUSR1.

**Status** (:func:`status_on_signal`): on SIGUSR1 a daemon logs one ``status`` line (at info)
with what it holds, counted: connections, expiry timers, monitor watchers, next-hop streams, and
what its role owns (a forwarder's VNIs and routing tables, an endpoint's IPAM pairs, the
registry's records), plus its asyncio tasks. Read-only, no RPC: an operator (``kill -USR1``) or
a test (:meth:`nsm.lab.harness.LabHarness.daemon_status`) counts what a daemon leaked.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import signal
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping
from typing import Any

from nsm import log as nsmlog
from nsm.config import flag
from nsm.log import get_logger
from nsm.metrics import add_metrics_flags, serving_metrics
from nsm.security.options import add_security_flags
from nsm.security.policy import add_policy_flags

log = get_logger("nsm.daemon")

#: The signal that makes a daemon log its status, and the message of that line.
STATUS_SIGNAL = signal.SIGUSR1
STATUS_MESSAGE = "status"

Status = Callable[[], Mapping[str, int]]


@contextlib.contextmanager
def status_on_signal(status: Status) -> Iterator[None]:
    """While entered (in a running event loop), :data:`STATUS_SIGNAL` logs ``status()`` and the
    number of asyncio tasks as one ``status`` line."""
    loop = asyncio.get_running_loop()

    def dump() -> None:
        try:
            fields = dict(status())
        except Exception as exc:  # a status must never take the daemon down
            log.warning("status failed", error=repr(exc))
            return
        log.info(STATUS_MESSAGE, **fields, tasks=len(asyncio.all_tasks(loop)))

    loop.add_signal_handler(STATUS_SIGNAL, dump)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            loop.remove_signal_handler(STATUS_SIGNAL)


def settle_heap() -> None:
    """Once serving: collect, then move everything alive (modules, the chain, channels: what
    a start makes and keeps) out of the garbage collector's generations. A full collection of a
    daemon's heap takes 10-20 ms, a pause every Request in flight then waits for; afterwards the
    collector walks only what came after (``gc.freeze``)."""
    gc.collect()
    gc.freeze()


def add_role_flags(parser: argparse.ArgumentParser) -> None:
    """The flags every serving role (manager, forwarder) ends with: identity, authorization
    policies, metrics and logging."""
    add_security_flags(parser)
    add_policy_flags(parser)
    add_metrics_flags(parser)
    flag(parser, "--log-level", help="log level", default="info")
    flag(parser, "--log-json", help="log JSON lines", switch=True, default=False)


def role_runner(build: Callable[[argparse.Namespace], tuple[Any, Any]]
                ) -> Callable[[argparse.Namespace], Coroutine[Any, Any, int]]:
    """The ``run(args)`` of a serving role's command: set up logging, ``build(args)`` the role
    and its :class:`~nsm.security.tls.Security` (a bad flag raises there, before anything is
    started), and :func:`serve_role` them."""

    async def run(args: argparse.Namespace) -> int:
        nsmlog.setup(args.log_level, args.log_json)
        role, security = build(args)
        return await serve_role(role, security, args)

    return run


async def serve_role(role: Any, security: Any, args: argparse.Namespace | None = None) -> int:
    """A serving role (manager, forwarder) with its identity until SIGTERM/SIGINT: the identity
    is started first and closed last, then its metrics listener (``--metrics-listen``, from
    ``args``); SIGUSR1 logs the role's status. Exit status 0."""
    async with security, serving_metrics(args, role.metrics, security):
        await serve_until_signal(role.start, role.stop, status=role.status)
    return 0


async def serve_until_signal(start: Callable[[], Awaitable[Any]],
                             stop: Callable[[], Awaitable[Any]], *,
                             status: Status | None = None) -> None:
    """Start, serve until SIGTERM/SIGINT, stop. A signal during start (e.g. while waiting for
    the registry) cancels the start and still stops cleanly. With ``status``, SIGUSR1 logs it
    meanwhile (:func:`status_on_signal`)."""
    with status_on_signal(status) if status is not None else contextlib.nullcontext():
        await _serve_until_signal(start, stop)


async def _serve_until_signal(start: Callable[[], Awaitable[Any]],
                              stop: Callable[[], Awaitable[Any]]) -> None:
    loop = asyncio.get_running_loop()
    got = asyncio.Event()
    sigs = (signal.SIGTERM, signal.SIGINT)
    for sig in sigs:
        loop.add_signal_handler(sig, got.set)
    try:
        starting = asyncio.ensure_future(start())
        waiting = asyncio.ensure_future(got.wait())
        await asyncio.wait({starting, waiting}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            log.info("signal during start: stopping")
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
        else:
            starting.result()  # a failed start raises here
            settle_heap()
            await waiting
        waiting.cancel()
    finally:
        try:
            await stop()
        finally:
            for sig in sigs:
                with contextlib.suppress(Exception):
                    loop.remove_signal_handler(sig)

"""Running a daemon until SIGTERM/SIGINT, shared by every ``nsm`` subcommand."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable
from typing import Any

from nsm.log import get_logger

log = get_logger("nsm.daemon")


async def serve_until_signal(start: Callable[[], Awaitable[Any]],
                             stop: Callable[[], Awaitable[Any]]) -> None:
    """Start, serve until SIGTERM/SIGINT, stop. A signal during start (e.g. while waiting for
    the registry) cancels the start and still stops cleanly."""
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
            await waiting
        waiting.cancel()
    finally:
        try:
            await stop()
        finally:
            for sig in sigs:
                with contextlib.suppress(Exception):
                    loop.remove_signal_handler(sig)

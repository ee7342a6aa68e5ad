"""Running a daemon until SIGTERM/SIGINT, shared by every ``nsm`` subcommand."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable
from typing import Any


async def wait_for_signal(*signals: signal.Signals) -> signal.Signals:
    """Wait until one of ``signals`` (default SIGTERM, SIGINT) arrives."""
    sigs = signals or (signal.SIGTERM, signal.SIGINT)
    loop = asyncio.get_running_loop()
    got: asyncio.Future[signal.Signals] = loop.create_future()
    for sig in sigs:
        loop.add_signal_handler(sig, lambda s=sig: got.done() or got.set_result(s))
    try:
        return await got
    finally:
        for sig in sigs:
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)


async def serve_until_signal(start: Callable[[], Awaitable[Any]],
                             stop: Callable[[], Awaitable[Any]]) -> None:
    await start()
    try:
        await wait_for_signal()
    finally:
        await stop()

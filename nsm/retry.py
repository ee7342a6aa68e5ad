"""One retry policy for every call that may fail for a while (a registry restarting, a peer not
up yet): exponential backoff between ``min_delay`` and ``max_delay``, retrying only the errors
in :data:`nsm.errors.RETRYABLE` unless told otherwise.

::

    record = await retry(lambda: client.register_nse(nse), what="registering nse1", log=log)

    backoff = Backoff()
    while True:
        try:
            ...
            backoff.reset()
        except RETRYABLE as exc:
            await backoff.sleep()
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from nsm.errors import RETRYABLE, NsmError
from nsm.log import Logger

T = TypeVar("T")

MIN_DELAY = 0.1
MAX_DELAY = 5.0


@dataclass
class Backoff:
    """Delays that double from ``min_delay`` up to ``max_delay``; :meth:`reset` after a success."""

    min_delay: float = MIN_DELAY
    max_delay: float = MAX_DELAY
    factor: float = 2.0
    _next: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        if not 0 < self.min_delay <= self.max_delay:
            raise ValueError(f"backoff needs 0 < min_delay <= max_delay, not "
                             f"{self.min_delay}..{self.max_delay}")
        self._next = self.min_delay

    def next_delay(self) -> float:
        """The delay to wait now; the following one grows."""
        delay = self._next
        self._next = min(self._next * self.factor, self.max_delay)
        return delay

    def reset(self) -> None:
        self._next = self.min_delay

    async def sleep(self) -> float:
        delay = self.next_delay()
        await asyncio.sleep(delay)
        return delay


async def retry(
    fn: Callable[[], Awaitable[T]],
    *,
    what: str,
    log: Logger | None = None,
    retry_on: tuple[type[NsmError], ...] = RETRYABLE,
    backoff: Backoff | None = None,
    deadline: float | None = None,
) -> T:
    """Call ``fn`` until it succeeds. An error in ``retry_on`` is logged (warning) and retried
    after the next backoff delay; any other error, or one past ``deadline`` (seconds from now),
    is raised."""
    backoff = backoff or Backoff()
    end = None if deadline is None else time.monotonic() + deadline
    while True:
        try:
            return await fn()
        except retry_on as exc:
            delay = backoff.next_delay()
            if end is not None and time.monotonic() + delay > end:
                raise
            if log is not None:
                log.warning(f"{what} failed, retrying", code=exc.code.name, error=exc.message,
                            retry_in=round(delay, 3))
            await asyncio.sleep(delay)

"""The client tests' shared helpers: every test checks that it leaves no task behind, and
``eventually`` waits for a condition."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

Eventually = Callable[..., Awaitable[None]]


@pytest.fixture(autouse=True)
async def no_leaked_tasks() -> AsyncIterator[None]:
    before = asyncio.all_tasks()
    yield
    deadline = time.monotonic() + 2.0
    while True:
        leaked = {t for t in asyncio.all_tasks() - before if t is not asyncio.current_task() and not t.done()}
        if not leaked or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.02)
    assert not leaked, f"leaked tasks: {leaked}"


async def _eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


@pytest.fixture
def eventually() -> Eventually:
    """``await eventually(lambda: ..., timeout=5.0)``: until the check is true, or fail."""
    return _eventually

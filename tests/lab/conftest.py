"""Fixtures for the emulated-cluster tests: unique lab prefixes per xdist worker, cleanup of
leftovers of a crashed earlier run, and the daemons' logs printed when a test fails."""

from __future__ import annotations

import asyncio
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from nsm import netns as nsns
from nsm.lab import Lab, Topology, cleanup

NEEDS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")


def _worker() -> str:
    return os.environ.get("PYTEST_XDIST_WORKER", "main")


def _prefix_pattern() -> re.Pattern[str]:
    return re.compile(rf"^(lt{re.escape(_worker())}x[0-9a-f]{{6}})-")


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture(scope="session", autouse=True)
def _remove_leftovers() -> Iterator[None]:
    """Labs of this worker left by a crashed earlier run (before), or by this run (after)."""

    def sweep() -> None:
        pattern = _prefix_pattern()
        for prefix in sorted({m.group(1) for n in nsns.list_netns() if (m := pattern.match(n))}):
            cleanup(prefix, state_dir=None)

    if os.geteuid() == 0:
        sweep()
    yield
    if os.geteuid() == 0:
        sweep()


@pytest.fixture
def prefix() -> str:
    """A lab prefix unique to this test and worker (``lt<worker>x<hex>``)."""
    return f"lt{_worker()}x{uuid.uuid4().hex[:6]}"


@pytest.fixture
async def lab2(prefix: str, request: pytest.FixtureRequest) -> AsyncIterator[Lab]:
    """A running two-node lab (``Topology.simple(2)``); its daemons' logs are printed if the test
    fails (before it is torn down)."""
    async with Lab(Topology.simple(2), prefix=prefix, print_logs_on_error=False) as lab:
        yield lab
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            print(f"===== logs of lab {lab.prefix} =====\n{lab.format_logs()}")


@pytest.fixture
async def no_leaked_tasks() -> AsyncIterator[None]:
    """The test leaves no asyncio task of its own behind."""
    before = asyncio.all_tasks()
    yield
    deadline = time.monotonic() + 2.0
    leaked: set[asyncio.Task[Any]] = set()
    while time.monotonic() < deadline:
        leaked = {t for t in asyncio.all_tasks() - before
                  if t is not asyncio.current_task() and not t.done()}
        if not leaked:
            break
        await asyncio.sleep(0.02)
    assert not leaked, f"leaked tasks: {leaked}"

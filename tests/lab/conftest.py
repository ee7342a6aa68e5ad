"""Fixtures for the emulated-cluster tests: lab prefixes unique to each test, cleanup of labs left
by a test process that died, and the daemons' logs printed when a test fails."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from nsm.kernel import netns as nsns
from nsm.lab import Lab, Topology, cleanup

#: ``lt<pid>x<hex>-``: the pid of the pytest process that made the lab. Other runs of the suite
#: may go on at the same time on this machine (with the same xdist worker names): a sweep only
#: touches labs whose process is gone.
_PREFIX = re.compile(r"^(lt(\d+)x[0-9a-f]{6})-")


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture(scope="session", autouse=True)
def _remove_leftovers() -> Iterator[None]:
    """Before: labs left by test processes that died (crashed, killed). After: this process's
    own leftovers (the tests check that there are none)."""

    def sweep(dead_only: bool) -> None:
        me = os.getpid()
        prefixes = set()
        for name in nsns.list_netns():
            m = _PREFIX.match(name)
            if m is None:
                continue
            pid = int(m.group(2))
            if (pid != me and not os.path.exists(f"/proc/{pid}")) or (pid == me and not dead_only):
                prefixes.add(m.group(1))
        for prefix in sorted(prefixes):
            cleanup(prefix, state_dir=None)

    if os.geteuid() == 0:
        sweep(dead_only=True)
    yield
    if os.geteuid() == 0:
        sweep(dead_only=False)


@pytest.fixture
def prefix() -> str:
    """A lab prefix unique to this test (``lt<pid>x<hex>``)."""
    return f"lt{os.getpid()}x{uuid.uuid4().hex[:6]}"


@pytest.fixture
def short_tmp(prefix: str) -> Iterator[Path]:
    """A fresh directory under /tmp with a short path (unix socket paths are limited to 107
    bytes), removed after the test."""
    path = Path(tempfile.mkdtemp(prefix=f"{prefix}-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


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

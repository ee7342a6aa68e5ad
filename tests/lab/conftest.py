"""Fixtures for the emulated-cluster tests: lab prefixes unique to each test and cleanup of labs
left by a test process that died. (A failed test's report gets the logs of a lab it used, and
``no_leaked_tasks`` come from the root conftest.)"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from nsm.kernel import netns as nsns
from nsm.lab import Lab, Topology, cleanup

#: ``lt<pid>x<hex>-``: the pid of the pytest process that made the lab. Other runs of the suite
#: may go on at the same time on this machine (with the same xdist worker names): a sweep only
#: touches labs whose process is gone.
_PREFIX = re.compile(r"^(lt(\d+)x[0-9a-f]{6})-")


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
async def lab2(prefix: str) -> AsyncIterator[Lab]:
    """A running two-node lab (``Topology.simple(2)``)."""
    async with Lab(Topology.simple(2), prefix=prefix, print_logs_on_error=False) as lab:
        yield lab

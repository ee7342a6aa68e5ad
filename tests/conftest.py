"""Suite-wide fixtures on the one harness (:mod:`nsm.lab.harness`): a name prefix unique to this
test run (and xdist worker) and a hard check at the end of the session that nothing carrying it
is left behind; waiting and leak-check fixtures; the daemons' logs in a failed test's report.

Tests that create network namespaces, temporary directories or processes put
:func:`nsm_run_prefix` in their names (namespace names, socket paths, daemon names) — or, for
labs, whose prefixes allow no ``-``, :func:`lab_prefix_base` — so the check below finds exactly
what *this* run made, never another run's or another worker's. At session end, a named namespace
whose name starts with either, a live process whose command line contains either, or a link of
the mesh's kinds that appeared in the root namespace fails the session with the list (then
namespaces and processes are removed, so one broken run does not leave the machine dirty for
the next).

When a test fails, each fixture value that runs daemons (a :class:`~nsm.lab.harness.LabHarness`
such as the e2e ``mesh`` or the multi-node ``cluster``, or a :class:`~nsm.lab.Lab`) adds its
daemons' logs to the report (:func:`nsm.lab.harness.failure_logs`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import grpc
import pytest

from nsm.api.connection_pb2 import MonitorScopeSelector, PathSegment
from nsm.lab import harness
from nsm.security.options import DEFAULT_CA_DIR

#: ``nsmt-<worker>-<random>``: short (it goes into unix socket paths, 107 bytes at most).
RUN_PREFIX = f"nsmt-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}-{secrets.token_hex(3)}"
#: The run prefix as a lab prefix (``[A-Za-z0-9_]``).
LAB_PREFIX = RUN_PREFIX.replace("-", "_")
#: Lines of each daemon's log attached to a failed test's report.
LOG_LINES = 200


@pytest.fixture(scope="session")
def nsm_run_prefix() -> str:
    """The prefix for every namespace, directory and process this run creates."""
    return RUN_PREFIX


@pytest.fixture(scope="session")
def lab_prefix_base() -> str:
    """The run prefix as a lab prefix (``[A-Za-z0-9_]``); labs add ``_<tag>`` to it."""
    return LAB_PREFIX


@pytest.fixture(scope="session", autouse=True)
def _nothing_left_behind() -> Iterator[None]:
    """Session end: fail hard if a namespace or process of this run's prefixes remains, or a
    link of the mesh's kinds appeared in the root namespace."""
    links = harness.root_links()
    ca_before = os.path.exists(DEFAULT_CA_DIR)
    yield
    if not ca_before and os.path.exists(DEFAULT_CA_DIR):
        # A command ran with the machine's default built-in CA: tests use the lab's CA (its
        # NSM_CA_DIR), a CA of their own, or --insecure, and leave the machine as it was.
        shutil.rmtree(DEFAULT_CA_DIR, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(DEFAULT_CA_DIR))  # only when empty
        pytest.fail(f"the test run created {DEFAULT_CA_DIR} (now removed)", pytrace=False)
    deadline = time.monotonic() + 3.0  # let processes being stopped finish exiting
    while True:
        found = harness.find_leftovers((RUN_PREFIX, LAB_PREFIX), links_before=links)
        if not found or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if found:
        found.remove()
        pytest.fail("\n".join([f"test run {RUN_PREFIX!r} left things behind (now removed):",
                               *found.lines()]), pytrace=False)


@pytest.fixture
async def no_leaked_tasks() -> AsyncIterator[None]:
    """The test leaves no asyncio task of its own behind."""
    async with harness.no_leaked_tasks():
        yield


@pytest.fixture
def eventually() -> harness.Eventually:
    """``await eventually(check, timeout=..., what=...)``: :func:`nsm.lab.harness.eventually`
    (also importable; a fixture for the tests that take it as one)."""
    return harness.eventually


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Modules with a ``slow`` test run first, their slow tests at their head, each module kept
    whole (its module fixtures set up once): with ``-n`` each worker starts on a long test while
    the short ones fill the others, instead of the run ending with one worker on a minute-long
    test."""

    def module(item: pytest.Item) -> str:
        return getattr(getattr(item, "module", None), "__name__", "")

    slow = {module(item) for item in items if item.get_closest_marker("slow")}
    first: dict[str, int] = {}
    for index, item in enumerate(items):
        first.setdefault(module(item), index)
    order = {id(item): index for index, item in enumerate(items)}
    items.sort(key=lambda item: (module(item) not in slow, first[module(item)],
                                 item.get_closest_marker("slow") is None, order[id(item)]))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed:
        seen: set[int] = set()
        for name, value in getattr(item, "funcargs", {}).items():
            if id(value) in seen:  # e.g. a per-test fixture handing out the session's object
                continue
            seen.add(id(value))
            for log, text in harness.failure_logs(value, LOG_LINES):
                report.sections.append((f"{name}: daemon log {log} ({report.when})", text))
    return report


@pytest.fixture
def monitor_watch() -> Iterator[Callable[..., harness.MonitorWatch]]:
    """``monitor_watch(channel, segment_id=..., services=[...])``: a :class:`harness.MonitorWatch` with
    that selector, cancelled at the end of the test."""
    watches: list[harness.MonitorWatch] = []

    def open_watch(channel: grpc.aio.Channel, *, segment_id: str = "",
                   services: Sequence[str] = ()) -> harness.MonitorWatch:
        selector = MonitorScopeSelector(network_services=list(services))
        if segment_id:
            selector.path_segments.append(PathSegment(id=segment_id))
        watch = harness.MonitorWatch(channel, selector)
        watches.append(watch)
        return watch

    yield open_watch
    for watch in watches:
        watch.call.cancel()

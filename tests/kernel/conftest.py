"""Fixtures for tests that need root and real network namespaces.

Every namespace a test makes is named ``<nsm_run_prefix>-<random>-<tag>`` (so the session-end
check of ``tests/conftest.py`` finds any that escaped) and deleted at teardown, even when the test
fails; teardown then checks that none of that test's namespaces is left and that the root
namespace's links are the ones it had before the test.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from nsm.kernel.netlink import Netlink
from nsm.lab.harness import NetnsGroup

IS_ROOT = os.geteuid() == 0
NOT_ROOT_REASON = "needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN) for network namespaces"


@pytest.fixture
def netns_factory(nsm_run_prefix: str) -> Iterator[NetnsGroup]:
    """``netns_factory(tag)`` makes a namespace and returns its path; all are deleted at
    teardown, which then checks that none is left and the root namespace's links are as before."""
    if not IS_ROOT:
        pytest.skip(NOT_ROOT_REASON)
    root_links = {name for _, name in socket.if_nameindex()}
    factory = NetnsGroup(f"{nsm_run_prefix}-{secrets.token_hex(2)}")
    try:
        yield factory
    finally:
        factory.cleanup()
        assert factory.leftovers() == [], "namespaces left behind"
        assert {name for _, name in socket.if_nameindex()} == root_links, \
            "the root namespace's links changed"


@pytest.fixture
async def netlink(netns_factory: NetnsGroup) -> AsyncIterator[Netlink]:
    """A Netlink closed at teardown (before the namespaces are deleted)."""
    nl = Netlink(prune_interval=0.2)
    try:
        yield nl
    finally:
        await nl.close()


@pytest.fixture
def fd_count() -> Callable[[], int]:
    return lambda: len(os.listdir("/proc/self/fd"))

"""nsm.kernel.ping in a process that holds more descriptors than select(2) can watch (a bench
driving 500 connections does): pings and echo streams still work."""

from __future__ import annotations

import asyncio
import os
import resource
from collections.abc import Iterator

import pytest

from nsm.kernel.netlink import Netlink
from nsm.kernel.ping import EchoStream, ping

pytestmark = pytest.mark.timeout(30)

FD_SETSIZE = 1024


@pytest.fixture
def many_fds() -> Iterator[None]:
    """Descriptors held up to past FD_SETSIZE, so that the next socket's number is above it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < FD_SETSIZE + 64:
        pytest.skip(f"the descriptor limit ({hard}) is below {FD_SETSIZE + 64}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, FD_SETSIZE + 256), hard))
    held: list[int] = []
    try:
        while not held or held[-1] <= FD_SETSIZE:
            held.append(os.open(os.devnull, os.O_RDONLY))
        yield
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_ping_with_descriptors_past_fd_setsize(netns_factory, many_fds) -> None:  # type: ignore[no-untyped-def]
    path = netns_factory("p")
    nl = Netlink()
    try:
        await nl.set_up(path, "lo")
    finally:
        await nl.close()
    result = await asyncio.to_thread(ping, path, "127.0.0.1", count=2, timeout=1.0)
    assert result.received == 2, result
    stream = EchoStream(path, "127.0.0.1", rate=50, linger=0.2).start()
    try:
        await asyncio.sleep(0.3)
    finally:
        seen = await asyncio.to_thread(stream.stop)
    assert seen.sent > 0 and not seen.lost, seen

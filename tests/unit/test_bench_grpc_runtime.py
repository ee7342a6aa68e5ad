"""``bench.common.grpc_runtime``: while it holds gRPC's asyncio runtime, a client made after
the last one closed does not start the runtime's poller thread again (which every fresh client
of a benchmark loop paid inside its timed Request before)."""

from __future__ import annotations

import gc
import threading

import grpc
import pytest

from bench.common import grpc_runtime

pytestmark = pytest.mark.timeout(30)


async def _threads_started_by_fresh_channels(monkeypatch: pytest.MonkeyPatch, n: int) -> int:
    started: list[str] = []
    real = threading.Thread.start

    def counting(self: threading.Thread) -> None:
        started.append(self.name)
        real(self)

    monkeypatch.setattr(threading.Thread, "start", counting)
    for _ in range(n):
        channel = grpc.aio.insecure_channel("unix:///nonexistent/nsm-test-grpc-runtime")
        await channel.close()
        del channel
        gc.collect()
    monkeypatch.setattr(threading.Thread, "start", real)
    return len(started)


async def test_fresh_channels_do_not_restart_the_runtime_while_it_is_held(
        monkeypatch: pytest.MonkeyPatch) -> None:
    if await _threads_started_by_fresh_channels(monkeypatch, 3) == 0:
        pytest.skip("another gRPC object of this process holds the runtime already")
    async with grpc_runtime():
        assert await _threads_started_by_fresh_channels(monkeypatch, 3) == 0, "restarted"

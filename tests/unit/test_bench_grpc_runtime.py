"""``bench.common.grpc_runtime``: while it holds gRPC's asyncio runtime, a client made after
the last one closed does not start the runtime's poller thread again (which every fresh client
of a benchmark loop paid inside its timed Request before). Run in a fresh interpreter: no other
gRPC object of a test process may hold the runtime meanwhile."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]

_PROBE = """
import asyncio, gc, threading
import grpc
from bench.common import grpc_runtime

real = threading.Thread.start
started = []
def counting(self):
    started.append(self.name)
    real(self)
threading.Thread.start = counting

async def fresh_channels(n):
    before = len(started)
    for _ in range(n):
        channel = grpc.aio.insecure_channel("unix:///nonexistent/nsm-test-grpc-runtime")
        await channel.close()
        del channel
        gc.collect()
    return len(started) - before

async def main():
    free = await fresh_channels(3)
    async with grpc_runtime():
        await fresh_channels(1)  # the holder's own start, if any
        held = await fresh_channels(3)
    print(free, held)

asyncio.run(main())
"""


def test_fresh_channels_do_not_restart_the_runtime_while_it_is_held() -> None:
    out = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, capture_output=True, text=True,
                         timeout=50)
    assert out.returncode == 0, out.stderr[-2000:]
    free, held = (int(x) for x in out.stdout.split())
    assert free >= 3, "each fresh channel started the runtime again (the premise)"
    assert held == 0, f"{held} thread starts while the runtime was held"

"""Starting and stopping ``nsm`` daemons as real processes (used by the demo, the emulated
cluster and the tests): wait until they serve, stop them with SIGTERM, kill if they hang,
and never leave one behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nsm.errors import Unavailable
from nsm.transport import dial


class Daemon:
    """One ``nsm <role> ...`` process."""

    def __init__(self, name: str, args: Sequence[str], *, url: str,
                 env: Mapping[str, str] | None = None, log_path: Path | None = None,
                 netns: str | None = None) -> None:
        self.name = name
        self.args = list(args)
        self.url = url
        self.env = dict(env or {})
        self.log_path = log_path
        self.netns = netns
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, timeout: float = 15.0) -> Daemon:
        env = {**os.environ, **self.env}
        cmd = [sys.executable, "-m", "nsm.cli", *self.args]
        if self.netns:
            cmd = [sys.executable, "-m", "nsm.lab.netns_exec", self.netns, "--", *cmd]
        out = (os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
               if self.log_path else asyncio.subprocess.DEVNULL)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *cmd, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
                start_new_session=True)
        finally:
            if self.log_path:
                os.close(out)
        try:
            await wait_serving(self.url, timeout=timeout, proc=self.proc)
        except BaseException:
            await self.stop()
            raise
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    async def stop(self, timeout: float = 5.0) -> int | None:
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        return proc.returncode

    async def kill(self) -> None:
        """Kill without a chance to clean up (to test healing and expiry)."""
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()
        self.proc = None


async def wait_serving(url: str, *, timeout: float = 15.0,
                       proc: asyncio.subprocess.Process | None = None) -> None:
    """Wait until the gRPC health service at ``url`` says SERVING."""
    deadline = time.monotonic() + timeout
    channel = dial(url)
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if proc is not None and proc.returncode is not None:
                raise Unavailable(f"process exited with {proc.returncode} before serving {url}")
            try:
                resp = await stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise Unavailable(f"{url} is not serving after {timeout:.0f}s")
            await asyncio.sleep(0.05)
    finally:
        await channel.close()

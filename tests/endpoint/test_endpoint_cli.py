"""``nsm nse`` as a real subprocess (``python -m nsm.endpoint.main``)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nsm.api.registry_pb2 import NetworkServiceEndpoint
from nsm.registry.client import RegistryClient
from nsm.registry.main import RegistryDaemon
from nsm.transport import dial

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parents[2]


def env() -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("NSM_")}
    clean["NSM_INSECURE"] = "1"  # the registry of these tests is plaintext
    clean["PYTHONPATH"] = str(ROOT) + os.pathsep + clean.get("PYTHONPATH", "")
    return clean


async def spawn(*args: str, extra_env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nsm.endpoint.main", *args, cwd=ROOT, env={**env(), **(extra_env or {})},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


@contextlib.asynccontextmanager
async def running(*args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    proc = await spawn(*args)
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def base(tmp_path: Path, **override: str) -> list[str]:
    flags = {"--name": "nse-cli", "--service": "blue", "--cidr": "10.2.0.0/24",
             "--listen": f"unix://{tmp_path}/nse.sock", "--registry": f"unix://{tmp_path}/reg.sock"}
    flags.update(override)
    return [x for k, v in flags.items() for x in (k, v)]


@pytest.mark.parametrize(("override", "message"), [
    ({"--cidr": "10.0.0.0/33"}, "invalid CIDR '10.0.0.0/33'"),
    ({"--cidr": "banana"}, "CIDR 'banana'"),
    ({"--netns": "/nonexistent/netns"}, "network namespace /nonexistent/netns does not exist"),
    ({"--listen": "http://x:1"}, "unsupported URL"),
    ({"--registry": "tcp://nohost"}, "tcp URL needs host and port"),
    ({"--name": "n" * 254}, "at most 253"),
])
async def test_bad_input_exits_2_with_a_clear_message(tmp_path: Path, override: dict[str, str],
                                                      message: str) -> None:
    proc = await spawn(*base(tmp_path, **override))
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    text = err.decode()
    assert proc.returncode == 2, text
    assert text.startswith("nsm nse: ") and message in text
    assert "Traceback" not in text and len(text.strip().splitlines()) == 1


async def test_bad_flags_exit_2(tmp_path: Path) -> None:
    proc = await spawn("--service", "blue")
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 2 and b"required" in err


async def test_flags_come_from_the_environment_too(tmp_path: Path) -> None:
    proc = await spawn(extra_env={"NSM_NAME": "x", "NSM_SERVICE": "a,b", "NSM_CIDR": "nope/8",
                                  "NSM_LISTEN": f"unix://{tmp_path}/n.sock", "NSM_REGISTRY": "tcp://h:1"})
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 2 and b"CIDR 'nope/8'" in err


async def wait_for(check, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def test_registers_then_sigterm_unregisters_and_exits_0(tmp_path: Path) -> None:
    async with RegistryDaemon([f"unix://{tmp_path}/reg.sock"], grace=0.1) as daemon:
        channel = dial(daemon.url)
        reg = RegistryClient(channel, timeout=5)
        try:
            async with running(*base(tmp_path), "--label", "app=x", "--expiry", "30s") as proc:
                query = NetworkServiceEndpoint(name="nse-cli")

                async def registered() -> bool:
                    return bool(await reg.find_nse(query))

                await wait_for(registered)
                nse = (await reg.find_nse(query))[0]
                assert dict(nse.network_service_labels["blue"].labels) == {"app": "x"}
                proc.send_signal(signal.SIGTERM)
                _, err = await asyncio.wait_for(proc.communicate(), 15)
                assert proc.returncode == 0, err.decode()
                assert await reg.find_nse(query) == []
                assert b"Traceback" not in err
        finally:
            await channel.close()


async def test_unreachable_registry_is_retried_and_sigint_stops_it(tmp_path: Path) -> None:
    async with running(*base(tmp_path)) as proc:
        assert proc.stderr is not None
        deadline = time.monotonic() + 15
        seen = b""
        while b"retrying" not in seen:
            assert time.monotonic() < deadline, seen.decode()
            seen += await asyncio.wait_for(proc.stderr.readline(), 15)
        proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.wait(), 15)
        assert proc.returncode == 0
        assert not (tmp_path / "nse.sock").exists()

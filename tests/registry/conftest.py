"""Fixtures for the registry tests: real gRPC registries on unix sockets in ``tmp_path``.

Test modules import names from here only under ``TYPE_CHECKING``; at run time everything
comes in as a fixture.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from nsm.lab import harness
from nsm.registry.client import RegistryClient
from nsm.registry.main import RegistryDaemon
from nsm.registry.memory import MemoryStore
from nsm.transport import dial


@dataclass
class Harness:
    """One running registry and a client connected to it."""

    daemon: RegistryDaemon
    channel: grpc.aio.Channel
    client: RegistryClient

    @property
    def nse_store(self) -> MemoryStore[Any]:
        store = self.daemon.registry.nse_store
        assert isinstance(store, MemoryStore)
        return store

    @property
    def ns_store(self) -> MemoryStore[Any]:
        store = self.daemon.registry.ns_store
        assert isinstance(store, MemoryStore)
        return store


StartRegistry = Callable[..., Awaitable[Harness]]


@pytest.fixture(autouse=True)
async def no_leaked_tasks() -> AsyncIterator[None]:
    """Every test leaves no asyncio task of its own behind."""
    async with harness.no_leaked_tasks():
        yield


@pytest.fixture
async def start_registry(tmp_path: Path) -> AsyncIterator[StartRegistry]:
    """``await start_registry(expiry=..., sock=...)`` starts a registry (stopped at teardown)."""
    async with contextlib.AsyncExitStack() as stack:
        count = 0

        async def start(sock: str | None = None, **kwargs: Any) -> Harness:
            nonlocal count
            count += 1
            path = sock or str(tmp_path / f"r{count}.sock")
            daemon = await stack.enter_async_context(
                RegistryDaemon([f"unix://{path}"], grace=0.2, **kwargs)
            )
            channel = dial(daemon.url)
            stack.push_async_callback(channel.close)
            return Harness(daemon, channel, RegistryClient(channel, timeout=5.0))

        yield start


@pytest.fixture
async def reg(start_registry: StartRegistry) -> Harness:
    """A registry with the default 60 s expiry."""
    return await start_registry()


#: The root conftest's ``eventually`` fixture (:func:`nsm.lab.harness.eventually`).
Eventually = harness.Eventually

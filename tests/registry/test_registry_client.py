"""Client helpers: Watch and NseRefresher against real registries."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from nsm.api.registry_pb2 import NetworkServiceEndpoint, NetworkServiceLabels
from nsm.errors import InvalidArgument, Unavailable
from nsm.registry.client import NseRefresher, RegistryClient, Watch
from nsm.registry.matching import expiration
from nsm.transport import dial

if TYPE_CHECKING:
    from conftest import Eventually, Harness, StartRegistry

pytestmark = pytest.mark.timeout(30)


def endpoint(name: str = "", url: str = "unix:///run/nse.sock") -> NetworkServiceEndpoint:
    return NetworkServiceEndpoint(
        name=name,
        network_service_names=["svc"],
        network_service_labels={"svc": NetworkServiceLabels(labels={"app": "x"})},
        url=url,
    )


class Recorder:
    """Collects every event of a watch in the background."""

    def __init__(self, watch: Watch[NetworkServiceEndpoint]) -> None:
        self.watch = watch
        self.events: list[tuple[str, bool]] = []
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for nse, deleted in self.watch:
            self.events.append((nse.name, deleted))

    async def close(self) -> None:
        self.watch.cancel()
        await self.task


async def test_watch_cancel_ends_iteration(reg: Harness, eventually: Eventually) -> None:
    await reg.client.register_nse(endpoint("e1"))
    watch = reg.client.watch_nse()
    async with watch:
        assert (await anext(watch))[0].name == "e1"
    with pytest.raises(StopAsyncIteration):
        await anext(watch)
    watch.cancel()  # idempotent
    await eventually(lambda: reg.nse_store.watcher_count == 0)


async def test_watch_cancel_wakes_a_blocked_reader(reg: Harness, eventually: Eventually) -> None:
    recorder = Recorder(reg.client.watch_nse())
    await eventually(lambda: reg.nse_store.watcher_count == 1)
    await asyncio.wait_for(recorder.close(), 3)  # the reader ends without an error
    await eventually(lambda: reg.nse_store.watcher_count == 0)


async def test_calls_to_a_missing_registry_raise_unavailable(tmp_path: Path) -> None:
    channel = dial(f"unix://{tmp_path}/nothing.sock")
    try:
        client = RegistryClient(channel, timeout=2)
        with pytest.raises(Unavailable):
            await client.find_nse()
        with pytest.raises(Unavailable):
            await client.register_nse(endpoint("e1"))
        with pytest.raises(Unavailable):
            await anext(client.watch_nse())
    finally:
        await channel.close()


async def test_refresher_keeps_the_nse_alive_then_unregisters(
    start_registry: StartRegistry,
) -> None:
    reg = await start_registry(expiry=0.5)
    recorder = Recorder(reg.client.watch_nse())
    refresher = NseRefresher(reg.client, endpoint())  # no name: the registry makes one up
    async with refresher:
        name = refresher.name
        assert name.startswith("nse-")
        assert expiration(refresher.nse) == pytest.approx(time.time() + 0.5, abs=0.2)
        await asyncio.sleep(1.6)  # more than three lifetimes
        assert [e.name for e in await reg.client.find_nse()] == [name]
        assert expiration(refresher.nse) > time.time() + 0.2  # type: ignore[operator]
    await asyncio.sleep(0.1)
    await recorder.close()
    assert await reg.client.find_nse() == []
    assert recorder.events[-1] == (name, True)
    assert all(not deleted for _, deleted in recorder.events[:-1])  # never expired meanwhile
    assert len(recorder.events) >= 1 + 4  # the first registration and several refreshes


async def test_refresher_asks_for_its_own_expiry(reg: Harness) -> None:
    async with NseRefresher(reg.client, endpoint("e1"), expiry=0.3) as refresher:
        assert expiration(refresher.nse) == pytest.approx(time.time() + 0.3, abs=0.1)
        await asyncio.sleep(0.8)
        assert [e.name for e in await reg.client.find_nse()] == ["e1"]
    assert await reg.client.find_nse() == []


async def test_refresher_survives_a_registry_restart(
    start_registry: StartRegistry, tmp_path: Path, eventually: Eventually
) -> None:
    sock = str(tmp_path / "restart.sock")
    first = await start_registry(sock=sock, expiry=0.6)
    refresher = NseRefresher(first.client, endpoint("e1"), min_backoff=0.05, max_backoff=0.2)
    async with refresher:
        await first.daemon.stop()
        await asyncio.sleep(0.4)  # a couple of failed refreshes
        second = await start_registry(sock=sock, expiry=0.6)
        assert len(second.nse_store) == 0
        await eventually(lambda: len(second.nse_store) == 1, timeout=5)
        assert [e.name for e in await second.client.find_nse()] == ["e1"]


@pytest.mark.parametrize("on_reconnect", [True, False])
async def test_refresher_registers_again_as_soon_as_a_restarted_registry_is_back(
    start_registry: StartRegistry, tmp_path: Path, eventually: Eventually, on_reconnect: bool
) -> None:
    """A long lifetime (refresh only every 20 s): the registration comes back within a few
    seconds of the restart because the channel reconnected, not at the next refresh."""
    sock = str(tmp_path / "back.sock")
    first = await start_registry(sock=sock, expiry=60)
    refresher = NseRefresher(first.client, endpoint("e1"), reregister_on_reconnect=on_reconnect)
    async with refresher:
        await first.daemon.stop()
        second = await start_registry(sock=sock, expiry=60)
        assert len(second.nse_store) == 0
        started = time.monotonic()
        if on_reconnect:
            await eventually(lambda: len(second.nse_store) == 1, timeout=6)
            assert time.monotonic() - started < 6
        else:  # the control: without it, nothing before the next refresh
            await asyncio.sleep(4)
            assert len(second.nse_store) == 0


async def test_refresher_start_waits_for_the_registry(
    start_registry: StartRegistry, tmp_path: Path
) -> None:
    sock = str(tmp_path / "late.sock")
    channel = dial(f"unix://{sock}")
    try:
        refresher = NseRefresher(
            RegistryClient(channel, timeout=1), endpoint("e1"), min_backoff=0.05, max_backoff=0.2
        )
        starting = asyncio.create_task(refresher.start())
        await asyncio.sleep(0.3)
        assert not starting.done()
        reg = await start_registry(sock=sock)
        registered = await asyncio.wait_for(starting, 5)
        assert registered.name == "e1"
        assert [e.name for e in await reg.client.find_nse()] == ["e1"]
        await refresher.stop()
        assert await reg.client.find_nse() == []
    finally:
        await channel.close()


async def test_refresher_rejects_an_invalid_nse_at_once(reg: Harness) -> None:
    refresher = NseRefresher(reg.client, endpoint("e1", url="bogus"))
    with pytest.raises(InvalidArgument):
        await asyncio.wait_for(refresher.start(), 3)
    await refresher.stop()  # nothing to stop


async def test_refresher_stop_with_registry_gone_does_not_hang(
    start_registry: StartRegistry,
) -> None:
    reg = await start_registry()
    refresher = NseRefresher(reg.client, endpoint("e1"), unregister_timeout=0.5)
    await refresher.start()
    await reg.daemon.stop()
    started = time.monotonic()
    await refresher.stop()  # logs the failed unregister
    assert time.monotonic() - started < 2


async def test_refresher_stop_is_prompt_and_cancels_its_task(reg: Harness) -> None:
    refresher = NseRefresher(reg.client, endpoint("e1"))
    await refresher.start()
    started = time.monotonic()
    await refresher.stop()
    await refresher.stop()  # idempotent
    assert time.monotonic() - started < 1
    with contextlib.suppress(RuntimeError):
        assert refresher.name == "e1"


async def test_manager_replay_registers_services_and_live_endpoints_only(reg: Harness) -> None:
    """What a manager replays after its registry reconnects: every service it forwarded and
    every endpoint whose record has not expired (a dead endpoint is not brought back)."""
    from nsm.api.registry_pb2 import NetworkService
    from nsm.manager.proxy import Replay

    replay = Replay(reg.client)
    replay.services["svc"] = NetworkService(name="svc", payload="ETHERNET")
    live, dead = endpoint("live"), endpoint("dead")
    live.expiration_time.seconds = int(time.time() + 60)
    dead.expiration_time.seconds = int(time.time() - 1)
    replay.endpoints.update({"live": live, "dead": dead})
    assert await replay.replay() == (1, 1)
    assert [e.name for e in await reg.client.find_nse()] == ["live"]
    svc = await reg.client.get_ns("svc")
    assert svc is not None and svc.payload == "ETHERNET"
    assert set(replay.endpoints) == {"live"}  # the expired one is forgotten

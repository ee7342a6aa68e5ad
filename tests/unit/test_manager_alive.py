"""The manager's watch of the endpoints registered through it (:mod:`nsm.manager.alive`), with
real gRPC servers on unix sockets standing for endpoints: one that goes away is removed after
the grace period; one back within it, one never reached, one that unregistered are not; a
Register during a removal waits for it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from nsm.manager.alive import EndpointLiveness
from nsm.transport import Server

pytestmark = pytest.mark.timeout(60)

GRACE = 0.5


class Gone:
    """``on_gone``: records each removal (name, when); ``hold`` makes a removal wait."""

    def __init__(self) -> None:
        self.removed: list[tuple[str, float]] = []
        self.hold: asyncio.Event | None = None

    async def __call__(self, name: str) -> None:
        if self.hold is not None:
            await self.hold.wait()
        self.removed.append((name, time.monotonic()))

    def names(self) -> list[str]:
        return [n for n, _ in self.removed]


async def serving(path: Path) -> Server:
    server = Server([f"unix://{path}"])
    await server.start()
    return server


async def watched_then_stopped(alive: EndpointLiveness, name: str, path: Path) -> None:
    """An endpoint at ``path`` seen alive by ``alive``, then gone (its server stopped)."""
    server = await serving(path)
    alive.watch(name, f"unix://{path}")
    await asyncio.sleep(0.3)
    await server.stop(grace=None)


async def until(check, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not reached"
        await asyncio.sleep(0.02)


async def test_an_endpoint_that_goes_away_is_removed_after_the_grace(tmp_path: Path) -> None:
    gone = Gone()
    alive = EndpointLiveness(gone, grace=GRACE)
    a, b = await serving(tmp_path / "a.sock"), await serving(tmp_path / "b.sock")
    try:
        alive.watch("a", f"unix://{tmp_path / 'a.sock'}")
        alive.watch("b", f"unix://{tmp_path / 'b.sock'}")
        await asyncio.sleep(0.3)
        assert alive.watched() == ["a", "b"]
        stopped = time.monotonic()
        await a.stop(grace=None)
        await until(lambda: gone.names() == ["a"])
        took = gone.removed[0][1] - stopped
        assert GRACE <= took < GRACE + 1.5, took
        assert alive.watched() == ["b"]
        await asyncio.sleep(GRACE + 0.3)
        assert gone.names() == ["a"]  # b is alive
    finally:
        await alive.shutdown()
        await b.stop()
    assert alive.watched() == []


async def test_an_endpoint_back_within_the_grace_stays(tmp_path: Path) -> None:
    gone = Gone()
    alive = EndpointLiveness(gone, grace=1.5)
    path = tmp_path / "r.sock"
    await watched_then_stopped(alive, "r", path)
    await asyncio.sleep(0.2)
    server = await serving(path)  # restarted at once
    try:
        await asyncio.sleep(2.0)
        assert gone.names() == [] and alive.watched() == ["r"]
    finally:
        await alive.shutdown()
        await server.stop()


async def test_an_endpoint_never_reached_or_unregistered_is_left_alone(tmp_path: Path) -> None:
    gone = Gone()
    alive = EndpointLiveness(gone, grace=0.2, give_up=0.6)
    (tmp_path / "never.sock").touch()  # nobody listens there: this manager cannot tell
    alive.watch("never", f"unix://{tmp_path / 'never.sock'}")
    path = tmp_path / "u.sock"
    server = await serving(path)
    try:
        alive.watch("u", f"unix://{path}")
        await asyncio.sleep(0.3)
        alive.forget("u")  # it unregistered (then stops)
        await server.stop(grace=None)
        await asyncio.sleep(1.0)
        assert gone.names() == [] and alive.watched() == []
    finally:
        await alive.shutdown()


async def test_a_register_during_a_removal_waits_for_it(tmp_path: Path) -> None:
    """The endpoint's successor registers while the dead one is being unregistered: the new
    registration must come after that removal (never be undone by it), and be watched."""
    gone = Gone()
    gone.hold = asyncio.Event()
    alive = EndpointLiveness(gone, grace=0.2)
    path = tmp_path / "s.sock"
    await watched_then_stopped(alive, "s", path)
    await asyncio.sleep(0.6)  # past the grace: the removal waits on hold
    server = await serving(path)
    try:
        settled = asyncio.create_task(alive.settle("s"))
        await asyncio.sleep(0.2)
        assert not settled.done()
        gone.hold.set()
        await asyncio.wait_for(settled, 2)
        assert gone.names() == ["s"]
        alive.watch("s", f"unix://{path}")  # the successor's registration
        await asyncio.sleep(0.6)
        assert gone.names() == ["s"] and alive.watched() == ["s"]
    finally:
        await alive.shutdown()
        await server.stop()

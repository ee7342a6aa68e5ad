"""MonitorNext (a passthrough hop watches its next hop) and the Monitor's state changes, with
real in-process gRPC next hops (``Begin → UpdatePath → Monitor`` served on a unix socket) and
this hop's chain ``Begin → UpdatePath → Timeout → Monitor → MonitorNext → Connect``."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from nsm.api import connection_pb2 as C
from nsm.api.connection_pb2 import Connection, ConnectionEvent, MonitorScopeSelector, PathSegment
from nsm.api.networkservice_pb2 import NetworkServiceRequest
from nsm.chain import Chain
from nsm.elements.begin import Begin
from nsm.elements.connect import Connect
from nsm.elements.monitor import Monitor
from nsm.elements.monitornext import MonitorNext
from nsm.elements.timeout import Timeout
from nsm.elements.updatepath import UpdatePath, ts
from nsm.role import monitor_service, network_service
from nsm.transport import Channels, Server

pytestmark = pytest.mark.timeout(60)


class NextHop:
    """A next hop on a unix socket: ``Begin → UpdatePath(next) → Monitor``. ``stop`` and
    ``start`` again keep its state (a stream that broke, not a daemon that forgot); ``fresh``
    forgets everything (a restarted daemon)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.server: Server | None = None
        self.fresh()

    def fresh(self) -> None:
        self.monitor = Monitor()
        self.chain = Chain([Begin(), UpdatePath("next"), self.monitor], name="next")

    async def start(self) -> None:
        self.server = Server([self.url])
        self.server.add(network_service(self.chain), monitor_service(self.monitor))
        await self.server.start()

    async def stop(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            await server.stop(None)


class Hop:
    """This hop: its chain to the next hop and a subscription to its own monitor."""

    def __init__(self, next_url: str) -> None:
        self.channels = Channels()
        self.monitor = Monitor()
        self.element = MonitorNext(self.channels, self.monitor, name="me", min_delay=0.05,
                                   max_delay=0.2)
        self.chain = Chain([Begin(), UpdatePath("me"), Timeout(), self.monitor, self.element,
                            Connect(self.channels, url=lambda ctx, req: next_url)], name="me")
        self.events: asyncio.Queue[ConnectionEvent] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None

    async def subscribe(self, selector: MonitorScopeSelector | None = None) -> ConnectionEvent:
        stream = self.monitor.MonitorConnections(selector or MonitorScopeSelector(), None)  # type: ignore[arg-type]
        initial = await anext(stream)

        async def read() -> None:
            async for event in stream:
                await self.events.put(event)

        self._reader = asyncio.create_task(read())
        return initial

    async def request(self, conn_id: str, *, lifetime: float = 60.0) -> Connection:
        r = NetworkServiceRequest(connection=Connection(id=conn_id, network_service="svc"))
        r.connection.path.path_segments.add(name="client", id=conn_id,
                                            expires=ts(time.time() + lifetime))
        return await self.chain.request(r)

    async def refresh(self, conn: Connection) -> Connection:
        return await self.chain.request(NetworkServiceRequest(connection=conn))

    async def event(self, timeout: float = 2.0) -> tuple[int, Connection]:
        event = await asyncio.wait_for(self.events.get(), timeout)
        (conn,) = event.connections.values()
        return event.type, conn

    async def no_event(self, wait: float = 0.5) -> None:
        with contextlib.suppress(TimeoutError):
            event = await asyncio.wait_for(self.events.get(), wait)
            raise AssertionError(f"unexpected event {event}")

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        await self.chain.shutdown()
        await self.channels.close()


@pytest_asyncio.fixture
async def hops(nsm_run_prefix: str) -> AsyncIterator[tuple[Hop, NextHop]]:
    work = tempfile.mkdtemp(prefix=f"{nsm_run_prefix}-mn-")
    nxt = NextHop(f"unix://{work}/next.sock")
    await nxt.start()
    hop = Hop(nxt.url)
    try:
        yield hop, nxt
    finally:
        await hop.close()
        await nxt.stop()
        shutil.rmtree(work, ignore_errors=True)
        assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("monitornext:")]


async def eventually(check, timeout: float = 3.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not reached in time"
        await asyncio.sleep(0.02)


def next_id(conn: Connection) -> str:
    """The next hop's segment id of a connection as this hop returned it (index = caller's)."""
    return conn.path.path_segments[conn.path.index + 2].id


def own_id(conn: Connection) -> str:
    return conn.path.path_segments[conn.path.index + 1].id


async def test_set_state_publishes_one_update_per_change() -> None:
    monitor = Monitor()
    chain = Chain([Begin(), UpdatePath("me"), monitor])
    conn = await chain.request(NetworkServiceRequest(connection=Connection(id="c")))
    stream = monitor.MonitorConnections(MonitorScopeSelector(), None)  # type: ignore[arg-type]
    assert (await anext(stream)).type == C.INITIAL_STATE_TRANSFER
    assert not monitor.set_state("unknown", C.DOWN)
    assert monitor.set_state(conn.id, C.DOWN)
    assert not monitor.set_state(conn.id, C.DOWN)
    event = await asyncio.wait_for(anext(stream), 1)
    assert event.type == C.UPDATE and event.connections[conn.id].state == C.DOWN
    # A successful Request is UP again, whatever the caller sent.
    conn.state = C.DOWN
    again = await chain.request(NetworkServiceRequest(connection=conn))
    assert again.state == C.UP and monitor.state(conn.id) == C.UP
    await stream.aclose()


async def test_the_next_hops_death_is_one_down_and_a_refresh_after_its_restart_is_up(hops) -> None:
    hop, nxt = hops
    conn = await hop.request("c1")
    assert (await hop.subscribe()).connections[own_id(conn)].state == C.UP
    await eventually(lambda: nxt.monitor.watcher_count() == 1)
    t0 = time.monotonic()
    await nxt.stop()  # the next hop dies: its stream breaks
    kind, down = await hop.event()
    print(f"DOWN {1000 * (time.monotonic() - t0):.0f} ms after the next hop died")
    assert (kind, down.state) == (C.UPDATE, C.DOWN)
    # This hop's view: its own segment id and index.
    assert down.id == own_id(conn) and down.path.index == 1
    assert down.path.path_segments[0].id == "c1"
    await hop.no_event(0.6)  # reconnect attempts publish nothing more
    nxt.fresh()
    await nxt.start()  # restarted: it knows nothing; the connection stays DOWN ...
    await eventually(lambda: nxt.monitor.watcher_count() == 1)
    await hop.no_event(0.3)
    conn = await hop.refresh(conn)  # ... until a refresh gets through
    kind, up = await hop.event()
    assert (kind, up.state) == (C.UPDATE, C.UP) and conn.state == C.UP
    await hop.chain.close(conn)
    kind, gone = await hop.event()
    while kind == C.UPDATE:  # the refresh's own UPDATE (when the next hop's UP came first)
        assert gone.state == C.UP
        kind, gone = await hop.event()
    assert kind == C.DELETE and gone.id == own_id(conn)
    assert hop.element.streams() == 0
    await eventually(lambda: nxt.monitor.watcher_count() == 0)


async def test_the_next_hop_reporting_down_up_and_delete(hops) -> None:
    hop, nxt = hops
    conn = await hop.request("c1")
    await hop.subscribe()
    await eventually(lambda: nxt.monitor.watcher_count() == 1)
    assert nxt.monitor.set_state(next_id(conn), C.DOWN)
    kind, down = await hop.event()
    assert (kind, down.state, down.id) == (C.UPDATE, C.DOWN, own_id(conn))
    assert nxt.monitor.set_state(next_id(conn), C.UP)
    kind, up = await hop.event()
    assert (kind, up.state) == (C.UPDATE, C.UP)
    # The next hop closes it on its own (its expiry): DOWN here, once.
    await nxt.chain.close_id(own_id(conn))
    kind, down = await hop.event()
    assert (kind, down.state) == (C.UPDATE, C.DOWN)
    await hop.no_event(0.3)
    await hop.chain.close(conn)
    assert (await hop.event())[0] == C.DELETE


async def test_our_own_close_is_a_delete_not_a_down(hops) -> None:
    hop, nxt = hops
    conn = await hop.request("c1")
    await hop.subscribe()
    await eventually(lambda: nxt.monitor.watcher_count() == 1)
    await hop.chain.close(conn)
    kind, gone = await hop.event()
    assert kind == C.DELETE and gone.state == C.UP
    await hop.no_event(0.3)
    assert not nxt.monitor.connections


async def test_a_stream_back_to_a_next_hop_that_still_has_the_connection_restores_up(hops) -> None:
    hop, nxt = hops
    conn = await hop.request("c1")
    await hop.subscribe()
    await eventually(lambda: nxt.monitor.watcher_count() == 1)
    await nxt.stop()  # the stream breaks, but the next hop keeps its state
    assert (await hop.event())[1].state == C.DOWN
    await nxt.start()
    kind, up = await hop.event()  # its snapshot shows the connection UP
    assert (kind, up.state, up.id) == (C.UPDATE, C.UP, own_id(conn))
    await hop.chain.close(conn)


async def test_expiry_is_a_delete_and_stops_watching(hops) -> None:
    hop, nxt = hops
    await hop.request("c1", lifetime=0.5)
    await hop.subscribe()
    assert hop.element.streams() == 1
    kind, _ = await hop.event(3.0)
    assert kind == C.DELETE
    assert hop.element.streams() == 0 and hop.element.watched() == 0
    await eventually(lambda: nxt.monitor.watcher_count() == 0 and not nxt.monitor.connections)


async def test_200_connections_to_one_next_hop_share_one_stream_and_leave_nothing(hops) -> None:
    hop, nxt = hops
    conns = await asyncio.gather(*(hop.request(f"c{i}") for i in range(200)))
    await hop.subscribe()
    assert hop.element.streams() == 1 and hop.element.watched() == 200
    await eventually(lambda: nxt.monitor.watcher_count() == 1)
    await asyncio.sleep(0.2)
    assert nxt.monitor.watcher_count() == 1
    assert len([t for t in asyncio.all_tasks() if t.get_name().startswith("monitornext:")]) == 1
    # The next hop dies: each connection is DOWN, once.
    await nxt.stop()
    downs = [await hop.event() for _ in range(200)]
    assert {c.id for _, c in downs} == {own_id(c) for c in conns}
    assert all(kind == C.UPDATE and c.state == C.DOWN for kind, c in downs)
    await hop.no_event(0.3)
    nxt.fresh()
    await nxt.start()
    await eventually(lambda: nxt.monitor.watcher_count() == 1)  # the stream is back
    conns = await asyncio.gather(*(hop.refresh(c) for c in conns))
    assert nxt.monitor.watcher_count() == 1 and len(nxt.monitor.connections) == 200
    await asyncio.gather(*(hop.chain.close(c) for c in conns))
    assert hop.element.streams() == 0 and hop.element.watched() == 0
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("monitornext:")]
    await eventually(lambda: nxt.monitor.watcher_count() == 0)


async def test_a_selector_on_a_segment_id_sees_only_that_connection(hops) -> None:
    hop, nxt = hops
    a = await hop.request("a")
    b = await hop.request("b")
    initial = await hop.subscribe(MonitorScopeSelector(path_segments=[PathSegment(id="a")]))
    assert list(initial.connections) == [own_id(a)]
    assert nxt.monitor.set_state(next_id(b), C.DOWN)
    assert nxt.monitor.set_state(next_id(a), C.DOWN)
    _, down = await hop.event()
    assert down.id == own_id(a)
    await hop.no_event(0.3)
    for c in (a, b):
        await hop.chain.close(c)


async def test_each_next_hop_has_its_own_stream_closed_with_its_last_connection(hops) -> None:
    hop, nxt = hops
    other = NextHop(nxt.url.replace("next.sock", "other.sock"))
    await other.start()
    try:
        urls = {"a": nxt.url, "b": other.url, "a2": nxt.url}
        hop.chain = Chain([Begin(), UpdatePath("me"), hop.monitor, hop.element,
                           Connect(hop.channels, url=lambda ctx, req: urls[ctx.conn_id])])
        conns = {i: await hop.request(i) for i in urls}
        assert hop.element.streams() == 2 and hop.element.watched() == 3
        await eventually(lambda: nxt.monitor.watcher_count() == 1 == other.monitor.watcher_count())
        await hop.chain.close(conns["b"])
        assert hop.element.streams() == 1
        await eventually(lambda: other.monitor.watcher_count() == 0)
        await hop.chain.close(conns["a"])
        assert hop.element.streams() == 1 and nxt.monitor.watcher_count() == 1
        await hop.chain.close(conns["a2"])
        assert hop.element.streams() == 0
        await eventually(lambda: nxt.monitor.watcher_count() == 0)
    finally:
        await other.stop()

"""The heal element of the client chain with fakes: a fake manager as the chain's tail, its
monitor a real gRPC MonitorConnection server (so a stream breaks and reconnects for real), and a
fake data-plane probe. Then the built-in kernel probe in real namespaces.

What is checked: which trouble gives a REFRESH (same path) and which a RESELECT, that a manager
restart is never a reselect while the data plane is alive, one heal in flight per connection,
backoff between tries, one monitor stream for many connections, and that Close and shutdown
stop everything (no task left: the ``no_leaked_tasks`` fixture)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from nsm.api import connection_pb2_grpc
from nsm.api.connection_pb2 import (
    DELETE,
    DOWN,
    INITIAL_STATE_TRANSFER,
    RESELECT_REQUESTED,
    UP,
    UPDATE,
    Connection,
    ConnectionEvent,
    MonitorScopeSelector,
)
from nsm.api.networkservice_pb2 import NetworkServiceRequest
from nsm.chain import Chain, Ctx, Element, NextClose, NextRequest
from nsm.client.begin import ClientBegin
from nsm.client.chain import client_chain, new_request
from nsm.client.heal import (
    Heal,
    HealOptions,
    KernelProbe,
    Verdict,
    find_connection,
    interface_present,
    manager_id,
)
from nsm.client.notify import Notify, State, StateChange
from nsm.client.refresh import Refresh
from nsm.elements.monitor import matches
from nsm.errors import DeadlineExceeded, EndpointUnreachable, InvalidArgument, NsmError, Unavailable
from nsm.kernel import netns as nsns
from nsm.kernel.liveness import target_of
from nsm.kernel.netlink import Netlink
from nsm.mechanisms import kernel, netns_url
from nsm.transport import Server, dial

pytestmark = pytest.mark.timeout(60)

NAME = "nsc-h"


class FakeMonitor(connection_pb2_grpc.MonitorConnectionServicer):
    """The manager's monitor: its view of each connection (by its own segment id), streamed
    like :class:`nsm.elements.monitor.Monitor` does (snapshot, then UPDATE/DELETE)."""

    def __init__(self) -> None:
        self.conns: dict[str, Connection] = {}
        self.queues: set[asyncio.Queue[ConnectionEvent | None]] = set()
        self.opened = 0
        self.selectors: list[MonitorScopeSelector] = []

    async def MonitorConnections(self, request: MonitorScopeSelector,
                                 context: grpc.aio.ServicerContext) -> AsyncIterator[ConnectionEvent]:
        self.opened += 1
        self.selectors.append(request)
        queue: asyncio.Queue[ConnectionEvent | None] = asyncio.Queue()
        initial = ConnectionEvent(type=INITIAL_STATE_TRANSFER)
        for key, conn in self.conns.items():
            if matches(request, conn):
                initial.connections[key].CopyFrom(conn)
        self.queues.add(queue)
        try:
            yield initial
            while (event := await queue.get()) is not None:
                yield event
            await context.abort(grpc.StatusCode.UNAVAILABLE, "monitor broken")
        finally:
            self.queues.discard(queue)

    def publish(self, kind: int, conn: Connection) -> None:
        event = ConnectionEvent(type=kind)  # type: ignore[arg-type]
        event.connections[conn.id].CopyFrom(conn)
        for queue in self.queues:
            queue.put_nowait(event)

    def set_state(self, key: str, state: int) -> None:
        conn = self.conns[key]
        conn.state = state  # type: ignore[assignment]
        self.publish(UPDATE, conn)

    def delete(self, key: str) -> None:
        self.publish(DELETE, self.conns.pop(key))

    def break_streams(self) -> None:
        for queue in self.queues:
            queue.put_nowait(None)


class FakeManager(Element):
    """The chain's tail: answers like a manager (``answer``) and keeps its monitor's view.
    ``down``: every Request and Close fails (the manager is gone); ``fail``: the next ones fail;
    ``gate``: Requests wait for it; ``close_gate``: Closes wait for it (a silent hop on the
    way). Counts Requests in flight per connection."""

    def __init__(self, answer: Callable[[NetworkServiceRequest], Connection], monitor: FakeMonitor) -> None:
        self.answer = answer
        self.monitor = monitor
        self.requests: list[tuple[float, NetworkServiceRequest]] = []
        self.closes: list[Connection] = []
        self.fail: list[NsmError] = []
        self.down = False
        self.gate: asyncio.Event | None = None
        self.close_gate: asyncio.Event | None = None
        self.close_times: list[float] = []
        self.in_flight: dict[str, int] = {}
        self.most_in_flight = 0

    def sent(self, conn_id: str = "c1") -> list[NetworkServiceRequest]:
        return [r for _, r in self.requests if r.connection.id == conn_id]

    async def request(self, ctx: Ctx, request: NetworkServiceRequest, next: NextRequest) -> Connection:
        copy = NetworkServiceRequest()
        copy.CopyFrom(request)
        self.requests.append((time.monotonic(), copy))
        conn_id = request.connection.id
        self.in_flight[conn_id] = self.in_flight.get(conn_id, 0) + 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight[conn_id])
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.down:
                raise Unavailable("failed to connect to the manager")
            if self.fail:
                raise self.fail.pop(0)
            conn = self.answer(request)
            conn.state = UP
            view = Connection()
            view.CopyFrom(conn)
            view.id, view.path.index = manager_id(conn), 1
            self.monitor.conns[view.id] = view
            self.monitor.publish(UPDATE, view)
            return conn
        finally:
            self.in_flight[conn_id] -= 1

    async def close(self, ctx: Ctx, conn: Connection, next: NextClose) -> None:
        copy = Connection()
        copy.CopyFrom(conn)
        self.closes.append(copy)
        self.close_times.append(time.monotonic())
        if self.close_gate is not None:
            await self.close_gate.wait()
        if self.down:
            raise Unavailable("failed to connect to the manager")
        key = manager_id(conn)
        if key in self.monitor.conns:
            self.monitor.delete(key)


class FakeProbe:
    """A data-plane check whose answer the test sets (per connection id, default alive;
    ``blips``: that many next checks find it dead, as while a hop rebuilds the interface)."""

    def __init__(self) -> None:
        self.dead: dict[str, str] = {}
        self.blips: dict[str, int] = {}
        self.unknown = False
        self.calls = 0

    async def __call__(self, conn: Connection, timeout: float) -> Verdict:
        self.calls += 1
        await asyncio.sleep(0)
        if self.unknown:
            return Verdict(None, "nothing to check")
        if self.blips.get(conn.id):
            self.blips[conn.id] -= 1
            return Verdict(False, "interface nsm-1 is missing")
        reason = self.dead.get(conn.id)
        return Verdict(False, reason) if reason else Verdict(True)


@dataclass
class Rig:
    """One client chain with its heal element, fake manager, monitor server and probe."""

    changes: list[StateChange] = field(default_factory=list, kw_only=True)
    chain: Chain
    begin: ClientBegin
    heal: Heal
    tail: FakeManager
    monitor: FakeMonitor
    probe: FakeProbe
    url: str
    server: Server

    def kinds(self, conn_id: str = "c1") -> list[str]:
        """What each Request sent was: 'refresh' (a path kept) or 'reselect'/'fresh'."""
        out = []
        for r in self.tail.sent(conn_id):
            c = r.connection
            out.append("reselect" if c.state == RESELECT_REQUESTED else
                       "refresh" if len(c.path.path_segments) > 1 else "fresh")
        return out

    async def request(self, conn_id: str = "c1") -> Connection:
        return await self.chain.request(new_request(service="blue", name=NAME, conn_id=conn_id,
                                                    lifetime=60, mechanisms=[kernel("nsm-1", "file:///x")]))

    async def stop_manager(self) -> None:
        """The manager dies: its monitor streams break and its Requests fail."""
        self.tail.down = True
        await self.server.stop(0)

    async def start_manager(self, *, forget: bool = True) -> None:
        """The manager is back (a restarted one knows no connection)."""
        if forget:
            self.monitor.conns.clear()
        self.server = _server(self.url, self.monitor)
        await self.server.start()
        self.tail.down = False


def _server(url: str, monitor: FakeMonitor) -> Server:
    server = Server([url])
    connection_pb2_grpc.add_MonitorConnectionServicer_to_server(monitor, server.grpc)
    return server


@pytest.fixture
async def rig(tmp_path: Path, answer) -> AsyncIterator[Callable[..., Rig]]:  # type: ignore[no-untyped-def]
    """Makes chains with a heal element (``rig(probe=True, **options)``), shut down at the end."""
    made: list[Rig] = []
    channels: list[grpc.aio.Channel] = []
    counter = itertools.count()

    async def make(probe: bool = True, **options: object) -> Rig:
        url = f"unix://{tmp_path}/mgr{next(counter)}.sock"
        monitor = FakeMonitor()
        server = _server(url, monitor)
        await server.start()
        channel = dial(url)
        channels.append(channel)
        fake_probe = FakeProbe()
        opts: dict[str, object] = {"interval": 0.05, "timeout": 0.2, "min_backoff": 0.02,
                                   "max_backoff": 0.1, "try_timeout": 2.0, **options}
        heal = Heal(name=NAME, channel=lambda: channel,
                    options=HealOptions(liveness=probe, probe=fake_probe, **opts))  # type: ignore[arg-type]
        begin, notify, tail = ClientBegin(), Notify(), FakeManager(answer, monitor)
        chain = client_chain(name=NAME, lifetime=60, connect=tail, begin=begin, notify=notify,
                             refresh=Refresh(), heal=heal)
        r = Rig(chain, begin, heal, tail, monitor, fake_probe, url, server)
        notify.subscribe(r.changes.append)
        made.append(r)
        return r

    yield make  # type: ignore[misc]
    for r in made:
        await r.chain.shutdown()
        assert r.heal.watched() == 0 and r.heal.streams() == 0
        await r.server.stop(0)
    for channel in channels:
        await channel.close()


def states(r: Rig, conn_id: str = "c1") -> list[State]:
    """The states the connection went through."""
    return [c.state for c in r.changes if c.conn_id == conn_id]


async def settled(r: Rig, eventually, conn_id: str = "c1") -> None:  # type: ignore[no-untyped-def]
    """Until no heal is in flight and the last state is a good one."""
    await eventually(lambda: not r.heal.healing() and states(r, conn_id)[-1] in (
        State.HEALED, State.ESTABLISHED, State.REFRESHED))


async def streaming(r: Rig, eventually, count: int = 1) -> None:  # type: ignore[no-untyped-def]
    await eventually(lambda: r.heal.stream_up and len(r.monitor.queues) == count)


# -- control-plane trigger --------------------------------------------------------------------


async def test_down_with_a_live_data_plane_re_requests_the_same_path(rig, eventually) -> None:  # type: ignore[no-untyped-def]
    r = await rig()
    first = await r.request()
    await streaming(r, eventually)
    r.monitor.set_state(manager_id(first), DOWN)
    await eventually(lambda: State.HEALED in states(r))
    assert r.kinds() == ["fresh", "refresh"] and r.tail.closes == []
    again = r.tail.sent()[-1].connection
    assert manager_id(again) == manager_id(first) and again.network_service_endpoint_name == "nse-1"
    assert states(r) == [State.ESTABLISHED, State.DOWN, State.HEALED]
    down = r.changes[1]
    assert "DOWN" in down.reason and "data plane alive" in down.reason, down.reason
    await settled(r, eventually)
    assert r.probe.calls >= 1  # the data plane was checked before deciding


async def test_down_with_a_dead_data_plane_reselects(rig, eventually) -> None:  # type: ignore[no-untyped-def]
    r = await rig(interval=5.0)  # only the heal's own check
    first = await r.request()
    await streaming(r, eventually)
    r.probe.dead["c1"] = "no reply from 10.0.0.1"
    r.monitor.set_state(manager_id(first), DOWN)
    await eventually(lambda: State.HEALED in states(r))
    assert r.kinds() == ["fresh", "reselect"]
    assert [c.id for c in r.tail.closes] == ["c1"]  # the old path, closed first
    sent = r.tail.sent()[-1].connection
    assert sent.state == RESELECT_REQUESTED and not sent.HasField("mechanism")
    assert sent.network_service_endpoint_name == "nse-1"  # the old one, for the manager to try last
    assert len(sent.path.path_segments) == 1
    assert "no reply from 10.0.0.1" in r.changes[1].reason and "reselecting" in r.changes[1].reason
    healed = r.begin.last("c1")
    assert healed is not None and manager_id(healed) != manager_id(first)  # a new path


async def test_a_path_down_whose_re_request_fails_reselects(rig, eventually) -> None:  # type: ignore[no-untyped-def]
    """An endpoint process died while its namespace still answers pings: the same path cannot
    be requested again (the manager answers with an error), so the client reselects."""
    r = await rig()
    first = await r.request()
    await streaming(r, eventually)
    r.tail.fail = [EndpointUnreachable("endpoint nse-1 unreachable")]
    r.monitor.set_state(manager_id(first), DOWN)
    await eventually(lambda: State.HEALED in states(r))
    assert r.kinds() == ["fresh", "refresh", "reselect"]
    assert states(r) == [State.ESTABLISHED, State.DOWN, State.FAILED, State.HEALED]
    assert "re-requesting the same path failed" in r.changes[-1].reason


async def test_a_path_down_behind_a_restarting_hop_is_re_requested_not_reselected(rig, eventually) -> None:  # type: ignore[no-untyped-def]
    """A forwarder or a remote manager being restarted: re-requests fail for a while (no reason
    saying the endpoint is gone) and the data plane still answers, so the same path is asked
    for until it works again: the datapath is adopted, not torn down."""
    r = await rig()
    first = await r.request()
    await streaming(r, eventually)
    r.tail.fail = [Unavailable("forwarder restarting"), Unavailable("forwarder restarting")]
    r.monitor.set_state(manager_id(first), DOWN)
    await eventually(lambda: State.HEALED in states(r))
    assert r.kinds() == ["fresh", "refresh", "refresh", "refresh"]
    assert states(r) == [State.ESTABLISHED, State.DOWN, State.FAILED, State.FAILED, State.HEALED]


async def test_a_path_down_while_a_hop_on_the_way_restarts_is_re_requested_until_it_is_back(  # type: ignore[no-untyped-def]
        rig, eventually) -> None:
    """A manager or forwarder on the path restarts (the hops above report the path DOWN, and
    re-requesting fails while it is away: it cannot be reached, or does not answer in time),
    but the data plane is alive: the same path is re-requested until the hop is back, never
    reselected (a reselect would cut the traffic the kernel still carries)."""
    r = await rig()
    first = await r.request()
    await streaming(r, eventually)
    r.tail.fail = [Unavailable("tcp://node2:5001: failed to connect to all addresses"),
                   DeadlineExceeded("tcp://node2:5001: timed out"),
                   Unavailable("unix:///run/nsm/fwd.sock: connection refused")]
    r.monitor.set_state(manager_id(first), DOWN)
    await eventually(lambda: State.HEALED in states(r), timeout=10)
    assert r.kinds() == ["fresh", "refresh", "refresh", "refresh", "refresh"]
    assert states(r) == [State.ESTABLISHED, State.DOWN, State.FAILED, State.FAILED, State.FAILED,
                         State.HEALED]
    assert all("reselect" not in c.reason for c in r.changes), r.changes


async def test_delete_we_did_not_ask_for_heals(rig, eventually) -> None:  # type: ignore[no-untyped-def]
    r = await rig()
    first = await r.request()
    await streaming(r, eventually)
    r.monitor.delete(manager_id(first))  # e.g. the manager timed it out
    await eventually(lambda: State.HEALED in states(r))
    assert r.kinds() == ["fresh", "refresh"]
    assert "closed the connection" in r.changes[1].reason


async def test_without_a_probe_down_reselects_and_a_lost_stream_re_requests(rig, eventually) -> None:  # type: ignore[no-untyped-def]
    r = await rig(probe=False)
    first = await r.request()
    await streaming(r, eventually)
    r.monitor.set_state(manager_id(first), DOWN)
    await eventually(lambda: State.HEALED in states(r))
    assert r.kinds() == ["fresh", "reselect"] and "no data-plane check" in r.changes[1].reason
    await streaming(r, eventually)
    r.monitor.break_streams()
    await eventually(lambda: len(states(r)) == 5)
    assert r.kinds()[2:] == ["refresh"] and states(r)[3:] == [State.DOWN, State.HEALED]


async def test_a_manager_restart_re_requests_every_connection_and_never_reselects(rig, eventually) -> None:  # type: ignore[no-untyped-def]
    r = await rig()
    ids = [f"c{i}" for i in range(5)]
    for conn_id in ids:
        await r.request(conn_id)
    await streaming(r, eventually)
    await r.stop_manager()
    await asyncio.sleep(0.6)  # tries fail while it is away (several each, backoff 20..100 ms)
    assert not r.heal.stream_up
    for conn_id in ids:
        assert states(r, conn_id)[:2] == [State.ESTABLISHED, State.DOWN]
        assert "monitor stream broke" in next(c.reason for c in r.changes if c.state is State.DOWN
                                              and c.conn_id == conn_id)
        assert len(r.kinds(conn_id)) > 2  # retried
    await r.start_manager()
    for conn_id in ids:
        await settled(r, eventually, conn_id)
        assert states(r, conn_id)[-1] is State.HEALED
        assert set(r.kinds(conn_id)[1:]) == {"refresh"}, r.kinds(conn_id)  # never a reselect
    assert r.tail.closes == []
    await streaming(r, eventually)
    assert all(c.state == UP for c in r.monitor.conns.values()) and len(r.monitor.conns) == 5


async def test_a_stream_that_comes_back_with_the_connection_known_needs_no_request(rig, eventually) -> None:  # type: ignore[no-untyped-def]
    r = await rig()
    await r.request()
    await streaming(r, eventually)
    r.tail.gate = asyncio.Event()  # heal tries hang until the stream is back
    await r.stop_manager()
    await eventually(lambda: r.heal.healing() == ["c1"])
    await r.start_manager(forget=False)  # the manager still knows it (only the stream broke)
    await eventually(lambda: not r.heal.healing())
    r.tail.gate.set()
    await asyncio.sleep(0.2)
    assert r.kinds() == ["fresh", "refresh"]  # the one try in flight when the stream came back


async def test_a_connection_the_restarted_manager_does_not_know_is_re_requested(rig, eventually) -> None:  # type: ignore[no-untyped-def]
    r = await rig()
    await r.request()
    await streaming(r, eventually)
    r.monitor.conns.clear()  # forgotten, but no event said so: the next snapshot tells
    r.monitor.break_streams()
    await eventually(lambda: State.HEALED in states(r))
    assert r.kinds() == ["fresh", "refresh"]


async def test_up_again_at_the_manager_ends_a_heal(rig, eventually) -> None:  # type: ignore[no-untyped-def]
    r = await rig()
    first = await r.request()
    await streaming(r, eventually)
    r.tail.gate = asyncio.Event()
    r.monitor.set_state(manager_id(first), DOWN)
    await eventually(lambda: len(r.tail.sent()) == 2)
    r.tail.gate.set()  # the re-request goes through; the manager also shows it UP
    r.monitor.set_state(manager_id(first), UP)
    await settled(r, eventually)
    assert r.kinds() == ["fresh", "refresh"]


async def test_our_own_close_and_reselect_are_not_trouble(rig, eventually) -> None:  # type: ignore[no-untyped-def]
    r = await rig(interval=5.0)
    first = await r.request()
    await streaming(r, eventually)
    r.probe.dead["c1"] = "gone"
    r.monitor.set_state(manager_id(first), DOWN)
    await eventually(lambda: State.HEALED in states(r))
    r.probe.dead.clear()
    await asyncio.sleep(0.3)  # the DELETE of the old path has come and gone
    assert r.kinds() == ["fresh", "reselect"] and not r.heal.healing()
    await r.chain.close(Connection(id="c1"))
    await asyncio.sleep(0.3)
    assert r.kinds() == ["fresh", "reselect"]
    assert states(r)[-1] is State.CLOSED and r.heal.watched() == 0 and r.heal.streams() == 0


# -- data-plane trigger -----------------------------------------------------------------------


async def test_a_dead_data_plane_reselects_then_the_check_goes_on(rig, eventually) -> None:  # type: ignore[no-untyped-def]
    r = await rig()
    await r.request()
    await asyncio.sleep(0.2)
    assert r.kinds() == ["fresh"] and r.probe.calls >= 2  # checked every 50 ms, alive
    r.probe.dead["c1"] = "interface nsm-1 is down"
    await eventually(lambda: State.HEALED in states(r))
    r.probe.dead.clear()
    assert r.kinds() == ["fresh", "reselect"]
    assert "data plane: interface nsm-1 is down" in r.changes[1].reason
    calls = r.probe.calls
    await eventually(lambda: r.probe.calls >= calls + 2)  # checking the new path
    assert r.kinds() == ["fresh", "reselect"]


async def test_dead_data_plane_heals_keep_trying_with_backoff(rig, eventually) -> None:  # type: ignore[no-untyped-def]
    r = await rig(min_backoff=0.05, max_backoff=0.2)
    await r.request()
    r.tail.fail = [Unavailable("no endpoint")] * 6
    r.probe.dead["c1"] = "gone"
    await eventually(lambda: State.HEALED in states(r), timeout=10)
    r.probe.dead.clear()
    times = [t for t, req in r.tail.requests if req.connection.state == RESELECT_REQUESTED]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(gaps) == 6
    # 0.05, 0.1, 0.2, then capped at 0.2 (a sleep never ends early; room for a loaded machine)
    for gap, want in zip(gaps, [0.05, 0.1, 0.2, 0.2, 0.2, 0.2], strict=True):
        assert want * 0.9 < gap < want + 0.25, gaps
    went = states(r)
    assert went[:2] == [State.ESTABLISHED, State.DOWN] and went[-1] is State.HEALED
    assert went[2:-1] == [State.FAILED] * 6


async def test_one_heal_in_flight_per_connection(rig, eventually) -> None:  # type: ignore[no-untyped-def]
    r = await rig()
    first = await r.request()
    await streaming(r, eventually)
    r.tail.gate = asyncio.Event()
    r.monitor.set_state(manager_id(first), DOWN)
    await eventually(lambda: len(r.tail.sent()) == 2)  # the re-request hangs
    for _ in range(5):  # more trouble while the heal is in flight
        r.monitor.set_state(manager_id(first), DOWN)
        r.monitor.delete(manager_id(first))
        r.monitor.conns[manager_id(first)] = r.begin.last("c1")  # type: ignore[assignment]
    r.monitor.break_streams()
    await asyncio.sleep(0.3)
    assert len(r.tail.sent()) == 2 and r.heal.healing() == ["c1"]
    # The data plane dies while the re-request hangs (a hop gone for good, e.g. its node):
    # the re-request is given up for a reselect at once, still one try in flight.
    r.probe.dead["c1"] = "gone"
    await eventually(lambda: len(r.tail.sent()) == 3, timeout=1.0)  # not the try's 2 s timeout
    assert r.kinds() == ["fresh", "refresh", "reselect"] and r.heal.healing() == ["c1"]
    await asyncio.sleep(0.3)
    assert len(r.tail.sent()) == 3
    r.probe.dead.clear()
    r.tail.gate.set()
    await settled(r, eventually)
    assert r.tail.most_in_flight == 1
    assert states(r).count(State.DOWN) == 1


async def test_a_check_while_the_caller_re_requests_is_not_taken_for_a_dead_data_plane(  # type: ignore[no-untyped-def]
        rig, eventually) -> None:
    """The caller's own re-request makes a hop rebuild the interface (a restarted forwarder
    finds it changed): a check meanwhile finds it missing. That says nothing about the
    connection: no reselect, which would tear down the link just built."""
    r = await rig()
    await r.request()
    await streaming(r, eventually)
    r.tail.gate = asyncio.Event()
    refresh = asyncio.ensure_future(r.begin.refresh("c1"))
    try:
        await eventually(lambda: len(r.tail.sent()) == 2)
        r.probe.dead["c1"] = "interface nsm-1 is missing"  # the hop is rebuilding it
        calls = r.probe.calls
        await eventually(lambda: r.probe.calls >= calls + 3)  # checked meanwhile, every 50 ms
        r.probe.dead.clear()
    finally:
        r.tail.gate.set()
        await asyncio.wait([refresh], timeout=5)
    assert refresh.result() is not None
    calls = r.probe.calls
    await eventually(lambda: r.probe.calls >= calls + 3)
    assert r.kinds() == ["fresh", "refresh"] and r.tail.closes == []
    assert State.DOWN not in states(r)


async def test_a_blip_while_re_requesting_the_same_path_does_not_give_it_up(  # type: ignore[no-untyped-def]
        rig, eventually) -> None:
    """A heal re-requests the same path; one check meanwhile finds the interface missing (the
    re-request rebuilds it): the re-request goes on, no reselect. Dead twice in a row gives it
    up (``test_one_heal_in_flight_per_connection``)."""
    r = await rig()
    first = await r.request()
    await streaming(r, eventually)
    r.tail.gate = asyncio.Event()
    r.monitor.set_state(manager_id(first), DOWN)
    await eventually(lambda: len(r.tail.sent()) == 2)  # the re-request, held at the hop
    r.probe.blips["c1"] = 1
    await eventually(lambda: not r.probe.blips["c1"])
    calls = r.probe.calls
    await eventually(lambda: r.probe.calls >= calls + 3)
    r.tail.gate.set()
    await settled(r, eventually)
    assert r.kinds() == ["fresh", "refresh"] and r.tail.closes == []


async def test_a_reselect_does_not_wait_for_a_silent_hop_to_close(rig, eventually) -> None:  # type: ignore[no-untyped-def]
    """The old path's Close hangs (a hop on a node cut off answers nothing): the new Request
    goes out after ``reselect_close_timeout``, not after the try's timeout."""
    r = await rig(reselect_close_timeout=0.2, try_timeout=5.0)
    await r.request()
    await streaming(r, eventually)
    r.tail.close_gate = asyncio.Event()
    r.probe.dead["c1"] = "no reply from 10.0.0.1"
    await eventually(lambda: State.HEALED in states(r), timeout=2.0)
    r.probe.dead.clear()
    assert r.kinds() == ["fresh", "reselect"]
    sent = r.tail.requests[-1][0]
    assert 0.2 <= sent - r.tail.close_times[0] < 1.0
    r.tail.close_gate.set()


async def healing_in_vain(rig, eventually) -> Rig:  # type: ignore[no-untyped-def]
    """Two connections; c1's data plane is dead and every try to heal it fails."""
    r: Rig = await rig()
    await r.request()
    await r.request("c2")
    await streaming(r, eventually)
    r.tail.fail = [Unavailable("no endpoint")] * 1000
    r.probe.dead["c1"] = "gone"
    return r


async def test_close_stops_a_heal_and_everything_of_the_connection(rig, eventually) -> None:  # type: ignore[no-untyped-def]
    r = await healing_in_vain(rig, eventually)
    await eventually(lambda: len(r.tail.sent()) >= 4)
    await asyncio.wait_for(r.chain.close(Connection(id="c1")), 1.0)
    count = len(r.tail.sent())
    await asyncio.sleep(0.3)
    assert len(r.tail.sent()) == count and r.heal.healing() == [] and r.heal.watched() == 1
    assert r.heal.streams() == 1  # c2 is still watched
    r.tail.fail.clear()
    await r.chain.close(Connection(id="c2"))
    assert r.heal.watched() == 0 and r.heal.streams() == 0
    await eventually(lambda: not r.monitor.queues)  # the stream is cancelled at the manager too


async def test_hundreds_of_connections_share_one_stream(rig, eventually) -> None:  # type: ignore[no-untyped-def]
    r = await rig(interval=5.0)
    ids = [f"c{i}" for i in range(200)]
    conns = {i: await r.request(i) for i in ids}
    await streaming(r, eventually)
    assert r.monitor.opened == 1 and r.heal.watched() == 200
    (selector,) = r.monitor.selectors
    assert [(s.name, s.id) for s in selector.path_segments] == [(NAME, "")]
    r.monitor.set_state(manager_id(conns["c7"]), DOWN)
    await eventually(lambda: State.HEALED in states(r, "c7"))
    assert [i for i in ids if len(r.tail.sent(i)) > 1] == ["c7"]
    for i in ids[:100]:
        await r.chain.close(Connection(id=i))
    assert r.monitor.opened == 1 and r.heal.watched() == 100


async def test_shutdown_without_close_stops_every_task(rig, eventually) -> None:  # type: ignore[no-untyped-def]
    r = await healing_in_vain(rig, eventually)
    await eventually(lambda: r.heal.healing() == ["c1"])
    await r.chain.shutdown()
    assert r.heal.watched() == 0 and r.heal.streams() == 0 and r.heal.healing() == []


def test_options_are_checked() -> None:
    for bad in ({"interval": 0}, {"timeout": -1}, {"try_timeout": 0}, {"min_backoff": 2, "max_backoff": 1},
                {"concurrency": 0}):
        with pytest.raises(InvalidArgument):
            HealOptions(**bad)  # type: ignore[arg-type]


# -- adoption ---------------------------------------------------------------------------------


async def test_find_connection_gives_the_client_view_of_its_own_connection(rig, eventually) -> None:  # type: ignore[no-untyped-def]
    r = await rig()
    first = await r.request()
    await r.request("c2")
    channel = dial(r.url)
    try:
        found = await find_connection(channel, name=NAME, conn_id="c1")
        assert found is not None and found.id == "c1" and found.path.index == 0
        assert manager_id(found) == manager_id(first)
        assert await find_connection(channel, name=NAME, conn_id="c3") is None
        assert await find_connection(channel, name="other", conn_id="c1") is None
    finally:
        await channel.close()


# -- the built-in kernel probe, in real namespaces ---------------------------------------------


@pytest.fixture
async def pods(nsm_run_prefix: str) -> AsyncIterator[tuple[str, str, Netlink]]:
    """Two namespaces joined by a veth (client nsm-1 10.77.0.2/32 ↔ peer 10.77.0.1/32)."""
    import os

    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    names = [f"{nsm_run_prefix}-hc{i}-{time.monotonic_ns() % 100000}" for i in range(2)]
    paths = [nsns.create_netns(n) for n in names]
    netlink = Netlink()
    try:
        await netlink.create_veth("nsm-1", paths[0], "peer", paths[1])
        await netlink.setup_interface(paths[0], "nsm-1", addresses=["10.77.0.2/32"],
                                      routes=[("10.77.0.0/24", None)], mtu=None)
        await netlink.setup_interface(paths[1], "peer", addresses=["10.77.0.1/32"],
                                      routes=[("10.77.0.2/32", None)], mtu=None)
        await netlink.wait_ready(paths[0], "nsm-1")
        yield paths[0], paths[1], netlink
    finally:
        await netlink.close()
        for n in names:
            nsns.delete_netns(n)


def _client_conn(netns: str, *, dst: str = "10.77.0.1/32") -> Connection:
    conn = Connection(id="c1")
    conn.mechanism.CopyFrom(kernel("nsm-1", netns_url(netns)))
    conn.context.ip_context.src_ip_addrs.append("10.77.0.2/32")
    conn.context.ip_context.dst_ip_addrs.append(dst)
    return conn


async def test_kernel_probe_in_namespaces(pods) -> None:  # type: ignore[no-untyped-def]
    client, peer, netlink = pods
    probe = KernelProbe()
    target = target_of(_client_conn(client))
    assert target is not None and target.addresses == ("10.77.0.1",) and target.ifname == "nsm-1"
    assert await probe(_client_conn(client), 1.0) == Verdict(True)
    assert await interface_present(client, "nsm-1") and not await interface_present(client, "nsm-2")

    started = time.monotonic()
    verdict = await probe(_client_conn(client, dst="10.77.0.9/32"), 0.4)  # nobody answers
    assert verdict.alive is False and "no reply from 10.77.0.9" in verdict.reason
    assert 0.35 < time.monotonic() - started < 1.5

    await netlink.set_down(peer, "peer")  # the other end: no carrier here
    await asyncio.sleep(0.1)
    verdict = await probe(_client_conn(client), 1.0)
    assert verdict.alive is False, verdict
    await netlink.set_up(peer, "peer")

    await netlink.set_down(client, "nsm-1")
    started = time.monotonic()
    verdict = await probe(_client_conn(client), 1.0)
    assert verdict.alive is False and "nsm-1" in verdict.reason and "is down" in verdict.reason
    assert time.monotonic() - started < 0.5  # at once, not after the timeout
    await netlink.delete_link(client, "nsm-1")
    verdict = await probe(_client_conn(client), 1.0)
    assert verdict.alive is False and "nsm-1" in verdict.reason, verdict

    no_kernel = Connection(id="x")
    assert (await probe(no_kernel, 1.0)).alive is None
    gone = _client_conn("/var/run/netns/does-not-exist-hc")
    verdict = await probe(gone, 1.0)
    assert verdict.alive is False and verdict.reason, verdict
    await probe.close()

"""The client chain's elements alone, with a small fake tail instead of a manager: refresh timing,
backoff, heal on expiry, reselect, close, hooks, many connections on one chain."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from nsm.api.connection_pb2 import RESELECT_REQUESTED, UP, Connection
from nsm.api.networkservice_pb2 import NetworkServiceRequest
from nsm.chain import Chain, Ctx, Element, NextClose, NextRequest
from nsm.client.begin import EVENT, EVENTS, ClientBegin, Kind, refresh_request
from nsm.client.chain import client_chain, new_request
from nsm.client.hooks import Hook
from nsm.client.notify import Notify, State, StateChange
from nsm.client.refresh import Refresh
from nsm.elements.updatepath import expiry_of, ts
from nsm.errors import NotFound, NsmError, Unavailable
from nsm.mechanisms import kernel

pytestmark = pytest.mark.timeout(30)

NAME = "nsc-t"


class FakeManager(Element):
    """The tail: answers like a manager (its own segment, an endpoint, a mechanism, addresses).
    ``fail`` fails the next requests (per connection id when a dict), ``gate`` holds them."""

    def __init__(self, answer: Callable[[NetworkServiceRequest], Connection]) -> None:
        self.answer = answer
        self.requests: list[tuple[float, NetworkServiceRequest]] = []
        self.closes: list[Connection] = []
        self.fail: list[NsmError] = []
        self.fail_ids: set[str] = set()
        self.gate: asyncio.Event | None = None

    def sent(self, conn_id: str) -> list[tuple[float, NetworkServiceRequest]]:
        return [(t, r) for t, r in self.requests if r.connection.id == conn_id]

    async def request(self, ctx: Ctx, request: NetworkServiceRequest, next: NextRequest) -> Connection:
        copy = NetworkServiceRequest()
        copy.CopyFrom(request)
        self.requests.append((time.time(), copy))
        if self.gate is not None:
            await self.gate.wait()
        if request.connection.id in self.fail_ids:
            raise Unavailable("this one is down")
        if self.fail:
            raise self.fail.pop(0)
        conn = self.answer(request)
        conn.state = UP
        return conn

    async def close(self, ctx: Ctx, conn: Connection, next: NextClose) -> None:
        copy = Connection()
        copy.CopyFrom(conn)
        self.closes.append(copy)


@dataclass
class Rig:
    chain: Chain
    begin: ClientBegin
    refresh: Refresh
    tail: FakeManager
    changes: list[StateChange] = field(default_factory=list)

    def states(self, conn_id: str = "c1") -> list[State]:
        return [c.state for c in self.changes if c.conn_id == conn_id]

    async def request(self, conn_id: str = "c1", *, lifetime: float = 60.0) -> Connection:
        return await self.chain.request(new_request(service="blue", name=NAME, conn_id=conn_id,
                                                    lifetime=lifetime, labels={"app": "a"},
                                                    mechanisms=[kernel("nsm-1", "file:///x")]))


@pytest.fixture
async def rig(answer) -> AsyncIterator[Callable[..., Rig]]:  # type: ignore[no-untyped-def]
    """Makes chains (``rig(lifetime=..., hooks=...)``), shut down at the end of the test."""
    rigs: list[Rig] = []

    def make(lifetime: float = 0.6, min_backoff: float = 0.02, max_backoff: float = 0.08,
             hooks: tuple[Element, ...] = ()) -> Rig:
        begin, notify, tail = ClientBegin(), Notify(), FakeManager(answer)
        refresh = Refresh(min_backoff=min_backoff, max_backoff=max_backoff)
        chain = client_chain(name=NAME, lifetime=lifetime, connect=tail, begin=begin, notify=notify,
                             refresh=refresh, hooks=hooks)
        made = Rig(chain, begin, refresh, tail)
        notify.subscribe(made.changes.append)
        rigs.append(made)
        return made

    yield make
    for made in rigs:
        await made.chain.shutdown()
        assert made.refresh.pending() == 0


async def test_refreshes_at_a_third_of_the_time_left(rig, eventually) -> None:  # type: ignore[no-untyped-def]
    r = rig(lifetime=0.6)
    first = await r.request()
    assert r.refresh.pending() == 1
    await eventually(lambda: len(r.tail.requests) >= 4)
    times = [t for t, _ in r.tail.requests]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(0.15 < g < 0.4 for g in gaps), gaps  # 0.6 s / 3 each time
    for sent_at, sent in r.tail.requests[1:]:
        c = sent.connection
        assert c.id == first.id and [s.name for s in c.path.path_segments] == [NAME, "mgr"]
        assert c.network_service_endpoint_name == "nse-1" and c.HasField("mechanism")
        expires = expiry_of(c.path.path_segments[0])
        assert expires is not None and abs(expires - (sent_at + 0.6)) < 0.05  # a fresh expiry
    assert r.states()[0] is State.ESTABLISHED and set(r.states()[1:]) == {State.REFRESHED}


async def test_a_hop_that_caps_the_lifetime_shorter_is_refreshed_in_time(rig, answer,  # type: ignore[no-untyped-def]
                                                                           eventually) -> None:
    """The client asks for 30 s, the manager caps its segment at 0.6 s (its --lifetime): the
    next hop times the connection out at the manager's expiry, so the client refreshes at a
    third of the earliest expiry on the path, not of its own."""
    r = rig(lifetime=30.0)

    def capped(request: NetworkServiceRequest) -> Connection:
        conn = answer(request)
        conn.path.path_segments[1].expires.CopyFrom(ts(time.time() + 0.6))
        return conn

    r.tail.answer = capped
    await r.request(lifetime=30.0)
    await eventually(lambda: len(r.tail.requests) >= 4)
    times = [t for t, _ in r.tail.requests]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(0.15 < g < 0.4 for g in gaps), gaps  # 0.6 s / 3 each time


async def test_a_failed_refresh_is_retried_with_growing_backoff(rig, eventually) -> None:  # type: ignore[no-untyped-def]
    r = rig(lifetime=3.0, min_backoff=0.05, max_backoff=0.4)
    await r.request()
    r.tail.fail = [Unavailable("down")] * 3
    await eventually(lambda: State.REFRESHED in r.states())
    retries = [t for t, _ in r.tail.requests[1:]]
    gaps = [b - a for a, b in itertools.pairwise(retries)]
    assert len(gaps) == 3
    # 0.05, 0.1, 0.2 s: a sleep never ends early; the upper bounds leave room for a loaded machine.
    assert 0.045 < gaps[0] < 0.15 and 0.095 < gaps[1] < 0.25 and 0.19 < gaps[2] < 0.45, gaps
    assert r.states() == [State.ESTABLISHED, State.FAILED, State.FAILED, State.FAILED, State.REFRESHED]
    failed = [c for c in r.changes if c.state is State.FAILED]
    assert all(isinstance(c.error, Unavailable) and c.connection is not None for c in failed)
    # Still the same path: a refresh, not a heal.
    assert all(len(s.connection.path.path_segments) == 2 for _, s in r.tail.requests[1:])


async def test_an_expired_connection_is_requested_afresh(rig, eventually) -> None:  # type: ignore[no-untyped-def]
    r = rig(lifetime=0.4, min_backoff=0.05, max_backoff=0.1)
    first = await r.request()
    r.tail.fail = [Unavailable("down")] * 8  # past the expiry
    await eventually(lambda: State.HEALED in r.states())
    states = r.states()
    down = states.index(State.DOWN)
    assert states[0] is State.ESTABLISHED and states[-1] is State.HEALED
    assert set(states[1:down]) == {State.FAILED} and set(states[down + 1:-1]) == {State.FAILED}
    assert next(c for c in r.changes if c.state is State.DOWN).reason == "expired"
    fresh = [(t, s) for t, s in r.tail.requests if len(s.connection.path.path_segments) == 1][1:]
    assert fresh, "no request from scratch"
    expired_at = expiry_of(first.path.path_segments[0])
    assert expired_at is not None and all(t >= expired_at for t, _ in fresh)
    c = fresh[-1][1].connection
    assert c.id == first.id and c.path.path_segments[0].name == NAME
    assert not c.network_service_endpoint_name and not c.HasField("mechanism")
    assert dict(c.labels) == {"app": "a"}
    assert list(c.context.ip_context.src_ip_addrs) == ["10.0.0.2/32"]  # addresses kept
    # Healed: refreshed again from then on.
    count = len(r.tail.requests)
    await eventually(lambda: len(r.tail.requests) >= count + 2)
    assert r.states()[-1] is State.REFRESHED


async def test_close_cancels_the_refresh_and_closes_the_last_connection(rig) -> None:  # type: ignore[no-untyped-def]
    r = rig(lifetime=0.3)
    conn = await r.request()
    await r.chain.close(Connection(id="c1"))
    assert r.refresh.pending() == 0 and len(r.begin) == 0
    assert [c.id for c in r.tail.closes] == ["c1"]
    assert [s.name for s in r.tail.closes[0].path.path_segments] == [NAME, "mgr"]
    assert r.tail.closes[0].network_service_endpoint_name == conn.network_service_endpoint_name
    count = len(r.tail.requests)
    await asyncio.sleep(0.4)
    assert len(r.tail.requests) == count
    assert r.states() == [State.ESTABLISHED, State.CLOSED]
    await r.chain.close(Connection(id="c1"))  # again: nothing to do
    assert len(r.tail.closes) == 1


async def test_close_does_not_wait_for_a_refresh_in_flight(rig, eventually) -> None:  # type: ignore[no-untyped-def]
    r = rig(lifetime=0.3)
    await r.request()
    r.tail.gate = asyncio.Event()  # the next refresh hangs (a peer that does not answer)
    await eventually(lambda: len(r.tail.requests) == 2)
    await asyncio.wait_for(r.chain.close(Connection(id="c1")), 1.0)
    assert [c.id for c in r.tail.closes] == ["c1"] and r.refresh.pending() == 0


async def test_a_failed_first_request_leaves_nothing(rig) -> None:  # type: ignore[no-untyped-def]
    r = rig()
    r.tail.fail = [NotFound("no such service")]
    with pytest.raises(NotFound):
        await r.request()
    assert len(r.begin) == 0 and r.refresh.pending() == 0 and r.begin.last("c1") is None
    (change,) = r.changes
    assert change.state is State.FAILED and change.connection is None
    assert isinstance(change.error, NotFound)
    await r.request()  # a new first request works
    assert r.states()[-1] is State.ESTABLISHED


async def test_many_connections_on_one_chain_are_refreshed_independently(rig, eventually) -> None:  # type: ignore[no-untyped-def]
    r = rig(lifetime=0.6)
    ids = [f"c{i}" for i in range(10)]
    for conn_id in ids:
        await r.request(conn_id)
    assert r.refresh.pending() == 10 and sorted(r.begin.ids()) == sorted(ids)
    r.tail.fail_ids = {"c0"}  # one connection's refreshes fail; the others' are not held up
    await eventually(lambda: all(len(r.tail.sent(i)) >= 3 for i in ids[1:]))
    assert State.FAILED in r.states("c0")
    assert all(State.FAILED not in r.states(i) for i in ids[1:])
    await r.chain.close(Connection(id="c1"))
    assert r.refresh.pending() == 9
    closed_at = len(r.tail.sent("c1"))
    await eventually(lambda: all(len(r.tail.sent(i)) >= 5 for i in ids[2:]))
    assert len(r.tail.sent("c1")) == closed_at
    for conn_id in ids[2:]:  # each with its own path
        _, last = r.tail.sent(conn_id)[-1]
        assert last.connection.path.path_segments[0].id == conn_id


async def test_reselect_closes_the_old_path_then_requests_afresh(rig, eventually) -> None:  # type: ignore[no-untyped-def]
    r = rig(lifetime=60)
    first = await r.request()
    events = r.begin.events("c1")
    assert events is not None
    healed = await events.request(Kind.RESELECT, reason="endpoint gone")
    assert healed is not None and healed.id == "c1"
    assert [c.id for c in r.tail.closes] == ["c1"]
    assert r.tail.closes[0].network_service_endpoint_name == first.network_service_endpoint_name
    _, sent = r.tail.requests[-1]
    assert sent.connection.state == RESELECT_REQUESTED
    assert len(sent.connection.path.path_segments) == 1 and not sent.connection.HasField("mechanism")
    # The old endpoint goes along: the manager chooses afresh and tries it last.
    assert sent.connection.network_service_endpoint_name == first.network_service_endpoint_name
    assert r.states() == [State.ESTABLISHED, State.DOWN, State.HEALED]  # no CLOSED: a heal
    assert r.changes[1].reason == "endpoint gone"
    assert r.refresh.pending() == 1
    # A refresh after a heal re-sends the healed connection.
    again = await events.request(Kind.REFRESH)
    assert again is not None and r.tail.requests[-1][1].connection.state == UP
    await r.chain.close(Connection(id="c1"))
    assert await events.request(Kind.REFRESH) is None  # closed: nothing to do


class Watcher(Hook):
    """A heal stand-in: records what it learns; its first update triggers one refresh from a
    task of its own (the way a monitor stream would)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, Kind | None]] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.triggered = False

    async def on_update(self, ctx: Ctx, conn: Connection) -> None:
        event = ctx.meta.get(EVENT)
        self.seen.append(("update", conn.id, event.kind if event else None))
        events = ctx.meta.get(EVENTS)
        if not self.triggered and events is not None:
            self.triggered = True

            async def trigger() -> None:
                await events.request(Kind.REFRESH, reason="monitor said so")

            task = asyncio.create_task(trigger())
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def on_failure(self, ctx: Ctx, error: NsmError) -> None:
        self.seen.append(("failure", ctx.conn_id, None))

    async def on_close(self, ctx: Ctx, conn: Connection) -> None:
        self.seen.append(("close", conn.id, None))

    async def shutdown(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def test_a_hook_sees_every_update_and_can_start_events(rig, eventually) -> None:  # type: ignore[no-untyped-def]
    watcher = Watcher()
    r = rig(lifetime=60, hooks=(watcher,))
    await r.request()
    await eventually(lambda: len(watcher.seen) == 2)
    assert watcher.seen == [("update", "c1", Kind.REQUEST), ("update", "c1", Kind.REFRESH)]
    assert r.changes[-1].state is State.REFRESHED and r.changes[-1].reason == "monitor said so"
    r.tail.fail = [Unavailable("x")]
    with pytest.raises(Unavailable):
        await r.begin.refresh("c1")
    await r.chain.close(Connection(id="c1"))
    assert watcher.seen[2:] == [("failure", "c1", None), ("close", "c1", None)]


async def test_the_changes_iterator_ends_at_shutdown(answer) -> None:  # type: ignore[no-untyped-def]
    notify, begin, tail = Notify(), ClientBegin(), FakeManager(answer)
    chain = client_chain(name=NAME, lifetime=60, connect=tail, begin=begin, notify=notify,
                         refresh=Refresh())
    got: list[tuple[str, State]] = []

    async def read(conn_id: str | None) -> None:
        async for change in notify.changes(conn_id):
            got.append((change.conn_id, change.state))

    readers = [asyncio.create_task(read(None)), asyncio.create_task(read("b"))]
    await asyncio.sleep(0)
    for conn_id in ("a", "b"):
        await chain.request(new_request(service="blue", name=NAME, conn_id=conn_id,
                                        mechanisms=[kernel("nsm-1")]))
    await chain.close(Connection(id="a"))
    await chain.shutdown()
    await asyncio.wait_for(asyncio.gather(*readers), 1.0)
    assert got.count(("b", State.ESTABLISHED)) == 2  # both readers
    assert ("a", State.ESTABLISHED) in got and ("a", State.CLOSED) in got
    assert len(got) == 4


def test_refresh_request_keeps_the_path_and_puts_the_client_first() -> None:
    template = new_request(service="blue", name=NAME, conn_id="c1", labels={"app": "a"},
                           mechanisms=[kernel("nsm-1")])
    last = Connection(id="c1", network_service="blue", network_service_endpoint_name="nse-1")
    seg = last.path.path_segments.add(name=NAME, id="c1")
    seg.expires.CopyFrom(ts(time.time() + 1))
    last.path.path_segments.add(name="mgr", id="m")
    last.path.index = 1  # whatever came back, the client is index 0
    request = refresh_request(template, last)
    assert request.connection.path.index == 0
    assert [s.name for s in request.connection.path.path_segments] == [NAME, "mgr"]
    assert request.connection.network_service_endpoint_name == "nse-1"
    assert dict(request.connection.labels) == {"app": "a"}
    assert list(request.mechanism_preferences) == list(template.mechanism_preferences)

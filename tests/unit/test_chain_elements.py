"""Unit tests of the chain core and the shared elements, each alone with small helpers."""

from __future__ import annotations

import asyncio
import time

import pytest

from nsm.api.connection_pb2 import Connection, MonitorScopeSelector, PathSegment
from nsm.api.networkservice_pb2 import NetworkServiceRequest
from nsm.chain import Chain, Ctx, Element, Key, NextClose, NextRequest
from nsm.elements.begin import Begin
from nsm.elements.connect import Connect
from nsm.elements.monitor import Monitor, matches
from nsm.elements.timeout import Timeout
from nsm.elements.updatepath import UpdatePath, enter, expiry_of, ts
from nsm.elements.validate import Validate
from nsm.errors import EndpointUnreachable, InvalidArgument, Unavailable
from nsm.mechanisms import kernel
from nsm.transport import Channels

pytestmark = pytest.mark.timeout(20)


class Recorder(Element):
    """Records what reaches it; optionally fails or waits."""

    def __init__(self) -> None:
        self.requests: list[Connection] = []
        self.closes: list[Connection] = []
        self.fail: Exception | None = None
        self.gate: asyncio.Event | None = None
        self.active = 0
        self.max_active = 0

    async def request(self, ctx: Ctx, request: NetworkServiceRequest, next: NextRequest) -> Connection:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if self.gate is not None:
                await self.gate.wait()
            c = Connection()
            c.CopyFrom(request.connection)
            self.requests.append(c)
            if self.fail is not None:
                raise self.fail
            return await next(ctx, request)
        finally:
            self.active -= 1

    async def close(self, ctx: Ctx, conn: Connection, next: NextClose) -> None:
        c = Connection()
        c.CopyFrom(conn)
        self.closes.append(c)
        await next(ctx, conn)


def req(conn_id: str = "c1", service: str = "svc", **kw: object) -> NetworkServiceRequest:
    r = NetworkServiceRequest(connection=Connection(id=conn_id, network_service=service))
    r.mechanism_preferences.append(kernel("nsm-1", "file:///var/run/netns/x"))
    return r


async def test_chain_runs_elements_in_order_and_tail_returns_connection() -> None:
    order: list[str] = []

    class Mark(Element):
        def __init__(self, name: str) -> None:
            self.name = name

        async def request(self, ctx, request, next):  # type: ignore[no-untyped-def]
            order.append(self.name)
            conn = await next(ctx, request)
            order.append("/" + self.name)
            return conn

    chain = Chain([Mark("a"), Mark("b")])
    conn = await chain.request(req())
    assert order == ["a", "b", "/b", "/a"]
    assert conn.network_service == "svc"


async def test_close_after_closes_only_the_rest() -> None:
    first, second = Recorder(), Recorder()

    class Middle(Element):
        pass

    middle = Middle()
    chain = Chain([first, middle, second])
    await chain.close_after(middle, chain.context(), Connection(id="x"))
    assert len(first.closes) == 0 and len(second.closes) == 1


async def test_begin_serializes_same_id_and_runs_different_ids_concurrently() -> None:
    begin, rec = Begin(), Recorder()
    rec.gate = asyncio.Event()
    chain = Chain([begin, rec])
    same = [asyncio.create_task(chain.request(req("a"))) for _ in range(3)]
    other = asyncio.create_task(chain.request(req("b")))
    await asyncio.sleep(0.05)
    assert rec.max_active == 2  # one "a" and one "b"
    rec.gate.set()
    await asyncio.gather(*same, other)
    assert len(rec.requests) == 4
    assert sorted(begin.ids()) == ["a", "b"]


async def test_begin_forgets_a_failed_first_request_and_keeps_a_failed_refresh() -> None:
    begin, rec = Begin(), Recorder()
    chain = Chain([begin, rec])
    rec.fail = Unavailable("down")
    with pytest.raises(Unavailable):
        await chain.request(req("a"))
    assert len(begin) == 0
    rec.fail = None
    await chain.request(req("a"))
    rec.fail = Unavailable("down")
    with pytest.raises(Unavailable):
        await chain.request(req("a"))
    assert begin.ids() == ["a"]


async def test_begin_close_uses_last_good_connection_and_unknown_id_is_ok() -> None:
    begin, rec = Begin(), Recorder()
    chain = Chain([begin, rec])
    r = req("a")
    r.connection.labels["k"] = "v"
    await chain.request(r)
    await chain.close(Connection(id="a"))  # caller sends a bare connection
    assert rec.closes[0].labels["k"] == "v"
    assert len(begin) == 0
    await chain.close(Connection(id="unknown"))
    assert len(rec.closes) == 1


async def test_begin_generates_an_id_when_empty() -> None:
    chain = Chain([Begin()])
    conn = await chain.request(req(""))
    assert len(conn.id) == 36


async def test_metadata_is_per_connection_and_dropped_on_close() -> None:
    key: Key[int] = Key("count")
    seen: list[int] = []

    class Counter(Element):
        async def request(self, ctx, request, next):  # type: ignore[no-untyped-def]
            n = (ctx.meta.get(key) or 0) + 1
            ctx.meta.set(key, n)
            seen.append(n)
            return await next(ctx, request)

    chain = Chain([Begin(), Counter()])
    await chain.request(req("a"))
    await chain.request(req("a"))
    await chain.request(req("b"))
    await chain.close(Connection(id="a"))
    await chain.request(req("a"))
    assert seen == [1, 2, 1, 1]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r.connection.ClearField("network_service"), "network service name is empty"),
        (lambda r: r.mechanism_preferences[0].parameters.__setitem__("name", "x" * 16),
         "at most 15"),
        (lambda r: setattr(r.mechanism_preferences[0], "cls", "SIDEWAYS"), "mechanism class"),
        (lambda r: setattr(r.mechanism_preferences[0], "type", ""), "mechanism type is empty"),
        (lambda r: r.mechanism_preferences[0].parameters.__setitem__("inodeURL", "http://x"),
         "file:///"),
        (lambda r: r.mechanism_preferences[0].parameters.__setitem__("MTU", "abc"), "MTU"),
        (lambda r: r.ClearField("mechanism_preferences"), "no mechanism"),
        (lambda r: setattr(r.connection, "payload", "FRAMES"), "payload"),
        (lambda r: setattr(r.connection, "network_service", "a b"), "spaces"),
        (lambda r: r.ClearField("connection"), "no connection"),
    ],
)
async def test_validate_rejects_malformed_requests(mutate, message) -> None:  # type: ignore[no-untyped-def]
    rec = Recorder()
    chain = Chain([Validate(), rec])
    r = req()
    mutate(r)
    with pytest.raises(InvalidArgument, match=message):
        await chain.request(r)
    assert rec.requests == []


def test_enter_appends_resumes_and_truncates() -> None:
    conn = Connection()
    prev, created = enter(conn.path, "nsc", "id0")
    assert (prev, created, conn.path.path_segments[0].id) == (0, True, "id0")
    prev, created = enter(conn.path, "mgr")
    assert (prev, created, conn.path.index, len(conn.path.path_segments)) == (0, True, 1, 2)
    conn.path.path_segments.add(name="fwd-a", id="f")
    conn.path.index = 0
    prev, created = enter(conn.path, "mgr")  # refresh: our segment is next, keep the rest
    assert (created, len(conn.path.path_segments)) == (False, 3)
    conn.path.index = 0
    conn.path.path_segments[1].name = "other-mgr"
    enter(conn.path, "mgr")  # a different next hop: the old tail is forgotten
    assert [s.name for s in conn.path.path_segments] == ["nsc", "mgr"]


async def test_updatepath_gives_each_hop_its_id_and_restores_the_callers() -> None:
    seen: list[tuple[str, int]] = []

    class Look(Element):
        async def request(self, ctx, request, next):  # type: ignore[no-untyped-def]
            seen.append((request.connection.id, request.connection.path.index))
            return await next(ctx, request)

    chain = Chain([UpdatePath("mgr"), Look(), UpdatePath("fwd"), Look()])
    r = req("client-id")
    r.connection.path.path_segments.add(name="nsc", id="client-id", expires=ts(time.time() + 30))
    conn = await chain.request(r)
    assert conn.id == "client-id" and conn.path.index == 0
    names = [s.name for s in conn.path.path_segments]
    assert names == ["nsc", "mgr", "fwd"]
    assert seen[0] == (conn.path.path_segments[1].id, 1)
    assert seen[1] == (conn.path.path_segments[2].id, 2)
    # a hop's expiry never outlives the caller's
    client_exp = expiry_of(conn.path.path_segments[0])
    assert client_exp is not None
    assert expiry_of(conn.path.path_segments[1]) == pytest.approx(client_exp, abs=1e-6)
    # refresh keeps ids
    ids = [s.id for s in conn.path.path_segments]
    again = await chain.request(NetworkServiceRequest(connection=conn))
    assert [s.id for s in again.path.path_segments] == ids


async def test_timeout_closes_an_unrefreshed_connection_through_the_whole_chain() -> None:
    rec, timeout = Recorder(), Timeout()
    chain = Chain([Begin(), UpdatePath("mgr"), timeout, rec])
    r = req("c")
    r.connection.path.path_segments.add(name="nsc", id="c", expires=ts(time.time() + 0.3))
    await chain.request(r)
    assert timeout.pending() == 1
    await asyncio.sleep(0.6)
    assert len(rec.closes) == 1 and timeout.pending() == 0


async def test_timeout_of_a_caller_without_expiry_is_this_hops_lifetime() -> None:
    """A caller whose segment carries no expiry (a client of another implementation, or one
    that sets none): the hop times the connection out at its own lifetime instead of never, so
    a caller that dies without Close does not leak it here."""
    rec, timeout = Recorder(), Timeout()
    chain = Chain([Begin(), UpdatePath("mgr", lifetime=0.3), timeout, rec])
    r = req("c")
    r.connection.path.path_segments.add(name="nsc", id="c")  # no expires
    await chain.request(r)
    assert timeout.pending() == 1
    await asyncio.sleep(0.6)
    assert len(rec.closes) == 1 and timeout.pending() == 0


async def test_timeout_is_rearmed_by_refresh_and_cancelled_by_close() -> None:
    rec, timeout = Recorder(), Timeout()
    chain = Chain([Begin(), UpdatePath("mgr"), timeout, rec])
    r = req("c")
    r.connection.path.path_segments.add(name="nsc", id="c", expires=ts(time.time() + 0.3))
    conn = await chain.request(r)
    await asyncio.sleep(0.15)
    conn.path.path_segments[0].expires.CopyFrom(ts(time.time() + 0.4))
    await chain.request(NetworkServiceRequest(connection=conn))
    await asyncio.sleep(0.3)  # past the first expiry
    assert rec.closes == []
    await chain.close(conn)
    assert len(rec.closes) == 1
    await asyncio.sleep(0.3)
    assert len(rec.closes) == 1 and timeout.pending() == 0
    await chain.shutdown()


async def test_monitor_tracks_connections_and_filters_by_selector() -> None:
    monitor = Monitor()
    chain = Chain([Begin(), UpdatePath("mgr"), monitor])
    await chain.request(req("a", "svc1"))
    await chain.request(req("b", "svc2"))
    assert len(monitor.connections) == 2
    only = MonitorScopeSelector(network_services=["svc1"])
    assert [c.network_service for c in monitor.connections.values() if matches(only, c)] == ["svc1"]
    seg = MonitorScopeSelector(path_segments=[PathSegment(name="mgr")])
    assert all(matches(seg, c) for c in monitor.connections.values())
    assert not matches(MonitorScopeSelector(path_segments=[PathSegment(id="nope")]),
                       next(iter(monitor.connections.values())))
    await chain.close(Connection(id="a"))
    assert len(monitor.connections) == 1


async def test_begin_unknown_close_runs_only_for_ids_it_holds_nothing_for() -> None:
    """A role's ``unknown_close`` (the forwarder's, for what an earlier run left) gets the
    caller's connection for an id Begin does not know, one at a time with that id's Requests;
    a known id closes as usual."""
    seen: list[tuple[str, str]] = []
    gate = asyncio.Event()

    async def unknown(ctx: Ctx, conn: Connection) -> None:
        seen.append((ctx.conn_id, conn.labels["from"]))
        await gate.wait()

    begin, rec = Begin(unknown_close=unknown), Recorder()
    chain = Chain([begin, rec])
    await chain.request(req("known"))
    await chain.close(Connection(id="known", labels={"from": "caller"}))
    assert len(rec.closes) == 1 and seen == []
    closing = asyncio.create_task(chain.close(Connection(id="left", labels={"from": "caller"})))
    await asyncio.sleep(0.01)
    requesting = asyncio.create_task(chain.request(req("left")))
    await asyncio.sleep(0.01)
    assert seen == [("left", "caller")] and len(rec.requests) == 1  # the Request waits
    gate.set()
    await asyncio.gather(closing, requesting)
    assert len(rec.requests) == 2 and begin.ids() == ["left"]
    await chain.close(Connection(id=""))  # no id: nothing to do
    assert len(seen) == 1


@pytest.mark.parametrize("to_endpoint", [False, True], ids=["a-hop-on-the-way", "the-endpoint"])
async def test_connect_tells_an_unreachable_endpoint_from_an_unreachable_hop(
        tmp_path, to_endpoint: bool) -> None:  # type: ignore[no-untyped-def]
    """Nothing listens at the next hop's URL: a hop whose next hop is the endpoint reports
    EndpointUnreachable (the endpoint is gone: a healing client reselects), any other hop a
    plain UNAVAILABLE (a hop on the way restarts: the client re-requests the same path)."""
    sock = tmp_path / "gone.sock"
    sock.touch()  # refused
    channels = Channels()
    chain = Chain([Connect(channels, url=lambda ctx, r: f"unix://{sock}", timeout=2,
                           to_endpoint=lambda ctx: to_endpoint)])
    try:
        with pytest.raises(Unavailable) as err:
            await chain.request(req())
    finally:
        await channels.close()
    assert isinstance(err.value, EndpointUnreachable) is to_endpoint, err.value
    assert (err.value.reason == "ENDPOINT_UNREACHABLE") is to_endpoint

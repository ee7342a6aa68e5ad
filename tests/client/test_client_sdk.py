"""The client SDK against a small fake NetworkService (a manager stand-in), and end to end
against a real endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from google.protobuf.empty_pb2 import Empty

from nsm.api import networkservice_pb2_grpc
from nsm.api.connection_pb2 import Connection
from nsm.api.networkservice_pb2 import NetworkServiceRequest
from nsm.client.chain import Connections, new_request
from nsm.client.heal import HealOptions
from nsm.client.notify import State, StateChange
from nsm.client.sdk import Client
from nsm.elements.updatepath import expiry_of
from nsm.endpoint.endpoint import Endpoint
from nsm.errors import InvalidArgument, NotFound, NsmError, Unavailable, grpc_errors
from nsm.mechanisms import NAME, NETNS_INODE_URL, kernel
from nsm.transport import Server

pytestmark = pytest.mark.timeout(30)

#: These clients are in the test's own namespace, with interfaces no forwarder built: heal on the
#: control plane only (tests/client/test_client_heal.py checks the data plane in namespaces).
NO_LIVENESS = HealOptions(liveness=False)


class FakeManager(networkservice_pb2_grpc.NetworkServiceServicer):
    """Answers like a manager would: appends its segment, picks an endpoint, sets addresses.
    ``fail`` (a list of errors) makes the next requests fail, one error each."""

    def __init__(self, answer: Callable[[NetworkServiceRequest], Connection]) -> None:
        self.answer = answer
        self.requests: list[tuple[float, NetworkServiceRequest]] = []
        self.closes: list[Connection] = []
        self.fail: list[NsmError] = []

    @grpc_errors
    async def Request(self, request: NetworkServiceRequest, context: grpc.aio.ServicerContext) -> Connection:
        copy = NetworkServiceRequest()
        copy.CopyFrom(request)
        self.requests.append((time.time(), copy))
        if self.fail:
            raise self.fail.pop(0)
        return self.answer(request)

    @grpc_errors
    async def Close(self, request: Connection, context: grpc.aio.ServicerContext) -> Empty:
        self.closes.append(request)
        return Empty()


@pytest.fixture
async def manager(tmp_path: Path, answer) -> AsyncIterator[tuple[FakeManager, str]]:  # type: ignore[no-untyped-def]
    fake = FakeManager(answer)
    server = Server([f"unix://{tmp_path}/mgr.sock"])
    networkservice_pb2_grpc.add_NetworkServiceServicer_to_server(fake, server.grpc)
    await server.start()
    try:
        yield fake, str(server.urls[0])
    finally:
        await server.stop(0.1)


@contextlib.asynccontextmanager
async def closing(client: Client) -> AsyncIterator[Client]:
    try:
        yield client
    finally:
        await client.close()


async def test_first_request(manager) -> None:  # type: ignore[no-untyped-def]
    fake, url = manager
    async with closing(Client(heal=NO_LIVENESS, manager_url=url, service="blue", labels={"app": "x"},
                              lifetime=120)) as client:
        conn = await client.request()
        assert client.connection == conn
        _, sent = fake.requests[0]
        c = sent.connection
        assert c.network_service == "blue" and dict(c.labels) == {"app": "x"}
        assert c.path.index == 0 and len(c.path.path_segments) == 1
        seg = c.path.path_segments[0]
        assert seg.name == client.name and seg.name.startswith("nsc-") and seg.id == c.id == client.conn_id
        expires = expiry_of(seg)
        assert expires is not None and abs(expires - (time.time() + 120)) < 5
        (pref,) = sent.mechanism_preferences
        assert (pref.cls, pref.type) == ("LOCAL", "KERNEL")
        assert pref.parameters[NAME] == "nsm-1"
        # Its own namespace, by identity (in a pod its PIDs mean nothing to the forwarder).
        st = os.stat("/proc/self/ns/net")
        assert pref.parameters[NETNS_INODE_URL] == f"inode://{st.st_dev}/{st.st_ino}"
    assert len(fake.closes) == 1 and fake.closes[0].id == conn.id


async def test_refreshes_before_expiry(manager, eventually) -> None:  # type: ignore[no-untyped-def]
    fake, url = manager
    updates: list[Connection] = []
    client = Client(heal=NO_LIVENESS, manager_url=url, service="blue", lifetime=0.6, on_update=updates.append)
    async with closing(client):
        first = await client.request()
        await eventually(lambda: len(fake.requests) >= 4 and len(updates) >= 4)  # answered too
        previous_expiry = expiry_of(first.path.path_segments[0])
        for sent_at, sent in fake.requests[1:]:
            c = sent.connection
            assert c.id == first.id and c.path.index == 0
            assert [s.name for s in c.path.path_segments] == [client.name, "mgr"]
            assert c.network_service_endpoint_name == "nse-1"
            assert list(c.context.ip_context.src_ip_addrs) == ["10.0.0.2/32"]
            assert previous_expiry is not None and sent_at < previous_expiry  # refreshed in time
            previous_expiry = expiry_of(c.path.path_segments[0])
            assert previous_expiry is not None and previous_expiry > sent_at + 0.5
        assert len(updates) >= 4
    count = len(fake.requests)
    await asyncio.sleep(0.4)
    assert len(fake.requests) == count  # close stopped refreshing
    assert len(fake.closes) == 1


async def test_transient_refresh_failures_are_retried(manager, eventually) -> None:  # type: ignore[no-untyped-def]
    fake, url = manager
    async with closing(Client(heal=NO_LIVENESS, manager_url=url, service="blue", lifetime=1.5,
                              min_backoff=0.02)) as client:
        first = await client.request()
        fake.fail = [Unavailable("forwarder restarting"), Unavailable("still")]
        await eventually(lambda: len(fake.requests) >= 4 and not fake.fail)
        assert client.connection is not None and client.connection.id == first.id
        # Still a refresh (the path and the endpoint are kept), not a heal.
        assert len(fake.requests[-1][1].connection.path.path_segments) == 2


async def test_heals_from_scratch_after_expiry(manager, eventually) -> None:  # type: ignore[no-untyped-def]
    fake, url = manager
    async with closing(Client(heal=NO_LIVENESS, manager_url=url, service="blue", lifetime=0.5,
                              min_backoff=0.05, max_backoff=0.1)) as client:
        first = await client.request()
        fake.fail = [Unavailable("down")] * 12
        await eventually(lambda: not fake.fail and client.connection is not None
                         and expiry_of(client.connection.path.path_segments[0]) > time.time() + 0.2)
        healed = [r for _, r in fake.requests if len(r.connection.path.path_segments) == 1][1:]
        assert healed, "no request from scratch"
        c = healed[-1].connection
        assert c.id == first.id and not c.network_service_endpoint_name and not c.HasField("mechanism")
        assert list(c.context.ip_context.src_ip_addrs) == ["10.0.0.2/32"]  # addresses kept


async def test_close_sends_close_once(manager) -> None:  # type: ignore[no-untyped-def]
    fake, url = manager
    client = Client(heal=NO_LIVENESS, manager_url=url, service="blue")
    async with client.connect() as conn:
        assert conn.network_service_endpoint_name == "nse-1"
    assert [c.id for c in fake.closes] == [conn.id] and client.connection is None
    await client.close()
    assert len(fake.closes) == 1


async def test_request_failure_is_a_domain_error(manager) -> None:  # type: ignore[no-untyped-def]
    fake, url = manager
    fake.fail = [NotFound("network service 'x' not found")]
    client = Client(heal=NO_LIVENESS, manager_url=url, service="x")
    with pytest.raises(NotFound, match="network service 'x' not found"):
        async with client.connect():
            pass
    assert client.connection is None and not fake.closes


async def test_unreachable_manager_is_unavailable(tmp_path: Path) -> None:
    client = Client(heal=NO_LIVENESS, manager_url=f"unix://{tmp_path}/none.sock", service="x",
                    request_timeout=2)
    try:
        with pytest.raises(Unavailable):
            await client.request()
    finally:
        await client.close()


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"ifname": "this-is-too-long"}, InvalidArgument, "at most 15"),
    ({"ifname": "bad name"}, InvalidArgument, "not allow"),
    ({"netns": "/nonexistent/ns"}, NotFound, "does not exist"),
    ({"netns": "http://x"}, InvalidArgument, "not valid"),
    ({"netns": "/proc/self/status"}, InvalidArgument, "not a network namespace"),
    ({"service": ""}, InvalidArgument, "network service name is empty"),
    ({"manager_url": "http://x"}, InvalidArgument, "unsupported URL"),
    ({"lifetime": 0}, InvalidArgument, "lifetime"),
    ({"name": "a b"}, InvalidArgument, "client name"),
    ({"labels": {"": "x"}}, InvalidArgument, "label"),
])
def test_invalid_input_is_rejected_before_sending(kwargs: dict[str, object], error: type[NsmError],
                                                  message: str) -> None:
    args: dict[str, object] = {"manager_url": "unix:///tmp/x.sock", "service": "blue", **kwargs}
    with pytest.raises(error, match=message):
        Client(**args)  # type: ignore[arg-type]


async def test_against_a_real_endpoint(tmp_path: Path) -> None:
    """No manager: the endpoint appends its segment after the client's and answers."""
    async with Endpoint(name="nse-e", services=["blue"], cidr="10.9.0.0/24",
                        listen=[f"unix://{tmp_path}/nse.sock"], grace=0.1) as endpoint:
        client = Client(heal=NO_LIVENESS, manager_url=endpoint.url, service="blue", ifname="nsm-9",
                        lifetime=0.9)
        async with client.connect() as conn:
            assert conn.id == client.conn_id and conn.path.index == 0
            assert [s.name for s in conn.path.path_segments] == [client.name, "nse-e"]
            assert conn.mechanism.parameters[NAME] == "nsm-9"
            assert list(conn.context.ip_context.src_ip_addrs) == ["10.9.0.2/32"]
            await asyncio.sleep(1.2)  # past the first lifetime: kept alive by refreshes
            assert endpoint.ipam.connections == 1
            assert client.connection is not None
            assert list(client.connection.context.ip_context.src_ip_addrs) == ["10.9.0.2/32"]
        assert endpoint.ipam.connections == 0


async def test_state_changes_reach_the_callback_and_the_iterator(manager, eventually) -> None:  # type: ignore[no-untyped-def]
    _, url = manager
    seen: list[StateChange] = []
    client = Client(heal=NO_LIVENESS, manager_url=url, service="blue", lifetime=0.6, on_change=seen.append)
    iterated: list[State] = []

    async def iterate() -> None:
        async for change in client.changes():
            iterated.append(change.state)

    reader = asyncio.create_task(iterate())
    await asyncio.sleep(0)  # subscribed
    async with closing(client):
        conn = await client.request()
        assert [c.state for c in seen] == [State.ESTABLISHED] and seen[0].connection == conn
        await eventually(lambda: State.REFRESHED in [c.state for c in seen])
    await asyncio.wait_for(reader, 2)  # close ends the iterator
    states = [c.state for c in seen]
    assert states[0] is State.ESTABLISHED and states[-1] is State.CLOSED
    assert set(states[1:-1]) == {State.REFRESHED}
    assert iterated == states
    assert all(c.conn_id == client.conn_id for c in seen)


async def test_many_connections_over_one_channel_each_refreshed(manager, eventually) -> None:  # type: ignore[no-untyped-def]
    fake, url = manager
    mech = [kernel("nsm-1", f"file:///proc/{os.getpid()}/ns/net")]
    async with Connections(heal=NO_LIVENESS, manager_url=url, name="agent", lifetime=0.6) as conns:
        ids = [f"conn-{i}" for i in range(5)]
        for conn_id in ids:
            conn = await conns.request(new_request(service="blue", name="agent", mechanisms=mech,
                                                   conn_id=conn_id))
            assert conn.id == conn_id
        assert sorted(conns.ids()) == ids

        def sent(conn_id: str) -> int:
            return sum(1 for _, r in fake.requests if r.connection.id == conn_id)

        await eventually(lambda: all(sent(i) >= 3 for i in ids))
        await conns.close(ids[0])
        assert [c.id for c in fake.closes] == [ids[0]] and conns.connection(ids[0]) is None
        before = sent(ids[0])
        await eventually(lambda: all(sent(i) >= 5 for i in ids[1:]))
        assert sent(ids[0]) == before  # the closed one is not refreshed any more
        assert len(conns._channels._channels) == 1  # one channel for all
    assert sorted(c.id for c in fake.closes) == ids  # leaving the block closed the rest


async def test_a_request_for_another_clients_path_is_refused(manager) -> None:  # type: ignore[no-untyped-def]
    _, url = manager
    async with Connections(heal=NO_LIVENESS, manager_url=url, name="agent") as conns:
        with pytest.raises(InvalidArgument, match="not this client's"):
            await conns.request(new_request(service="blue", name="other", mechanisms=[kernel("nsm-1")]))
        assert conns.ids() == []

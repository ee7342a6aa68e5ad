"""The client tests' shared helpers: every test checks that it leaves no task behind,
``eventually`` waits for a condition, ``answer`` answers a Request the way a manager would."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable

import pytest

from nsm.api.connection_pb2 import Connection
from nsm.api.networkservice_pb2 import NetworkServiceRequest
from nsm.lab import harness


@pytest.fixture(autouse=True)
async def _no_leaked_tasks() -> AsyncIterator[None]:
    """Every client test checks that it leaves no task behind (``eventually`` comes from the
    root conftest: the one harness)."""
    async with harness.no_leaked_tasks():
        yield


def _answer(request: NetworkServiceRequest) -> Connection:
    conn = Connection()
    conn.CopyFrom(request.connection)
    if len(conn.path.path_segments) < 2:
        conn.path.path_segments.add(name="mgr", id=str(uuid.uuid4()))
    # Like every hop: its own segment expires no later than the client's, renewed each time.
    conn.path.path_segments[1].expires.CopyFrom(conn.path.path_segments[0].expires)
    conn.network_service_endpoint_name = conn.network_service_endpoint_name or "nse-1"
    conn.mechanism.CopyFrom(request.mechanism_preferences[0])
    ip = conn.context.ip_context
    if not ip.src_ip_addrs:  # a heal sends the addresses it had
        ip.src_ip_addrs.append("10.0.0.2/32")
        ip.dst_ip_addrs.append("10.0.0.1/32")
    return conn


@pytest.fixture
def answer() -> Callable[[NetworkServiceRequest], Connection]:
    """A manager's answer: its own segment after the client's, endpoint nse-1, the first
    mechanism offered, addresses 10.0.0.2/32 - 10.0.0.1/32 (those sent, on a heal)."""
    return _answer

"""Property-based fuzz of the NetworkService and MonitorConnection inputs of every hop of the
single-node mesh (manager, forwarder, endpoint): arbitrary requests (:mod:`nsm.lab.fuzz`) —
random strings, maps, numbers, contexts, paths, KERNEL/VXLAN mechanisms with random parameters,
a KERNEL namespace either garbage or the test's own pod — then Close, random Closes, and random
monitor selectors. Only documented codes come back (never INTERNAL or UNKNOWN), every daemon
still serves a real client afterwards, and nothing is left in the kernel or in any monitor (the
mesh scope's leak check, plus the pod's links here).

Hypothesis runs in a worker thread; each example's calls run on the session's loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nsm.api.connection_pb2 import Connection, MonitorScopeSelector
from nsm.api.connection_pb2_grpc import MonitorConnectionStub
from nsm.api.networkservice_pb2 import NetworkServiceRequest
from nsm.api.networkservice_pb2_grpc import NetworkServiceStub
from nsm.lab import fuzz
from nsm.mechanisms import netns_url

pytestmark = [pytest.mark.kernel, pytest.mark.asyncio(loop_scope="session")]

DOCUMENTED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
              grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.PERMISSION_DENIED,
              grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED,
              grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNIMPLEMENTED,
              grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
FUZZ = settings(max_examples=60, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


async def code_of(make: Callable[[], Any]) -> tuple[grpc.StatusCode, Any]:
    try:
        return grpc.StatusCode.OK, await make()
    except grpc.aio.AioRpcError as exc:
        assert "Traceback" not in (exc.details() or ""), exc.details()
        return exc.code(), exc.details()


async def first_event(call: Any) -> None:
    try:
        await asyncio.wait_for(call.read(), 2)
    finally:
        call.cancel()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("hop", ["manager", "forwarder", "endpoint"])
async def test_fuzz_every_hop(mesh: Any, hop: str) -> None:
    loop = asyncio.get_running_loop()
    pod = await mesh.netns()
    url = {"manager": mesh.manager_url, "forwarder": mesh.forwarder_url, "endpoint": mesh.main.url}[hop]
    service = NetworkServiceStub(mesh.channel(url))
    monitor = MonitorConnectionStub(mesh.channel(url))
    seen: dict[str, set[str]] = {}

    def run(what: str, make: Callable[[], Any]) -> tuple[grpc.StatusCode, Any]:
        code, result = asyncio.run_coroutine_threadsafe(code_of(make), loop).result(60)
        seen.setdefault(what, set()).add(code.name)
        assert code in DOCUMENTED, (what, code, result)
        return code, result

    @FUZZ
    @given(request=st.one_of(fuzz.requests(mesh.service, [netns_url(pod)]),
                             fuzz.near_valid_requests(mesh.service, [netns_url(pod)])),
           close=fuzz.connections(mesh.service),
           selector=fuzz.selectors())
    def examples(request: NetworkServiceRequest, close: Connection, selector: MonitorScopeSelector) -> None:
        code, conn = run("Request", lambda: service.Request(request, timeout=20))
        if code == grpc.StatusCode.OK:
            run("Close of what Request made", lambda: service.Close(conn, timeout=20))
        run("Close", lambda: service.Close(close, timeout=20))
        run("MonitorConnections", lambda: first_event(monitor.MonitorConnections(selector, timeout=5)))

    await asyncio.to_thread(examples)
    print(hop, "codes seen:", {k: sorted(v) for k, v in sorted(seen.items())})
    assert await mesh.link_names(pod) == []
    assert await mesh.leftovers() == []
    # still serving: a real client connects and closes
    client = mesh.client(await mesh.netns("ok"), ifname="nsm-1")
    await client.request()
    await client.close(raise_errors=True)

"""Property-based fuzz of the registry's inputs over real gRPC: arbitrary NetworkService and
NetworkServiceEndpoint records and queries (:mod:`nsm.lab.fuzz`) to Register, Find (watching or
not) and Unregister. Only documented codes come back — never INTERNAL or UNKNOWN — and the
registry still answers afterwards.

Hypothesis runs in a worker thread (its tests are synchronous); each example's calls run on the
test's event loop, where the registry serves.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nsm.api import registry_pb2_grpc
from nsm.api.registry_pb2 import NetworkService, NetworkServiceEndpoint
from nsm.lab import fuzz

if TYPE_CHECKING:
    from conftest import Harness

pytestmark = pytest.mark.timeout(120)

#: The codes a registry may answer with.
DOCUMENTED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
              grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.PERMISSION_DENIED,
              grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED,
              grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAVAILABLE,
              grpc.StatusCode.DEADLINE_EXCEEDED}
FUZZ = settings(max_examples=100, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


async def code_of(make: Callable[[], Any]) -> grpc.StatusCode:
    """The code of the call ``make()`` starts (made here: gRPC calls belong to the loop)."""
    try:
        await make()
    except grpc.aio.AioRpcError as exc:
        assert "Traceback" not in (exc.details() or "")
        return exc.code()
    return grpc.StatusCode.OK


async def find(call: Any) -> None:
    """Read a Find's answers; a watch for a moment only."""
    try:
        while True:
            response = await asyncio.wait_for(call.read(), 0.3)
            if response is grpc.aio.EOF:
                return
    except TimeoutError:
        return
    finally:
        call.cancel()


def run(loop: asyncio.AbstractEventLoop, make: Callable[[], Any]) -> grpc.StatusCode:
    return asyncio.run_coroutine_threadsafe(code_of(make), loop).result(30)


async def test_fuzz_registry(reg: Harness) -> None:
    loop = asyncio.get_running_loop()
    ns = registry_pb2_grpc.NetworkServiceRegistryStub(reg.channel)
    nse = registry_pb2_grpc.NetworkServiceEndpointRegistryStub(reg.channel)
    seen: dict[str, set[str]] = {}

    def check(what: str, code: grpc.StatusCode) -> None:
        seen.setdefault(what, set()).add(code.name)
        assert code in DOCUMENTED, (what, code)

    @FUZZ
    @given(record=fuzz.network_services(), query=fuzz.ns_queries(), unregister=st.booleans())
    def network_services(record: NetworkService, query: Any, unregister: bool) -> None:
        check("ns Register", run(loop, lambda: ns.Register(record, timeout=10)))
        check("ns Find", run(loop, lambda: find(ns.Find(query, timeout=10))))
        if unregister:
            check("ns Unregister", run(loop, lambda: ns.Unregister(record, timeout=10)))

    @FUZZ
    @given(record=fuzz.endpoints(), query=fuzz.nse_queries(), unregister=st.booleans())
    def endpoints(record: NetworkServiceEndpoint, query: Any, unregister: bool) -> None:
        check("nse Register", run(loop, lambda: nse.Register(record, timeout=10)))
        check("nse Find", run(loop, lambda: find(nse.Find(query, timeout=10))))
        if unregister:
            check("nse Unregister", run(loop, lambda: nse.Unregister(record, timeout=10)))

    await asyncio.to_thread(network_services)
    await asyncio.to_thread(endpoints)
    print("codes seen:", {k: sorted(v) for k, v in sorted(seen.items())})
    # something got through, something was refused, and the registry still answers
    assert "OK" in seen["nse Register"] and "INVALID_ARGUMENT" in seen["nse Register"]
    await reg.client.register_nse(NetworkServiceEndpoint(name="after", network_service_names=["s"],
                                                         url="unix:///run/after.sock"))
    assert "after" in [e.name for e in await reg.client.find_nse()]

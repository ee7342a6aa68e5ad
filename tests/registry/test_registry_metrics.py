"""The registry's metrics: every call counted by method and by the status it ended with (a
watch when it ends), beside what the registry holds."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import pytest
from prometheus_client.parser import text_string_to_metric_families

from nsm.api.registry_pb2 import NetworkService, NetworkServiceEndpoint
from nsm.errors import InvalidArgument

if TYPE_CHECKING:
    from conftest import Eventually, StartRegistry

pytestmark = pytest.mark.timeout(30)


def calls(text: str) -> dict[tuple[str, str], float]:
    return {(s.labels["method"], s.labels["code"]): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == "nsm_requests_total"}


async def test_every_call_is_counted_by_method_and_status(start_registry: StartRegistry,
                                                          eventually: Eventually) -> None:
    reg = await start_registry()
    registry = reg.daemon.registry
    await reg.client.register_ns(NetworkService(name="svc"))
    await reg.client.register_nse(NetworkServiceEndpoint(name="nse-1", network_service_names=["svc"],
                                                         url="unix:///run/nse.sock"))
    with pytest.raises(InvalidArgument):
        await reg.client.register_nse(NetworkServiceEndpoint(name="x" * 5000))
    assert [e.name for e in await reg.client.find_nse()] == ["nse-1"]
    async with reg.client.watch_nse() as watch:
        assert (await asyncio.wait_for(watch.__anext__(), 5))[0].name == "nse-1"
    await reg.client.unregister_nse("nse-1")

    def counted() -> dict[tuple[str, str], float]:
        return calls(registry.metrics.render()[0].decode())

    await eventually(lambda: ("nse.Watch", "CANCELLED") in counted(), timeout=5)
    assert counted() == {("ns.Register", "OK"): 1, ("nse.Register", "OK"): 1,
                         ("nse.Register", "INVALID_ARGUMENT"): 1, ("nse.Find", "OK"): 1,
                         ("nse.Watch", "CANCELLED"): 1, ("nse.Unregister", "OK"): 1}
    held = {s.labels["what"]: s.value for f in text_string_to_metric_families(
        registry.metrics.render()[0].decode()) for s in f.samples if s.name == "nsm_held"}
    assert held["endpoints"] == 0 and held["services"] == 1

"""Which endpoint a client gets: round robin over the endpoints of a service, fallback when one
is dead but still registered, and the NetworkService's ``matches`` (labels → endpoint labels,
with fallthrough)."""

from __future__ import annotations

import itertools
import time

import grpc
import pytest

from nsm.api.registry_pb2 import Destination, Match, NetworkService, NetworkServiceEndpoint
from nsm.errors import NotFound

pytestmark = [pytest.mark.kernel, pytest.mark.asyncio(loop_scope="session")]


@pytest.mark.timeout(60)
async def test_round_robin_then_fallback_when_an_endpoint_dies(mesh) -> None:
    service = "e2e-rr"
    a = await mesh.start_nse("rra", services=[service], cidr="10.98.1.0/24", expiry=60)
    b = await mesh.start_nse("rrb", services=[service], cidr="10.98.2.0/24", expiry=60)

    async def one() -> str:
        client = mesh.client(await mesh.netns(), service=service)
        try:
            return (await client.request()).network_service_endpoint_name
        finally:
            await client.close(raise_errors=True)

    # The manager learns of endpoints from its watch of the registry: wait until it has both.
    seen = {await one()}
    await mesh.eventually(lambda: _saw_both(one, seen, {a.name, b.name}), timeout=10,
                          what="the manager offers both endpoints", interval=0)
    chosen = [await one() for _ in range(4)]
    assert set(chosen) == {a.name, b.name}, chosen
    assert all(x != y for x, y in itertools.pairwise(chosen)), f"not alternating: {chosen}"

    await b.daemon.kill()  # SIGKILL: no unregister, its registration stays until it expires
    assert await mesh.registry_client().find_nse(NetworkServiceEndpoint(name=b.name)), \
        "the killed endpoint should still be registered (fallback, not expiry, is tested)"

    clients = [mesh.client(await mesh.netns(), service=service) for _ in range(4)]
    after = [(await c.request()).network_service_endpoint_name for c in clients]
    assert after == [a.name] * 4, after
    # It was tried and skipped, not left out.
    log = mesh.log_since_mark(mesh.manager)
    assert "endpoint failed; trying the next" in log and b.name in log
    # The attempts at the dead endpoint left nothing behind.
    assert await mesh.link_names(b.netns) == []
    assert len(await mesh.link_names(a.netns)) == 4
    snaps = await mesh.all_connections()
    assert len(snaps["manager"]) == len(snaps["forwarder"]) == len(snaps[a.name]) == 4
    for c in clients:
        await c.close(raise_errors=True)
    assert await mesh.link_names(a.netns) == []


async def _saw_both(one, seen: set[str], want: set[str]) -> bool:
    seen.add(await one())
    return seen >= want


@pytest.mark.timeout(60)
async def test_service_matches_pick_endpoints_by_labels(mesh) -> None:
    service = "e2e-match"
    ns = NetworkService(name=service, payload="IP", matches=[
        Match(source_selector={"app": "red"},
              routes=[Destination(destination_selector={"color": "red"})]),
        # no green endpoint: fall through to the next match for green clients
        Match(source_selector={"app": "green"},
              routes=[Destination(destination_selector={"color": "green"})], fallthrough=True),
        Match(source_selector={"app": "green"},
              routes=[Destination(destination_selector={"color": "blue"})]),
        # no yellow endpoint and no fallthrough: yellow clients get nothing
        Match(source_selector={"app": "yellow"},
              routes=[Destination(destination_selector={"color": "yellow"})]),
        # everyone else
        Match(source_selector={}, routes=[Destination(destination_selector={"color": "red"})]),
    ])
    registry = mesh.registry_client()
    await registry.register_ns(ns)
    try:
        red = await mesh.start_nse("red", services=[service], cidr="10.97.1.0/24",
                                   labels={"color": "red", "tier": "x"})
        blue = await mesh.start_nse("blue", services=[service], cidr="10.97.2.0/24",
                                    labels={"color": "blue"})
        stored = await registry.get_ns(service)
        assert stored is not None and len(stored.matches) == 5, "the endpoint replaced the service"

        async def endpoint_for(labels: dict[str, str]) -> str:
            client = mesh.client(await mesh.netns(), service=service, labels=labels)
            try:
                return (await client.request()).network_service_endpoint_name
            finally:
                await client.close(raise_errors=True)

        # The manager learns of endpoints from its watch of the registry: wait until it has
        # the blue one (it has the red one when a red client gets it).
        await mesh.eventually(lambda: _gets(endpoint_for, {"app": "green"}, blue.name), timeout=10,
                              what="the manager offers the blue endpoint", interval=0.05)
        for _ in range(2):  # stable, not round robin over both
            assert await endpoint_for({"app": "red"}) == red.name
            assert await endpoint_for({"app": "green"}) == blue.name
            assert await endpoint_for({"app": "other"}) == red.name
            assert await endpoint_for({}) == red.name
        client = mesh.client(await mesh.netns(), service=service, labels={"app": "yellow"})
        with pytest.raises(NotFound) as info:
            await client.request()
        assert info.value.code == grpc.StatusCode.NOT_FOUND
        assert await mesh.link_names(client.netns) == []
    finally:
        await registry.unregister_ns(service)


async def _gets(endpoint_for, labels: dict[str, str], want: str) -> bool:
    try:
        return await endpoint_for(labels) == want
    except NotFound:
        return False


@pytest.mark.timeout(60)
async def test_dead_endpoint_drops_out_at_registration_expiry(mesh) -> None:
    """No stale registration: a killed endpoint disappears at its expiry, and requests then fail
    fast with NOT_FOUND instead of trying it."""
    nse = await mesh.start_nse("stale", services=["e2e-stale"], cidr="10.91.0.0/24", expiry=2)
    await nse.daemon.kill()
    await mesh.wait_registered(nse.name, present=False, timeout=5)
    client = mesh.client(await mesh.netns(), service="e2e-stale")
    started = time.monotonic()
    with pytest.raises(NotFound):
        await client.request()
    assert time.monotonic() - started < 1.0
    assert "endpoint failed" not in mesh.log_since_mark(mesh.manager)

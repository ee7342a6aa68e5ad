"""The one way to the registry as the roles use it: the manager's cache and proxy over a
RegistryClient, and NseRefresher keeping an endpoint's services registered."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from nsm.api import registry_pb2 as pb
from nsm.api import registry_pb2_grpc
from nsm.api.registry_pb2 import NetworkService, NetworkServiceEndpoint, NetworkServiceLabels
from nsm.errors import Unavailable
from nsm.manager.cache import RegistryCache
from nsm.manager.proxy import LocalEndpoints, NseProxy, NsProxy, Replay
from nsm.registry.client import NseRefresher, RegistryClient
from nsm.transport import Server, dial
from nsm.wellknown import FORWARDER_SERVICE, NODE_LABEL

if TYPE_CHECKING:
    from conftest import Eventually, Harness, StartRegistry

pytestmark = pytest.mark.timeout(30)


def endpoint(name: str, url: str = "unix:///run/nse.sock", service: str = "svc"
             ) -> NetworkServiceEndpoint:
    return NetworkServiceEndpoint(
        name=name, url=url, network_service_names=[service],
        network_service_labels={service: NetworkServiceLabels(labels={"app": "x"})})


@dataclass
class Front:
    """A manager's registry proxy in front of a registry, and a client of the proxy."""

    client: RegistryClient
    local: LocalEndpoints
    replay: Replay
    advertised: list[str | None]


@pytest.fixture
async def front(reg: Harness, tmp_path: Path) -> AsyncIterator[Front]:
    local = LocalEndpoints()
    replay = Replay(reg.client)
    advertised: list[str | None] = ["tcp://10.0.0.1:5001"]
    server = Server([f"unix://{tmp_path}/mgr.sock"])
    registry_pb2_grpc.add_NetworkServiceRegistryServicer_to_server(
        NsProxy(reg.client, replay), server.grpc)
    registry_pb2_grpc.add_NetworkServiceEndpointRegistryServicer_to_server(
        NseProxy(reg.client, local=local, advertise=lambda: advertised[0], node="node1",
                 replay=replay), server.grpc)
    await server.start()
    channel = dial(str(server.urls[0]))
    try:
        yield Front(RegistryClient(channel, timeout=5), local, replay, advertised)
    finally:
        await channel.close()
        await server.stop(0.1)


# --- the manager's registry proxy ------------------------------------------------------------


async def test_proxy_registers_endpoints_under_the_url_advertised_at_each_register(
    reg: Harness, front: Front
) -> None:
    mine = await front.client.register_nse(endpoint("e1", "unix:///run/e1.sock"))
    assert mine.url == "unix:///run/e1.sock"  # the endpoint sees its own URL back
    stored = await reg.client.get_nse("e1")
    assert stored is not None and stored.url == "tcp://10.0.0.1:5001"
    assert stored.network_service_labels["svc"].labels == {"app": "x", NODE_LABEL: "node1"}
    assert front.local.get("e1") == "unix:///run/e1.sock"  # on this node

    front.advertised[0] = "tcp://10.0.0.2:5001"  # asked again on every Register
    await front.client.register_nse(endpoint("e1", "unix:///run/e1.sock"))
    stored = await reg.client.get_nse("e1")
    assert stored is not None and stored.url == "tcp://10.0.0.2:5001"

    front.advertised[0] = None  # no URL for other nodes: the endpoint's own, still local
    await front.client.register_nse(endpoint("e2", "tcp://10.1.1.1:5003"))
    stored = await reg.client.get_nse("e2")
    assert stored is not None and stored.url == "tcp://10.1.1.1:5003"
    assert stored.network_service_labels["svc"].labels[NODE_LABEL] == "node1"
    assert front.local.get("e2") == "tcp://10.1.1.1:5003"

    fwd = endpoint("fwd1", "unix:///run/fwd.sock", service=FORWARDER_SERVICE)
    await front.client.register_nse(fwd)  # forwarders pass through unchanged
    stored = await reg.client.get_nse("fwd1")
    assert stored is not None and stored.url == "unix:///run/fwd.sock"
    assert NODE_LABEL not in stored.network_service_labels[FORWARDER_SERVICE].labels
    assert front.local.get("fwd1") is None
    assert set(front.replay.endpoints) == {"e1", "e2", "fwd1"}

    await front.client.unregister_nse("e1")
    assert front.local.get("e1") is None and "e1" not in front.replay.endpoints
    assert await reg.client.get_nse("e1") is None
    assert len(front.local) == 1


async def test_proxy_passes_services_finds_and_watches_through(
    reg: Harness, front: Front
) -> None:
    ns = NetworkService(name="svc", matches=[pb.Match(routes=[pb.Destination(
        destination_selector={"app": "x"})])])
    await front.client.register_ns(ns)
    assert front.replay.services["svc"].payload == "IP"
    found = await reg.client.get_ns("svc")
    assert found is not None and len(found.matches) == 1
    async with front.client.watch_nse() as watch:
        await reg.client.register_nse(endpoint("e1"))
        nse, deleted = await asyncio.wait_for(anext(watch), 3)
        assert (nse.name, deleted) == ("e1", False)
        await reg.client.unregister_nse("e1")
        nse, deleted = await asyncio.wait_for(anext(watch), 3)
        assert (nse.name, deleted) == ("e1", True)
    assert [s.name for s in await front.client.find_ns()] == ["svc"]
    await front.client.unregister_ns("svc")
    assert await reg.client.find_ns() == [] and front.replay.services == {}


async def test_proxy_passes_a_registry_outage_on_as_unavailable(
    reg: Harness, front: Front
) -> None:
    async with front.client.watch_nse() as watch:
        await reg.client.register_nse(endpoint("e1"))
        await asyncio.wait_for(anext(watch), 3)
        await reg.daemon.stop()
        with pytest.raises(Unavailable):
            await asyncio.wait_for(anext(watch), 3)
    with pytest.raises(Unavailable):
        await front.client.register_nse(endpoint("e2"))
    with pytest.raises(Unavailable):
        await front.client.find_nse()
    assert front.local.get("e2") is None


# --- the manager's cache -----------------------------------------------------------------------


async def test_cache_follows_the_registry_and_watches_again_after_a_restart(
    start_registry: StartRegistry, tmp_path: Path, eventually: Eventually
) -> None:
    sock = str(tmp_path / "cache.sock")
    first = await start_registry(sock=sock)
    channel = dial(f"unix://{sock}")
    cache = RegistryCache(RegistryClient(channel, timeout=2))
    await cache.start()
    try:
        await first.client.register_ns(NetworkService(name="svc"))
        await first.client.register_nse(endpoint("e1"))
        await eventually(lambda: cache.live and "e1" in cache._nse)
        assert [n.name for n in await cache.endpoints("svc")] == ["e1"]
        ns = await cache.network_service("svc")
        assert ns is not None and ns.payload == "IP"

        await first.daemon.stop()  # the watches break: the cache is no longer live
        await eventually(lambda: not cache.live)
        # It falls back to a Find, which fails: the last view answers (a refresh of a live
        # connection must not fail while the registry restarts); a service never seen fails.
        assert [n.name for n in await cache.endpoints("svc")] == ["e1"]
        with pytest.raises(Unavailable):
            await cache.endpoints("other")

        second = await start_registry(sock=sock)  # empty, at the same address
        # (directly: a new channel may share a connection still in backoff)
        await second.daemon.registry.register_nse(endpoint("e2"))
        await eventually(lambda: "e2" in cache._nse, timeout=10)  # watching again
        assert (await cache.endpoint("e2")) is not None
        assert await cache.network_service("nothing") is None
    finally:
        await cache.stop()
        await channel.close()


async def test_cache_drops_an_endpoint_at_its_expiry(
    start_registry: StartRegistry, eventually: Eventually
) -> None:
    reg = await start_registry(expiry=0.3)
    cache = RegistryCache(reg.client)
    await cache.start()
    try:
        await reg.client.register_nse(endpoint("e1"))
        await eventually(lambda: "e1" in cache._nse)
        await eventually(lambda: "e1" not in cache._nse, timeout=3)
        assert await cache.endpoint("e1") is None
    finally:
        await cache.stop()


# --- NseRefresher: an endpoint's services ------------------------------------------------------


async def test_refresher_registers_missing_services_and_keeps_existing_ones(
    start_registry: StartRegistry, eventually: Eventually
) -> None:
    reg = await start_registry(expiry=0.3)
    ethernet = NetworkService(name="l2", payload="ETHERNET",
                              matches=[pb.Match(source_selector={"a": "b"})])
    await reg.client.register_ns(ethernet)
    wanted = [NetworkService(name="l2", payload="IP"), NetworkService(name="ip", payload="IP")]
    nse = endpoint("e1")
    nse.network_service_names[:] = ["l2", "ip"]
    async with NseRefresher(reg.client, nse, services=wanted) as refresher:
        l2, ip = await reg.client.get_ns("l2"), await reg.client.get_ns("ip")
        assert l2 is not None and l2.payload == "ETHERNET" and len(l2.matches) == 1
        assert ip is not None and ip.payload == "IP"
        assert set(refresher.services) == {"l2", "ip"}
        await reg.client.unregister_ns("l2")  # gone (a registry restart, an operator)
        await eventually(lambda: "l2" in reg.ns_store._entries)
        back = await reg.client.get_ns("l2")
        assert back == l2  # the record as it was, not a default one


async def test_refresher_start_retries_a_peer_that_does_not_serve_the_registry_yet(
    start_registry: StartRegistry, tmp_path: Path
) -> None:
    """UNIMPLEMENTED is among the retryable errors: a manager whose registry proxy is not up."""
    sock = tmp_path / "early.sock"
    other = Server([f"unix://{sock}"])  # serves nothing the refresher asks for
    await other.start()
    channel = dial(f"unix://{sock}")
    refresher = NseRefresher(RegistryClient(channel, timeout=1), endpoint("e1"),
                             min_backoff=0.05, max_backoff=0.1)
    starting = asyncio.create_task(refresher.start())
    try:
        await asyncio.sleep(0.4)
        assert not starting.done()  # retrying, not failed
        await other.stop(0)
        reg = await start_registry(sock=str(sock))
        started = time.monotonic()
        assert (await asyncio.wait_for(starting, 10)).name == "e1"
        assert time.monotonic() - started < 5
        assert [e.name for e in await reg.client.find_nse()] == ["e1"]
        await refresher.stop()
    finally:
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        await refresher.stop()
        await channel.close()


async def test_a_stream_left_early_cancels_its_call(reg: Harness, eventually: Eventually) -> None:
    """A consumer that stops reading a (proxied) Find leaves no call open at the registry."""
    await reg.client.register_nse(endpoint("e1"))
    stream = reg.client.query_nse(pb.NetworkServiceEndpointQuery(
        network_service_endpoint=NetworkServiceEndpoint(), watch=True))
    assert (await anext(stream)).network_service_endpoint.name == "e1"
    assert reg.nse_store.watcher_count == 1
    await stream.aclose()  # type: ignore[attr-defined]
    await eventually(lambda: reg.nse_store.watcher_count == 0)

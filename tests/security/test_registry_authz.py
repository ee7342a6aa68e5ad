"""Registry authorization (issue 9, item 4): each registry attack of the issue's table, tried
against a real secure registry and a real manager registry proxy, is refused; the legitimate
flows still work.

Every identity is a :class:`~nsm.security.tls.Security` issued by one in-memory CA; "serving a
URL" means a real secure :class:`~nsm.transport.Server` there (it proves its SPIFFE ID).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from nsm.api import registry_pb2_grpc
from nsm.api.registry_pb2 import NetworkService, NetworkServiceEndpoint, NetworkServiceLabels
from nsm.errors import FailedPrecondition, PermissionDenied
from nsm.lab import harness
from nsm.manager.proxy import LocalEndpoints, NseProxy, NsProxy, Replay
from nsm.registry import authz
from nsm.registry.authz import RegistryPolicy
from nsm.registry.client import RegistryClient
from nsm.registry.main import RegistryDaemon
from nsm.security.ca import CertificateAuthority
from nsm.security.ids import node_id, registry_id, workload_id
from nsm.security.sources import CaSource
from nsm.security.tls import Security
from nsm.transport import Server, dial
from nsm.wellknown import FORWARDER_SERVICE, MANAGER_URL_LABEL, NODE_LABEL

pytestmark = pytest.mark.timeout(60)

TD = "nsm.lab"


def record(name: str, url: str, *, service: str = "svc", node: str | None = None,
           app: str = "x") -> NetworkServiceEndpoint:
    labels = {"app": app}
    if node is not None:
        labels[NODE_LABEL] = node
    return NetworkServiceEndpoint(name=name, url=url, network_service_names=[service],
                                  network_service_labels={service: NetworkServiceLabels(labels=labels)})


def forwarder_record(name: str, url: str, node: str, manager_url: str) -> NetworkServiceEndpoint:
    labels = {MANAGER_URL_LABEL: manager_url, NODE_LABEL: node, "p2p": "true"}
    return NetworkServiceEndpoint(
        name=name, url=url, network_service_names=[FORWARDER_SERVICE],
        network_service_labels={FORWARDER_SERVICE: NetworkServiceLabels(labels=labels)})


@dataclass
class Party:
    """One identity: its Security, the URL it serves (and proves), a client of the registry."""

    sid: str
    security: Security
    url: str
    registry: RegistryClient


@dataclass
class World:
    tmp: Path
    stack: contextlib.AsyncExitStack
    ca: CertificateAuthority
    registry_url: str = ""
    daemon: RegistryDaemon | None = None
    count: int = 0
    proofs: list[str] = field(default_factory=list)

    def path(self, name: str) -> str:
        self.count += 1
        return f"unix://{self.tmp}/{self.count}-{name}.sock"

    async def security(self, sid: str) -> Security:
        sec = Security(CaSource(self.ca, sid, trust_domain=TD, dns_names=(TD,)), trust_domain=TD)
        await sec.start()
        self.stack.push_async_callback(sec.close)
        return sec

    async def serve(self, security: Security, *extra: Callable[[Server], None]) -> str:
        server = Server([self.path("srv")], security=security)
        for add in extra:
            add(server)
        await server.start()
        self.stack.push_async_callback(server.stop, 0.1)
        return str(server.urls[0])

    def client(self, security: Security, url: str | None = None) -> RegistryClient:
        channel = dial(url or self.registry_url, security)
        self.stack.push_async_callback(channel.close)
        return RegistryClient(channel, timeout=5.0, security=security)

    async def party(self, sid: str) -> Party:
        sec = await self.security(sid)
        return Party(sid, sec, await self.serve(sec), self.client(sec))

    async def start_registry(self, policy: RegistryPolicy | None = None) -> None:
        sec = await self.security(registry_id(TD))
        self.daemon = await self.stack.enter_async_context(
            RegistryDaemon([self.path("registry")], grace=0.1, security=sec, policy=policy))
        self.registry_url = self.daemon.url

    async def stored(self, name: str) -> NetworkServiceEndpoint | None:
        assert self.daemon is not None
        entry = await self.daemon.registry.nse_store.get(name)
        return None if entry is None else entry.record

    async def owner(self, name: str) -> str | None:
        assert self.daemon is not None
        entry = await self.daemon.registry.nse_store.get(name)
        return None if entry is None else entry.owner


@pytest.fixture
async def registry_world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[World]:
    """A CA, a secure registry, and a record of every URL proof the registry asks for."""
    async with harness.no_leaked_tasks(), contextlib.AsyncExitStack() as stack:
        world = World(tmp_path, stack, CertificateAuthority.create(TD))
        real = authz.prove.prove

        async def counting(channel: grpc.aio.Channel, security: Any, **kw: Any) -> Any:
            answer = await real(channel, security, **kw)
            world.proofs.append(str(answer[0]))
            return answer

        monkeypatch.setattr(authz.prove, "prove", counting)
        await world.start_registry()
        yield world


@dataclass
class Proxy:
    """A manager of ``node`` (its identity, its registry proxy served at ``url``)."""

    node: str
    security: Security
    url: str
    local: LocalEndpoints
    nse_proxy: NseProxy


async def start_proxy(world: World, node: str) -> Proxy:
    sec = await world.security(node_id(TD, node, "manager"))
    upstream = world.client(sec)
    local, replay = LocalEndpoints(), Replay(upstream)
    urls: list[str] = []
    nse_proxy = NseProxy(upstream, local=local, advertise=lambda: urls[0], own_urls=lambda: urls,
                         node=node, replay=replay, gone_grace=None, security=sec)
    world.stack.push_async_callback(nse_proxy.shutdown)

    def add(server: Server) -> None:
        registry_pb2_grpc.add_NetworkServiceRegistryServicer_to_server(
            NsProxy(upstream, replay, security=sec), server.grpc)
        registry_pb2_grpc.add_NetworkServiceEndpointRegistryServicer_to_server(nse_proxy, server.grpc)

    urls.append(await world.serve(sec, add))
    return Proxy(node, sec, urls[0], local, nse_proxy)


# --- directly at the registry ------------------------------------------------------------------


async def test_only_the_first_registrant_reregisters_or_unregisters_an_endpoint(
        registry_world: World) -> None:
    w = registry_world
    alice = await w.party(workload_id(TD, "alice"))
    evil = await w.party(workload_id(TD, "evil"))
    await alice.registry.register_nse(record("e1", alice.url, node="node1"))
    assert await w.owner("e1") == alice.sid

    # overwrite its URL (ours, which we do serve), or its labels with its own URL
    with pytest.raises(PermissionDenied, match="owned by"):
        await evil.registry.register_nse(record("e1", evil.url, node="node1"))
    with pytest.raises(PermissionDenied):
        await evil.registry.register_nse(record("e1", alice.url, node="node1", app="evil"))
    with pytest.raises(PermissionDenied, match="owned by"):
        await evil.registry.unregister_nse("e1")
    stored = await w.stored("e1")
    assert stored is not None and stored.url == alice.url
    assert stored.network_service_labels["svc"].labels["app"] == "x"

    # the owner refreshes, changes its labels, unregisters; then the name is free
    await alice.registry.register_nse(record("e1", alice.url, node="node1", app="y"))
    assert (await alice.registry.get_nse("e1")).network_service_labels["svc"].labels["app"] == "y"
    await alice.registry.unregister_nse("e1")
    assert await w.stored("e1") is None
    await evil.registry.register_nse(record("e1", evil.url, node="node1"))
    assert await w.owner("e1") == evil.sid


async def test_a_record_whose_url_another_identity_serves_is_refused(registry_world: World) -> None:
    w = registry_world
    alice = await w.party(workload_id(TD, "alice"))
    evil = await w.party(workload_id(TD, "evil"))
    with pytest.raises(PermissionDenied, match=f"served by {alice.sid}"):
        await evil.registry.register_nse(record("rogue", alice.url, node="node1"))
    plain = Server([w.path("plain")])  # no identity to prove there
    await plain.start()
    w.stack.push_async_callback(plain.stop, 0.1)
    for url in (str(plain.urls[0]), f"unix://{w.tmp}/nobody.sock"):
        with pytest.raises(FailedPrecondition, match="cannot reach"):
            await evil.registry.register_nse(record("rogue", url, node="node1"))
    assert await w.stored("rogue") is None


async def test_proofs_are_cached_so_refreshes_cost_nothing(registry_world: World) -> None:
    w = registry_world
    alice = await w.party(workload_id(TD, "alice"))
    for _ in range(5):
        await alice.registry.register_nse(record("e1", alice.url, node="node1"))
    assert w.proofs == [alice.sid]


async def test_only_a_manager_may_name_another_registrant(registry_world: World) -> None:
    w = registry_world
    alice = await w.party(workload_id(TD, "alice"))
    evil = await w.party(workload_id(TD, "evil"))
    await alice.registry.register_nse(record("e1", alice.url, node="node1"))
    with pytest.raises(PermissionDenied, match="only a manager"):
        await evil.registry.register_nse(record("e1", alice.url, node="node1"),
                                         registrant=alice.sid)
    with pytest.raises(PermissionDenied, match="only a manager"):
        await evil.registry.unregister_nse("e1", registrant=alice.sid)
    assert await w.stored("e1") is not None


async def test_forwarder_records_come_only_from_that_nodes_forwarder(registry_world: World) -> None:
    w = registry_world
    fwd1 = await w.party(node_id(TD, "node1", "forwarder"))
    evil = await w.party(workload_id(TD, "evil"))
    manager_url = "tcp://10.0.0.1:5001"
    with pytest.raises(PermissionDenied, match="only a forwarder"):
        await evil.registry.register_nse(forwarder_record("evil-fwd", evil.url, "node1", manager_url))
    with pytest.raises(PermissionDenied, match="its node node1 only"):
        await fwd1.registry.register_nse(forwarder_record("fwd", fwd1.url, "node2", manager_url))
    await fwd1.registry.register_nse(forwarder_record("node1-fwd", fwd1.url, "node1", manager_url))
    with pytest.raises(PermissionDenied):  # overwrite the forwarder's record
        await evil.registry.register_nse(forwarder_record("node1-fwd", evil.url, "node1", manager_url))
    with pytest.raises(PermissionDenied):
        await evil.registry.unregister_nse("node1-fwd")
    stored = await w.stored("node1-fwd")
    assert stored is not None and stored.url == fwd1.url


async def test_a_manager_registers_and_unregisters_only_its_nodes_records(registry_world: World) -> None:
    w = registry_world
    alice = await w.party(workload_id(TD, "alice"))
    bob = await w.party(workload_id(TD, "bob"))
    mgr1 = await w.party(node_id(TD, "node1", "manager"))
    mgr2 = await w.party(node_id(TD, "node2", "manager"))
    with pytest.raises(PermissionDenied, match="only records of node node1"):
        await mgr1.registry.register_nse(record("e1", mgr1.url, node="node2"), registrant=alice.sid)
    with pytest.raises(PermissionDenied, match="no nodeName"):
        await mgr1.registry.register_nse(record("e1", mgr1.url), registrant=alice.sid)
    with pytest.raises(PermissionDenied, match="forwarder of another node"):
        await mgr1.registry.register_nse(
            forwarder_record("f", mgr1.url, "node2", mgr2.url),
            registrant=node_id(TD, "node2", "forwarder"))
    # under the manager's own URL, which it proves, on behalf of alice: alice owns it
    await mgr1.registry.register_nse(record("e1", mgr1.url, node="node1"), registrant=alice.sid)
    assert await w.owner("e1") == alice.sid
    # not under another manager's URL
    with pytest.raises(PermissionDenied, match="served by"):
        await mgr1.registry.register_nse(record("e2", mgr2.url, node="node1"), registrant=bob.sid)
    # bob on the same node cannot take it over through the manager
    with pytest.raises(PermissionDenied, match="owned by"):
        await mgr1.registry.register_nse(record("e1", mgr1.url, node="node1"), registrant=bob.sid)
    # the other node's manager cannot remove it, even on alice's behalf
    with pytest.raises(PermissionDenied, match="node node2"):
        await mgr2.registry.unregister_nse("e1", registrant=alice.sid)
    await mgr1.registry.unregister_nse("e1", registrant=alice.sid)  # alice is gone: on her behalf
    assert await w.stored("e1") is None


async def test_network_service_records_are_owned_too(registry_world: World) -> None:
    w = registry_world
    alice = await w.party(workload_id(TD, "alice"))
    evil = await w.party(workload_id(TD, "evil"))
    await alice.registry.register_ns(NetworkService(name="svc", payload="IP"))
    await evil.registry.register_ns(NetworkService(name="svc", payload="IP"))  # same: a no-op
    with pytest.raises(PermissionDenied, match="owned by"):
        await evil.registry.register_ns(NetworkService(name="svc", payload="ETHERNET"))
    with pytest.raises(PermissionDenied, match="owned by"):
        await evil.registry.unregister_ns("svc")
    assert (await alice.registry.get_ns("svc")).payload == "IP"
    await alice.registry.unregister_ns("svc")
    assert await alice.registry.get_ns("svc") is None


async def test_each_rule_can_be_switched_off(tmp_path: Path) -> None:
    async with harness.no_leaked_tasks(), contextlib.AsyncExitStack() as stack:
        w = World(tmp_path, stack, CertificateAuthority.create(TD))
        await w.start_registry(RegistryPolicy.without(["owner", "url"]))
        alice = await w.party(workload_id(TD, "alice"))
        evil = await w.party(workload_id(TD, "evil"))
        await alice.registry.register_nse(record("e1", alice.url, node="node1"))
        await evil.registry.register_nse(record("e1", alice.url + ".x", node="node1"))
        assert (await w.stored("e1")).url == alice.url + ".x"
        with pytest.raises(PermissionDenied):  # the forwarder rule still applies
            await evil.registry.register_nse(forwarder_record("f", evil.url, "node1", "tcp://m:1"))
    with pytest.raises(Exception, match="unknown registry policy"):
        RegistryPolicy.without(["nope"])


# --- through a manager's registry proxy ------------------------------------------------------


async def test_proxy_registers_a_real_endpoint_on_its_behalf(registry_world: World) -> None:
    w = registry_world
    proxy = await start_proxy(w, "node1")
    alice = await w.party(workload_id(TD, "alice"))
    via = w.client(alice.security, proxy.url)
    mine = await via.register_nse(record("e1", alice.url))
    assert mine.url == alice.url
    stored = await w.stored("e1")
    assert stored is not None and stored.url == proxy.url
    assert stored.network_service_labels["svc"].labels[NODE_LABEL] == "node1"
    assert await w.owner("e1") == alice.sid and proxy.local.get("e1") == alice.url
    await via.register_nse(record("e1", alice.url))  # a refresh
    # as the node's forwarder sees it: the real URL
    fwd = await w.security(node_id(TD, "node1", "forwarder"))
    seen = await w.client(fwd, proxy.url).get_nse("e1")
    assert seen is not None and seen.url == alice.url
    # alice dies without unregistering: the manager removes her record on her behalf
    await proxy.nse_proxy.gone("e1")
    assert await w.stored("e1") is None
    await via.register_nse(record("e1", alice.url))
    await via.unregister_nse("e1")
    assert await w.stored("e1") is None and proxy.local.get("e1") is None


async def test_proxy_refuses_rogue_records_and_takeovers(registry_world: World) -> None:
    w = registry_world
    proxy = await start_proxy(w, "node1")
    alice = await w.party(workload_id(TD, "alice"))
    evil = await w.party(workload_id(TD, "evil"))
    victim_ns = await w.party(workload_id(TD, "victim"))  # serves a socket evil wants dialled
    await w.client(alice.security, proxy.url).register_nse(record("e1", alice.url))
    via = w.client(evil.security, proxy.url)

    # a rogue endpoint with a "real" URL of our choosing (served by someone else, or by nobody)
    with pytest.raises(PermissionDenied, match="served by"):
        await via.register_nse(record("rogue", victim_ns.url))
    with pytest.raises(PermissionDenied, match="served by"):
        await via.register_nse(record("rogue", proxy.url))  # the manager's own socket
    with pytest.raises(FailedPrecondition):
        await via.register_nse(record("rogue", f"unix://{w.tmp}/node-netns.sock"))
    # take over alice's name (with our own URL), or unregister her
    with pytest.raises(PermissionDenied, match="registered by"):
        await via.register_nse(record("e1", evil.url))
    with pytest.raises(PermissionDenied, match="registered by"):
        await via.unregister_nse("e1")
    # a record claiming another node, or a forwarder record
    with pytest.raises(PermissionDenied, match="node node1 only"):
        await via.register_nse(record("e9", evil.url, node="node2"))
    with pytest.raises(PermissionDenied, match="only the forwarder of node node1"):
        await via.register_nse(forwarder_record("node1-fwd", evil.url, "node1", proxy.url))

    assert proxy.local.get("rogue") is None and proxy.local.get("e1") == alice.url
    assert await w.stored("rogue") is None and await w.stored("node1-fwd") is None
    assert (await w.stored("e1")).url == proxy.url and await w.owner("e1") == alice.sid
    # what the node's forwarder resolves through its manager: only alice's real URL
    fwd = await w.security(node_id(TD, "node1", "forwarder"))
    seen = {n.name: n.url for n in await w.client(fwd, proxy.url).find_nse()}
    assert seen == {"e1": alice.url}


async def test_proxy_takes_forwarder_records_only_from_its_nodes_forwarder(
        registry_world: World) -> None:
    w = registry_world
    proxy = await start_proxy(w, "node1")
    fwd1 = await w.party(node_id(TD, "node1", "forwarder"))
    fwd2 = await w.party(node_id(TD, "node2", "forwarder"))
    with pytest.raises(PermissionDenied, match="only the forwarder of node node1"):
        await w.client(fwd2.security, proxy.url).register_nse(
            forwarder_record("node2-fwd", fwd2.url, "node2", proxy.url))
    via = w.client(fwd1.security, proxy.url)
    with pytest.raises(PermissionDenied, match="one of this manager's URLs"):  # serve another
        await via.register_nse(forwarder_record("node1-fwd", fwd1.url, "node1", "tcp://10.0.0.2:5001"))
    with pytest.raises(PermissionDenied, match="node node1 only"):
        await via.register_nse(forwarder_record("node1-fwd", fwd1.url, "node2", proxy.url))
    await via.register_nse(forwarder_record("node1-fwd", fwd1.url, "node1", proxy.url))
    stored = await w.stored("node1-fwd")
    assert stored is not None and stored.url == fwd1.url
    assert await w.owner("node1-fwd") == fwd1.sid
    # a workload cannot overwrite it directly either
    evil = await w.party(workload_id(TD, "evil"))
    with pytest.raises(PermissionDenied):
        await evil.registry.register_nse(forwarder_record("node1-fwd", evil.url, "node1", proxy.url))
    await via.unregister_nse("node1-fwd")
    assert await w.stored("node1-fwd") is None

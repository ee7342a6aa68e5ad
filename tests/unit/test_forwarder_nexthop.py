"""The forwarder resolves its next hop from the endpoint's name (fakes for the registry): a
refresh of a connection it holds goes where it went when the registry cannot tell it now (the
endpoint's manager restarted and the endpoint has not registered again), a new connection or
another endpoint never does."""

from __future__ import annotations

import pytest

from nsm.api.connection_pb2 import Connection
from nsm.api.registry_pb2 import NetworkServiceEndpoint
from nsm.chain import Chain, Ctx
from nsm.errors import EndpointUnreachable, Unavailable
from nsm.forwarder.forwarder import Forwarder
from nsm.forwarder.mechanism import NextHop
from nsm.wellknown import NODE_LABEL

pytestmark = pytest.mark.timeout(10)


class FakeEndpoints:
    """The registry as the forwarder sees it: ``records`` by name; ``down`` raises."""

    def __init__(self) -> None:
        self.records: dict[str, NetworkServiceEndpoint] = {}
        self.down = False

    def add(self, name: str, url: str, node: str) -> None:
        nse = NetworkServiceEndpoint(name=name, url=url, network_service_names=["blue"])
        nse.network_service_labels["blue"].labels[NODE_LABEL] = node
        self.records[name] = nse

    async def endpoint(self, name: str) -> NetworkServiceEndpoint | None:
        if self.down:
            raise Unavailable("registry find nse: failed to connect to all addresses")
        return self.records.get(name)


def _conn(nse: str) -> Connection:
    return Connection(id="c1", network_service="blue", network_service_endpoint_name=nse)


@pytest.fixture
async def forwarder() -> tuple[Forwarder, FakeEndpoints]:
    fwd = Forwarder(name="node1-fwd", node="node1", listen=["unix:///tmp/unused.sock"],
                    manager_url="unix:///tmp/unused-mgr.sock", registry_url="unix:///tmp/unused-mgr.sock")
    fake = FakeEndpoints()
    fwd.endpoints = fake  # type: ignore[assignment]
    return fwd, fake


async def test_a_refresh_goes_where_it_went_when_the_registry_cannot_tell(forwarder) -> None:  # type: ignore[no-untyped-def]
    fwd, fake = forwarder
    ctx = Ctx(chain=Chain([]))
    fake.add("nse-1", "unix:///run/nse-1.sock", "node1")
    first = await fwd.next_hop(ctx, _conn("nse-1"))
    assert first == NextHop(url="unix:///run/nse-1.sock", local=True)
    fake.records.clear()  # its manager restarted: not known until it registers again
    assert await fwd.next_hop(ctx, _conn("nse-1")) == first
    fake.down = True  # the registry cannot be asked at all
    assert await fwd.next_hop(ctx, _conn("nse-1")) == first
    fake.down = False
    fake.add("nse-1", "tcp://10.0.0.2:5001", "node2")  # it moved: what the registry says wins
    assert await fwd.next_hop(ctx, _conn("nse-1")) == NextHop(url="tcp://10.0.0.2:5001", local=False)


async def test_a_new_connection_or_another_endpoint_needs_the_registry(forwarder) -> None:  # type: ignore[no-untyped-def]
    fwd, fake = forwarder
    ctx = Ctx(chain=Chain([]))
    with pytest.raises(EndpointUnreachable, match="not known to the registry of node node1"):
        await fwd.next_hop(ctx, _conn("nse-1"))
    fake.add("nse-1", "unix:///run/nse-1.sock", "node1")
    await fwd.next_hop(ctx, _conn("nse-1"))
    with pytest.raises(EndpointUnreachable, match="endpoint nse-2 is not known"):
        await fwd.next_hop(ctx, _conn("nse-2"))  # the manager chose another one
    fake.down = True
    with pytest.raises(Unavailable):
        await fwd.next_hop(Ctx(chain=Chain([])), _conn("nse-1"))  # a connection it does not hold

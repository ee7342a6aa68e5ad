"""The manager's selection on a reselect (``state=RESELECT_REQUESTED``) and on any other Request:
which endpoint and forwarder are tried first, with a fake registry view and a fake next hop."""

from __future__ import annotations

from typing import Any

from nsm.api.connection_pb2 import RESELECT_REQUESTED, UP, Connection
from nsm.api.networkservice_pb2 import NetworkServiceRequest
from nsm.api.registry_pb2 import NetworkService, NetworkServiceEndpoint, NetworkServiceLabels
from nsm.chain import Chain, Ctx, Element, NextRequest
from nsm.elements.connect import NEXT_URL
from nsm.errors import Unavailable
from nsm.manager.select import Discover, RoundRobin, SelectForwarder
from nsm.wellknown import FORWARDER_SERVICE, MANAGER_URL_LABEL

MGR = "unix:///run/nsm/mgr.sock"


class FakeCache:
    """The part of :class:`nsm.manager.cache.RegistryCache` selection uses."""

    def __init__(self, endpoints: list[str], forwarders: list[str]) -> None:
        self.nses = {n: NetworkServiceEndpoint(name=n, url=f"unix:///{n}.sock",
                                               network_service_names=["blue"]) for n in endpoints}
        self.fwds = []
        for f in forwarders:
            fwd = NetworkServiceEndpoint(name=f, url=f"unix:///{f}.sock",
                                         network_service_names=[FORWARDER_SERVICE])
            fwd.network_service_labels[FORWARDER_SERVICE].CopyFrom(
                NetworkServiceLabels(labels={MANAGER_URL_LABEL: MGR}))
            self.fwds.append(fwd)

    async def network_service(self, name: str) -> NetworkService | None:
        return NetworkService(name=name, payload="IP") if name == "blue" else None

    async def endpoint(self, name: str) -> NetworkServiceEndpoint | None:
        return self.nses.get(name)

    async def endpoints(self, service: str) -> list[NetworkServiceEndpoint]:
        return list(self.fwds) if service == FORWARDER_SERVICE else list(self.nses.values())


class NextHop(Element):
    """Records (forwarder URL, endpoint) of every try; fails those in ``dead``."""

    def __init__(self) -> None:
        self.tries: list[tuple[str, str]] = []
        self.dead: set[str] = set()

    async def request(self, ctx: Ctx, request: NetworkServiceRequest, next: NextRequest) -> Connection:
        fwd = (ctx.meta.get(NEXT_URL) or "").removeprefix("unix:///").removesuffix(".sock")
        nse = request.connection.network_service_endpoint_name
        self.tries.append((fwd, nse))
        if fwd in self.dead or nse in self.dead:
            raise Unavailable(f"{fwd}/{nse} is dead")
        return request.connection


def chain(cache: FakeCache) -> tuple[Chain, NextHop]:
    tail = NextHop()
    return Chain([Discover(cache, node="node1"),  # type: ignore[arg-type]
                  SelectForwarder(cache, manager_urls=lambda: [MGR]),  # type: ignore[arg-type]
                  RoundRobin(), tail]), tail


def request(*, endpoint: str = "", state: Any = UP, path: tuple[str, ...] = ()) -> NetworkServiceRequest:
    req = NetworkServiceRequest()
    conn = req.connection
    conn.id, conn.network_service, conn.state = "c1", "blue", state
    conn.network_service_endpoint_name = endpoint
    for name in ("nsc", "node1", *path):
        conn.path.path_segments.add(name=name, id=f"{name}-id")
    conn.path.index = 1
    return req


async def test_a_request_naming_its_endpoint_keeps_it_and_the_forwarder_on_its_path() -> None:
    c, tail = chain(FakeCache(["a", "b", "c"], ["f1", "f2"]))
    for _ in range(3):
        await c.request(request(endpoint="b", path=("f2", "b")))
    assert tail.tries == [("f2", "b")] * 3


async def test_a_reselect_ignores_the_stale_name_and_tries_the_old_endpoint_last() -> None:
    c, tail = chain(FakeCache(["a", "b", "c"], ["f1"]))
    seen = []
    for _ in range(6):
        tail.tries.clear()
        conn = await c.request(request(endpoint="b", state=RESELECT_REQUESTED))
        seen.append(conn.network_service_endpoint_name)
    assert "b" not in seen and set(seen) == {"a", "c"}, seen  # never pinned to the old one
    tail.dead = {"a", "c"}
    tail.tries.clear()
    conn = await c.request(request(endpoint="b", state=RESELECT_REQUESTED))
    assert conn.network_service_endpoint_name == "b" and tail.tries[-1] == ("f1", "b")  # the only one left
    assert len(tail.tries) == 3


async def test_a_reselect_tries_the_forwarder_of_the_old_path_last() -> None:
    c, tail = chain(FakeCache(["a"], ["f1", "f2"]))
    await c.request(request(endpoint="a", path=("f1", "a")))
    await c.request(request(endpoint="a", state=RESELECT_REQUESTED, path=("f1", "a")))
    assert tail.tries == [("f1", "a"), ("f2", "a")]
    tail.dead = {"f2"}
    tail.tries.clear()
    await c.request(request(state=RESELECT_REQUESTED, path=("f1", "a")))
    assert tail.tries == [("f2", "a"), ("f1", "a")]  # still tried when the other fails


async def test_the_manager_below_a_reselect_keeps_the_endpoint_chosen_above() -> None:
    """The client's manager reselects; what it sends on names the endpoint it chose, with state
    UP, so the endpoint's manager (another node) connects to that one instead of choosing
    again among all of them."""
    local, _ = chain(FakeCache(["a", "b", "c"], ["f1"]))
    sent = await local.request(request(endpoint="b", state=RESELECT_REQUESTED))
    assert sent.state == UP and sent.network_service_endpoint_name in ("a", "c")
    remote, tail = chain(FakeCache(["a", "b", "c"], ["f1"]))
    for _ in range(3):
        below = request(endpoint=sent.network_service_endpoint_name, state=sent.state,
                        path=("node1-fwd", "node2"))
        below.connection.path.index = 3  # at the remote manager's segment
        await remote.request(below)
    assert tail.tries == [("f1", sent.network_service_endpoint_name)] * 3

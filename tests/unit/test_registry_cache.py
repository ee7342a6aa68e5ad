"""The manager's registry view while the registry cannot be asked (it restarts): what it saw
last is used rather than failing a Request (a refresh of a live connection, say); with nothing
seen, or for an error that is not a passing one, the error stands."""

from __future__ import annotations

import pytest

from nsm.api.registry_pb2 import NetworkServiceEndpoint
from nsm.errors import InvalidArgument, NsmError, Unavailable
from nsm.manager.cache import RegistryCache

pytestmark = pytest.mark.timeout(10)


class DownRegistry:
    """A registry client whose every call fails with ``error``."""

    def __init__(self, error: NsmError) -> None:
        self.error = error
        self.calls = 0

    async def find_nse(self, query: NetworkServiceEndpoint) -> list[NetworkServiceEndpoint]:
        self.calls += 1
        raise self.error

    async def get_nse(self, name: str) -> NetworkServiceEndpoint | None:
        self.calls += 1
        raise self.error


def _cache(error: NsmError, *names: str) -> tuple[RegistryCache, DownRegistry]:
    registry = DownRegistry(error)
    cache = RegistryCache(registry)  # type: ignore[arg-type]
    for name in names:
        cache._nse[name] = NetworkServiceEndpoint(name=name, network_service_names=["blue"],
                                                  url=f"unix:///run/{name}.sock")
    cache._nse_live = False  # the watch broke with the registry
    return cache, registry


async def test_a_registry_that_cannot_be_asked_leaves_the_last_view() -> None:
    cache, registry = _cache(Unavailable("registry find nse: failed to connect"), "nse-2", "nse-1")
    assert [n.name for n in await cache.endpoints("blue")] == ["nse-1", "nse-2"]
    found = await cache.endpoint("nse-1")
    assert found is not None and found.url == "unix:///run/nse-1.sock"
    assert registry.calls == 2  # it was asked first


async def test_with_nothing_seen_or_a_real_error_the_error_stands() -> None:
    cache, _ = _cache(Unavailable("registry find nse: failed to connect"))
    with pytest.raises(Unavailable):
        await cache.endpoints("blue")
    with pytest.raises(Unavailable):
        await cache.endpoint("nse-1")
    cache, _ = _cache(InvalidArgument("bad query"), "nse-1")
    with pytest.raises(InvalidArgument):
        await cache.endpoints("blue")


class OneRegistry:
    """A registry client that knows one endpoint."""

    def __init__(self, nse: NetworkServiceEndpoint) -> None:
        self.nse = nse
        self.calls = 0

    async def get_nse(self, name: str) -> NetworkServiceEndpoint | None:
        self.calls += 1
        return self.nse if name == self.nse.name else None


async def test_a_miss_in_a_live_view_is_confirmed_with_the_registry() -> None:
    """The watch may be behind (an endpoint that registered again after its manager restarted):
    a name the view does not have, or has expired, is asked for."""
    fresh = NetworkServiceEndpoint(name="near", network_service_names=["blue"], url="unix:///n")
    registry = OneRegistry(fresh)
    cache = RegistryCache(registry)  # type: ignore[arg-type]
    cache._nse_live = True
    assert await cache.endpoint("near") == fresh
    stale = NetworkServiceEndpoint(name="near", url="unix:///old")
    stale.expiration_time.seconds = 1  # long expired
    cache._nse["near"] = stale
    assert await cache.endpoint("near") == fresh
    assert await cache.endpoint("nobody") is None
    assert registry.calls == 3

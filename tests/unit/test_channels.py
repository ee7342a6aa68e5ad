"""transport.Channels.renew: a channel stuck in reconnect backoff is replaced once, however
many callers notice it at the same time, and the stale one is closed only after a grace (calls
still on it end by themselves)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from nsm import transport
from nsm.transport import Channels

pytestmark = pytest.mark.timeout(10)


class FakeChannel:
    def __init__(self, url: str) -> None:
        self.url = url
        self.closed = False

    async def close(self) -> None:
        self.closed = True


async def test_concurrent_renewals_make_one_new_channel_and_retire_the_stale_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport, "STALE_GRACE", 0.05)
    made: list[FakeChannel] = []

    def factory(url: str) -> FakeChannel:
        made.append(FakeChannel(url))
        return made[-1]

    channels = Channels(factory)  # type: ignore[arg-type]
    stale = channels.get("unix:///x")
    first = channels.renew("unix:///x", stale)
    second = channels.renew("unix:///x", stale)  # a second caller saw the same stale channel
    assert first is second is channels.get("unix:///x") and first is not stale
    assert len(made) == 2 and not stale.closed  # calls on it may still be ending
    await asyncio.sleep(0.15)
    assert stale.closed and not first.closed
    await channels.close()
    assert first.closed


async def test_close_closes_channels_still_retiring() -> None:
    channels = Channels(FakeChannel)  # type: ignore[arg-type]
    stale = channels.get("unix:///y")
    fresh = channels.renew("unix:///y", stale)
    await channels.close()
    assert stale.closed and fresh.closed


@pytest.fixture
async def peer(tmp_path) -> AsyncIterator[str]:  # type: ignore[no-untyped-def]
    """A serving peer's URL (health only)."""
    url = f"unix://{tmp_path}/peer.sock"
    server = transport.Server([url])
    await server.start()
    try:
        yield url
    finally:
        await server.stop(0)


async def test_preconnect_connects_and_checks_the_peer_once_per_channel(peer: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A next hop seen in the registry is connected to and health-checked once, in the
    background, before any Request needs it; a peer that is not there costs nothing but a
    failed check."""
    url = peer
    channels = Channels()
    try:
        channels.preconnect(url)
        warming = channels._warming[url]
        channels.preconnect(url)  # seen again in the registry: nothing more
        assert channels._warming[url] is warming
        await asyncio.wait_for(warming, 5)
        assert warming.exception() is None
        # Connected although nothing but the preconnect used the channel.
        assert channels.get(url).get_state() == transport.grpc.ChannelConnectivity.READY
        channels.preconnect(f"unix://{tmp_path}/nobody.sock")  # fails quietly
        await asyncio.wait_for(channels._warming[f"unix://{tmp_path}/nobody.sock"], 6)
    finally:
        await channels.close()  # cancels what is still warming


def test_a_peer_on_this_node_is_tried_again_sooner() -> None:
    """A unix socket's reconnect backoff stops at a quarter second (a restarted manager is used
    and registered with again at once); a tcp peer's at 2 s."""
    local = dict(transport.channel_options(transport.parse_url("unix:///run/nsm/nsm.sock")))
    remote = dict(transport.channel_options(transport.parse_url("tcp://10.0.0.2:5001")))
    assert local["grpc.max_reconnect_backoff_ms"] == 250
    assert remote["grpc.max_reconnect_backoff_ms"] == 2_000
    # One connect attempt (core's "min reconnect backoff"): a lost node's TCP connect fails
    # fast; a unix connect never hangs, so there it bounds only a loaded TLS handshake.
    assert remote["grpc.min_reconnect_backoff_ms"] == 300
    assert local["grpc.min_reconnect_backoff_ms"] == 2_000
    same = {"grpc.max_reconnect_backoff_ms", "grpc.min_reconnect_backoff_ms"}
    assert {k: v for k, v in local.items() if k not in same} == \
        {k: v for k, v in remote.items() if k not in same}


async def test_preconnect_again_after_the_channel_was_renewed(peer: str) -> None:
    """A renewed channel (its predecessor could not connect) is a new connection to make: a
    preconnect seen again connects it; the same channel is not connected twice."""
    url = peer
    channels = Channels()
    try:
        channels.preconnect(url)
        first = channels._warming[url]
        channels.preconnect(url)
        assert channels._warming[url] is first
        await asyncio.wait_for(first, 5)
        channels.renew(url, channels.get(url))
        channels.preconnect(url)
        second = channels._warming[url]
        assert second is not first
        await asyncio.wait_for(second, 5)
        assert channels.get(url).get_state() == transport.grpc.ChannelConnectivity.READY
    finally:
        await channels.close()

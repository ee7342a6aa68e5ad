"""Many dumps at once in one namespace (a restarted forwarder checking what its earlier run left
for dozens of connections at once): each gets its answer, none fails with EBUSY (the kernel runs
one dump per netlink socket)."""

from __future__ import annotations

import asyncio

import pytest

pytestmark = pytest.mark.timeout(30)


async def test_concurrent_dumps_in_one_namespace_all_answer(netns_factory, netlink) -> None:  # type: ignore[no-untyped-def]
    path = netns_factory("d")
    await netlink.create_veth("nsm-a", path, "nsm-b", path)
    await netlink.setup_interface(path, "nsm-a", addresses=["10.9.0.1/24"], routes=[], mtu=1500)
    results = await asyncio.gather(
        *(netlink.addresses(path, "nsm-a") for _ in range(40)),
        *(netlink.routes(path, dev="nsm-a") for _ in range(40)),
        *(netlink.links(path) for _ in range(40)),
        return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors == []
    assert all(r == ["10.9.0.1/24"] for r in results[:40]), results[:40]
    assert all(len(r) == 3 for r in results[80:])  # lo and the two ends

"""The endpoint's KERNEL/LOCAL mechanism element alone."""

from __future__ import annotations

import pytest

from nsm.api.connection_pb2 import Connection, Mechanism
from nsm.api.networkservice_pb2 import NetworkServiceRequest
from nsm.chain import Chain
from nsm.endpoint.kernel import KernelServer, ifname_for
from nsm.errors import InvalidArgument, Unsupported
from nsm.mechanisms import KERNEL, LOCAL, NAME, NETNS_INODE_URL, REMOTE, VXLAN, kernel

pytestmark = pytest.mark.timeout(10)

NETNS = "/var/run/netns/nse-a"


def chain() -> Chain:
    return Chain([KernelServer(NETNS)], name="test")


def req(conn_id: str = "c1", *prefs: Mechanism, payload: str = "") -> NetworkServiceRequest:
    r = NetworkServiceRequest(connection=Connection(id=conn_id, network_service="svc", payload=payload))
    r.mechanism_preferences.extend(prefs)
    return r


def test_ifname_is_short_and_deterministic() -> None:
    names = {ifname_for(f"conn-{i}") for i in range(1000)}
    assert len(names) == 1000
    for name in names:
        assert len(name) == 15 and name.startswith("nsm")
    assert ifname_for("x") == ifname_for("x") != ifname_for("y")


async def test_selects_kernel_and_fills_in_name_and_netns() -> None:
    vxlan = Mechanism(cls=REMOTE, type=VXLAN)
    conn = await chain().request(req("c1", vxlan, kernel()))
    assert conn.mechanism.cls == LOCAL and conn.mechanism.type == KERNEL
    assert conn.mechanism.parameters[NAME] == ifname_for("c1")
    assert conn.mechanism.parameters[NETNS_INODE_URL] == f"file://{NETNS}"
    assert conn.payload == "IP"


async def test_refresh_yields_the_same_name() -> None:
    c = chain()
    first = await c.request(req("c1", kernel()))
    # A refresh with no preferences but the selected mechanism.
    again = NetworkServiceRequest(connection=first)
    second = await c.request(again)
    assert second.mechanism.parameters[NAME] == first.mechanism.parameters[NAME]


async def test_a_valid_requested_name_is_kept_and_the_netns_is_ours() -> None:
    conn = await chain().request(req("c1", kernel("eth-blue", "file:///proc/1/ns/net"), payload="ETHERNET"))
    assert conn.mechanism.parameters[NAME] == "eth-blue"
    assert conn.mechanism.parameters[NETNS_INODE_URL] == f"file://{NETNS}"
    assert conn.payload == "ETHERNET"


async def test_an_invalid_requested_name_is_replaced() -> None:
    bad = Mechanism(cls=LOCAL, type=KERNEL, parameters={NAME: "much-too-long-name"})
    conn = await chain().request(req("c1", bad))
    assert conn.mechanism.parameters[NAME] == ifname_for("c1")


async def test_unsupported_mechanism() -> None:
    prefs = (Mechanism(cls=REMOTE, type=VXLAN), Mechanism(cls=LOCAL, type="MEMIF"))
    with pytest.raises(Unsupported) as info:
        await chain().request(req("c1", *prefs))
    assert "REMOTE/VXLAN, LOCAL/MEMIF" in info.value.message
    assert "LOCAL/KERNEL" in info.value.message
    with pytest.raises(Unsupported, match="offers nothing"):
        await chain().request(req("c1"))


def test_netns_url_is_checked() -> None:
    with pytest.raises(InvalidArgument):
        KernelServer("http://x")


async def test_refresh_keeps_a_name_given_before() -> None:
    c = chain()
    first = await c.request(req("c1", kernel("eth-blue")))
    again = NetworkServiceRequest(connection=first)
    again.mechanism_preferences.append(kernel())  # the preference no longer names it
    second = await c.request(again)
    assert second.mechanism.parameters[NAME] == "eth-blue"

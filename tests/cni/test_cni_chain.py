"""The chain bridge + host-local → nsm-cni, run as a runtime runs it, for each spec version: the
pod gets its primary interface and its NSM interfaces (same node and across nodes), with
traffic over each; CHECK passes; DEL (twice) removes everything."""

from __future__ import annotations

import json

import pytest

from nsm.cni.spec import VERSIONS

pytestmark = [pytest.mark.kernel, pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(90)]


@pytest.mark.parametrize("version", VERSIONS)
async def test_add_check_del(cni, version: str) -> None:
    rt = cni.runtime(version, [f"kernel://{cni.local}/nsm-1", f"kernel://{cni.remote}/nsm-2?app=test"])
    if version == "1.1.0":
        assert (await rt.status()).ok() is None
    (c1, ns1), (c2, ns2) = await cni.container(), await cni.container()
    r1 = (await rt.add(c1, ns1, args="IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=p1")).ok()
    r2 = (await rt.add(c2, ns2)).ok()

    assert r1["cniVersion"] == version
    names = [i["name"] for i in r1["interfaces"]]
    assert names[-2:] == ["nsm-1", "nsm-2"] and "eth0" in names  # passed through, then ours
    ours = r1["interfaces"][-2:]
    assert all(i["sandbox"] == ns1 and i.get("mac") for i in ours)
    links = {link.name: link for link in await cni.links(ns1)}
    assert {"eth0", "nsm-1", "nsm-2"} <= set(links)
    assert ours[0]["mac"] == links["nsm-1"].mac
    for ip in r1["ips"]:
        assert ("version" in ip) == (version == "0.4.0")
    assert cni.address_of(r1, "nsm-1") in await cni.netlink.addresses(ns1, "nsm-1")

    # Primary network: pod to pod and to the gateway over eth0.
    await cni.assert_ping(ns1, cni.address_of(r2, "eth0").split("/")[0])
    await cni.assert_ping(ns1, cni.gateway)
    # NSM: the endpoint on this node and the one across nodes.
    await cni.assert_ping(ns1, cni.route_into(r1, cni.local_cidr))
    await cni.assert_ping(ns1, cni.route_into(r1, cni.remote_cidr))
    await cni.assert_ping(ns2, cni.route_into(r2, cni.local_cidr))

    for c, ns in ((c1, ns1), (c2, ns2)):
        assert (await rt.check(c, ns, only=["nsm-cni"])).ok() is None

    # What the node's operator sees.
    listed = await cni.run_cli("cni-agent", "--list", "--socket", cni.socket)
    assert listed.returncode == 0, listed
    atts = {a["containerID"]: a for a in map(json.loads, listed.stdout.splitlines())}
    assert set(atts) == {c1, c2}
    assert atts[c1]["pod"] == {"K8S_POD_NAMESPACE": "default", "K8S_POD_NAME": "p1"}
    assert [(lk["ifname"], lk["service"], lk["state"]) for lk in atts[c1]["links"]] == [
        ("nsm-1", cni.local, "established"), ("nsm-2", cni.remote, "established")]

    for _ in range(2):  # DEL is idempotent
        for c, ns in ((c1, ns1), (c2, ns2)):
            (await rt.delete(c, ns)).ok()
    for ns in (ns1, ns2):
        assert await cni.link_names(ns) == []
    assert await cni.attachments() == 0
    if version == "1.1.0":
        (await rt.gc([])).ok()


@pytest.mark.parametrize("version", VERSIONS)
async def test_delegate_without_prev_result(cni, version: str) -> None:
    """As a Multus delegate: not chained, no prevResult, CNI_IFNAME is the interface."""
    rt = cni.runtime(version, [f"kernel://{cni.local}"], primary=False)
    c, ns = await cni.container()
    result = (await rt.add(c, ns, ifname="net1")).ok()
    assert [i["name"] for i in result["interfaces"]] == ["net1"]
    assert await cni.link_names(ns) == ["net1"]
    await cni.assert_ping(ns, cni.route_into(result, cni.local_cidr))
    (await rt.delete(c, ns, ifname="net1", prev=False)).ok()
    assert await cni.link_names(ns) == []

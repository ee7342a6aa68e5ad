"""The Kubernetes API path against a fake API server: the pod's ``networkservicemesh.io``
annotation says what it gets, its network-status annotation (Multus's entry format) says what
it got; alone (no root), then through a chain on the lab with an agent started with
``--kubernetes``."""

from __future__ import annotations

import json

import pytest

from nsm.cni import spec
from nsm.cni.attachments import Link
from nsm.cni.k8s import ANNOTATION, STATUS_ANNOTATION, PodApi, network_status
from nsm.errors import NotFound, Unavailable

pytestmark = pytest.mark.timeout(60)

LINK = Link(service="blue", ifname="nsm-1", conn_id="x", mac="aa:bb:cc:dd:ee:01", mtu=1450,
            addresses=["172.16.0.2/32"])


def test_network_status_entries() -> None:
    assert network_status([LINK]) == [{"name": "networkservicemesh.io/blue", "interface": "nsm-1",
                                       "ips": ["172.16.0.2"], "mac": "aa:bb:cc:dd:ee:01",
                                       "mtu": 1450, "default": False, "dns": {}}]


async def test_pod_api(fake_kube) -> None:
    kube = fake_kube()
    kube.pods[("ns1", "p1")] = {ANNOTATION: "kernel://blue/nsm-1", "other": "x"}
    kube.pods[("ns1", "p2")] = {}
    api = PodApi(kubeconfig=str(kube.kubeconfig))
    try:
        assert await api.requested("ns1", "p1") == "kernel://blue/nsm-1"
        assert await api.requested("ns1", "p2") is None
        with pytest.raises(NotFound):
            await api.requested("ns1", "nope")
        await api.report("ns1", "p1", [LINK])
        assert json.loads(kube.pods[("ns1", "p1")][STATUS_ANNOTATION]) == network_status([LINK])
        await api.report("ns1", "p1", None)
        assert kube.pods[("ns1", "p1")] == {ANNOTATION: "kernel://blue/nsm-1", "other": "x"}
        kube.stop()
        with pytest.raises(Unavailable):
            await api.requested("ns1", "p1")
    finally:
        await api.close()


@pytest.mark.kernel
@pytest.mark.asyncio(loop_scope="session")
async def test_annotated_pods_through_the_chain(cni, fake_kube) -> None:
    kube = fake_kube(cni.lab.node("node1").netns)
    agent = await cni.another_agent("k8s", ["--kubernetes", "--kubeconfig", str(kube.kubeconfig)])
    rt = agent.runtime("1.1.0", None, primary=cni.primary)  # the annotation says what each pod gets

    (c1, ns1), (c2, ns2), (c3, ns3) = [await cni.container() for _ in range(3)]
    kube.pods[("ns", "annotated")] = {ANNOTATION: f"kernel://{cni.local}/nsm-1?app=k8s"}
    kube.pods[("ns", "plain")] = {}
    pod = "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_UID=u;K8S_POD_NAME="

    result = (await rt.add(c1, ns1, args=pod + "annotated")).ok()
    assert [i["name"] for i in result["interfaces"]][-1] == "nsm-1"
    await cni.assert_ping(ns1, cni.route_into(result, cni.local_cidr))
    status = json.loads(kube.pods[("ns", "annotated")][STATUS_ANNOTATION])
    assert [(s["name"], s["interface"], s["ips"], s["mac"]) for s in status] == [
        (f"networkservicemesh.io/{cni.local}", "nsm-1",
         [cni.address_of(result, "nsm-1").split("/")[0]], result["interfaces"][-1]["mac"])]

    plain = (await rt.add(c2, ns2, args=pod + "plain")).ok()  # nothing asked: passed through
    assert [i["name"] for i in plain["interfaces"]][-1] == "eth0"
    assert STATUS_ANNOTATION not in kube.pods[("ns", "plain")]

    missing = await rt.add(c3, ns3, args=pod + "missing")
    assert missing.code == spec.K8S_ERROR, missing.runs

    for c, ns in ((c1, ns1), (c2, ns2), (c3, ns3)):
        (await rt.delete(c, ns, args=pod + "x")).ok()
    assert STATUS_ANNOTATION not in kube.pods[("ns", "annotated")]
    assert "nsm-1" not in await cni.link_names(ns1)

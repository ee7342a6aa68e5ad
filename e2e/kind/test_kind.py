"""The mesh on a real cluster (kind: 1 control plane + 2 workers), driven with kubectl: the
deployment of deploy/overlays/kind, pods asking for services by annotation (the nsm-cni plugin
and the node agent give them their interfaces at creation).

Run with ``e2e/kind/run.sh`` (creates the cluster, builds and loads the images, deploys, runs
this, deletes the cluster). Skips, with the reason, without docker, kind or kubectl, or without
a cluster running the mesh. Every step is retried for up to a minute, as the reference's suites do.
"""

from __future__ import annotations

import json
import subprocess
import threading
from typing import Any

import pytest

from e2e.kind.kube import REGISTER_SERVICE, Kube, client, endpoint, node_links, retry, tools_pod

pytestmark = pytest.mark.timeout(600)

#: A scapy exchange from the client pod: an echo request with a payload out of nsm-1, the reply
#: carries it back (argv: destination).
SCAPY_ECHO = """
import sys
from scapy.all import ICMP, IP, Raw, conf, sr1
conf.verb = 0
reply = sr1(IP(dst=sys.argv[1]) / ICMP(id=4242, seq=1) / Raw(b"nsm-kind-e2e"), iface="nsm-1", timeout=3)
assert reply is not None, "no reply"
assert reply[ICMP].type == 0 and bytes(reply[Raw].load) == b"nsm-kind-e2e", reply.summary()
print("scapy echo ok", reply.summary())
"""


def pod(kube: Kube, ns: str, name: str) -> dict[str, Any]:
    return kube.json("get", "pod", name, namespace=ns)


def interface(kube: Kube, ns: str, name: str, ifname: str = "nsm-1") -> dict[str, Any]:
    """The client's NSM interface (``ip -j addr``) and the endpoint's address (its route)."""
    addr = json.loads(kube.exec(ns, name, "ip", "-j", "addr", "show", "dev", ifname).stdout)[0]
    routes = json.loads(kube.exec(ns, name, "ip", "-j", "route", "show", "dev", ifname).stdout)
    peers = [r["dst"].split("/")[0] for r in routes if r.get("dst") not in (None, "default")]
    assert peers, routes
    local = [a["local"] for a in addr["addr_info"] if a["family"] == "inet"]
    return {"ifindex": addr["ifindex"], "address": local[0], "peer": peers[0]}


def ping(kube: Kube, ns: str, name: str, dst: str, count: int = 3) -> None:
    out = kube.exec(ns, name, "ping", "-c", str(count), "-W", "2", "-I", "nsm-1", dst, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def scapy_echo(kube: Kube, ns: str, name: str, dst: str) -> None:
    out = kube.exec(ns, name, "python", "-", dst, input=SCAPY_ECHO, check=False)
    assert out.returncode == 0 and "scapy echo ok" in out.stdout, out.stdout + out.stderr


def connected(kube: Kube, ns: str, name: str, ifname: str = "nsm-1") -> dict[str, Any]:
    """Once the client's interface is there and its peer answers ping and scapy: the interface."""

    def up() -> dict[str, Any]:
        info = interface(kube, ns, name, ifname)
        if ifname == "nsm-1":
            ping(kube, ns, name, info["peer"])
            scapy_echo(kube, ns, name, info["peer"])
        else:
            out = kube.exec(ns, name, "ping", "-c", "3", "-W", "2", "-I", ifname, info["peer"], check=False)
            assert out.returncode == 0, out.stdout
        return info

    return retry(up, timeout=60, what=f"{name}'s {ifname} passing traffic")


def network_status(kube: Kube, ns: str, name: str) -> list[dict[str, Any]]:
    annotations = pod(kube, ns, name)["metadata"].get("annotations", {})
    return json.loads(annotations["networkservicemesh.io/network-status"])


def register_service(kube: Kube, ns: str, service: str, payload: str) -> None:
    kube.apply(tools_pod())
    kube.wait_ready(ns, "app=tools")
    retry(
        lambda: (
            kube.exec(ns, "tools", "python", "-", service, payload, input=REGISTER_SERVICE).returncode == 0
        ),
        what=f"service {service} ({payload}) registered",
    )


def test_kernel2kernel_on_one_node(kube: Kube, ns: str) -> None:
    node = kube.workers()[0]
    service = f"{ns}-local"
    kube.apply(endpoint("nse", service, "172.16.1.0/24", node=node))
    kube.wait_ready(ns, "app=nse")
    kube.apply(client("client", [f"kernel://{service}/nsm-1"], node=node))
    kube.wait_ready(ns, "app=client")
    info = connected(kube, ns, "client")
    assert info["address"].startswith("172.16.1.")
    status = retry(lambda: network_status(kube, ns, "client"), what="network-status annotation")
    assert [(s["name"], s["interface"]) for s in status] == [(f"networkservicemesh.io/{service}", "nsm-1")]
    assert status[0]["ips"] == [info["address"]]
    assert node_links(node) == set()  # pod to pod on one node: nothing in the node's namespace


@pytest.mark.parametrize("payload", ["ETHERNET", "IP"])
def test_kernel2vxlan2kernel_across_nodes(kube: Kube, ns: str, payload: str) -> None:
    """kernel2ethernet2kernel and kernel2ip2kernel: the client placed away from the endpoint by
    pod anti-affinity, VXLAN between the nodes."""
    service = f"{ns}-{payload.lower()}"
    register_service(kube, ns, service, payload)
    kube.apply(endpoint("nse", service, "172.16.2.0/24"))
    nse = kube.wait_ready(ns, "app=nse")[0]
    kube.apply(client("client", [f"kernel://{service}/nsm-1"], away_from="nse"))
    cl = kube.wait_ready(ns, "app=client")[0]
    assert cl["spec"]["nodeName"] != nse["spec"]["nodeName"]
    connected(kube, ns, "client")
    for node in (cl["spec"]["nodeName"], nse["spec"]["nodeName"]):
        links = node_links(node)
        assert any(n.startswith("nsx") for n in links), (node, links)
        assert any(n.startswith("nsb") for n in links) == (payload == "ETHERNET"), (node, links)


def test_a_pod_with_two_services(kube: Kube, ns: str) -> None:
    a, b = f"{ns}-a", f"{ns}-b"
    kube.apply(endpoint("nse-a", a, "172.16.3.0/24"), endpoint("nse-b", b, "172.16.4.0/24"))
    kube.wait_ready(ns, "app=nse-a")
    kube.wait_ready(ns, "app=nse-b")
    kube.apply(client("client", [f"kernel://{a}/nsm-1", f"kernel://{b}/nsm-2"]))
    kube.wait_ready(ns, "app=client")
    one = connected(kube, ns, "client", "nsm-1")
    two = connected(kube, ns, "client", "nsm-2")
    assert one["address"].startswith("172.16.3.") and two["address"].startswith("172.16.4.")
    status = retry(lambda: network_status(kube, ns, "client"), what="network-status annotation")
    assert sorted(s["interface"] for s in status) == ["nsm-1", "nsm-2"]


def attachments(kube: Kube, node: str) -> list[dict[str, Any]]:
    out = kube.exec("nsm-system", kube.node_pod(node), "nsm", "cni-agent", "--list", container="cni-agent")
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def endpoint_interfaces(kube: Kube, ns: str, name: str) -> list[str]:
    out = kube.exec(
        ns, name, "python", "-c", "import socket; print(' '.join(n for _, n in socket.if_nameindex()))"
    )
    return sorted(out.stdout.split())


def test_pod_delete_removes_everything_on_the_node(kube: Kube, ns: str) -> None:
    service = f"{ns}-gone"
    kube.apply(endpoint("nse", service, "172.16.5.0/24"))
    nse = kube.wait_ready(ns, "app=nse")[0]
    before = {n: node_links(n) for n in kube.workers()}
    plain = endpoint_interfaces(kube, ns, nse["metadata"]["name"])
    kube.apply(client("client", [f"kernel://{service}/nsm-1"], away_from="nse"))
    cl = kube.wait_ready(ns, "app=client")[0]
    connected(kube, ns, "client")
    node = cl["spec"]["nodeName"]
    assert any(a["pod"].get("K8S_POD_NAME") == "client" for a in attachments(kube, node))
    assert endpoint_interfaces(kube, ns, nse["metadata"]["name"]) != plain

    kube.run("delete", "pod", "client", "--wait=true", namespace=ns)
    retry(
        lambda: not any(a["pod"].get("K8S_POD_NAME") == "client" for a in attachments(kube, node)),
        what="the attachment gone from the agent",
    )
    retry(lambda: all(node_links(n) == before[n] for n in before), what="the node links gone")
    retry(
        lambda: endpoint_interfaces(kube, ns, nse["metadata"]["name"]) == plain,
        what="the endpoint's interface gone",
    )


def test_node_pod_restart_keeps_links_passing_traffic(kube: Kube, ns: str) -> None:
    service = f"{ns}-restart"
    kube.apply(endpoint("nse", service, "172.16.6.0/24"))
    kube.wait_ready(ns, "app=nse")
    kube.apply(client("client", [f"kernel://{service}/nsm-1"], away_from="nse"))
    cl = kube.wait_ready(ns, "app=client")[0]
    info = connected(kube, ns, "client")
    node = cl["spec"]["nodeName"]
    old = kube.node_pod(node)

    # A ping every 0.2 s across the restart of the client node's manager, forwarder and agent.
    result: dict[str, subprocess.CompletedProcess[str]] = {}
    pinger = threading.Thread(
        target=lambda: result.setdefault(
            "ping",
            kube.exec(
                ns,
                "client",
                "ping",
                "-i",
                "0.2",
                "-c",
                "200",
                "-W",
                "1",
                "-I",
                "nsm-1",
                info["peer"],
                check=False,
                timeout=120,
            ),
        )
    )
    pinger.start()
    kube.run("delete", "pod", old, "--wait=true", namespace="nsm-system")
    retry(lambda: kube.node_pod(node) != old, what="the DaemonSet's new pod")
    kube.wait_ready("nsm-system", "app=nsm-node", timeout=180)
    pinger.join(150)
    out = result["ping"].stdout
    summary = next(line for line in out.splitlines() if "packets transmitted" in line)
    sent, received = int(summary.split()[0]), int(summary.split()[3])
    assert sent == 200 and received >= 190, summary  # the kernel kept carrying it meanwhile
    after = connected(kube, ns, "client")
    assert after["ifindex"] == info["ifindex"] and after["address"] == info["address"]  # adopted, not rebuilt


def test_endpoint_deleted_client_heals_onto_another(kube: Kube, ns: str) -> None:
    service = f"{ns}-heal"
    kube.apply(endpoint("nse-1", service, "172.16.7.0/24"), endpoint("nse-2", service, "172.16.8.0/24"))
    kube.wait_ready(ns, "app=nse-1")
    kube.wait_ready(ns, "app=nse-2")
    kube.apply(client("client", [f"kernel://{service}/nsm-1"]))
    kube.wait_ready(ns, "app=client")
    first = connected(kube, ns, "client")
    used, other = (
        ("nse-1", "172.16.8.") if first["address"].startswith("172.16.7.") else ("nse-2", "172.16.7.")
    )
    kube.run("scale", f"deployment/{used}", "--replicas=0", namespace=ns)  # its pod deleted, none back

    def healed() -> bool:
        info = interface(kube, ns, "client")
        assert info["address"].startswith(other), info
        ping(kube, ns, "client", info["peer"])
        return True

    retry(healed, timeout=90, what="the client healed onto the other endpoint")


def test_every_daemon_serves_its_metrics(kube: Kube, ns: str) -> None:
    """``nsm metrics`` in each daemon's container (its environment, the nsm/metrics identity of
    the cluster's CA): every daemon answers with its role; a manager that served a connection
    counts it."""
    service = f"{ns}-metrics"
    node = kube.workers()[0]
    kube.apply(endpoint("nse", service, "172.16.7.0/24", node=node))
    kube.wait_ready(ns, "app=nse")
    kube.apply(client("client", [f"kernel://{service}/nsm-1"], node=node))
    kube.wait_ready(ns, "app=client")
    connected(kube, ns, "client")
    pod_name = kube.node_pod(node)
    for container in ("manager", "forwarder", "cni-agent"):  # each container's role is its name
        out = retry(lambda c=container: kube.exec("nsm-system", pod_name, "nsm", "metrics",
                                                  container=c).stdout,
                    what=f"{container}'s metrics")
        assert f'role="{container}"' in out, out[:2000]
        if container == "manager":
            assert 'nsm_requests_total{code="OK",method="Request"}' in out, out[:2000]
    registry = kube.json("get", "pods", "-l", "app=nsm-registry", namespace="nsm-system")["items"][0]
    out = retry(lambda: kube.exec("nsm-system", registry["metadata"]["name"], "nsm", "metrics").stdout,
                what="the registry's metrics")
    assert 'role="registry"' in out and 'nsm_held{what="endpoints"}' in out, out[:2000]

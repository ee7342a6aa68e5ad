"""Endpoint selection across a three-node cluster: a service whose matches prefer the client's
own node (``{"nodeName": "{{.nodeName}}"}``, falling through to any endpoint), and round robin
across nodes for a service without matches — each client with traffic to the endpoint it got."""

from __future__ import annotations

import itertools

import pytest

from nsm.api.registry_pb2 import NetworkServiceEndpoint
from nsm.registry.client import RegistryClient
from nsm.transport import dial

pytestmark = [pytest.mark.kernel, pytest.mark.asyncio(loop_scope="session")]

#: Where the endpoints of ``near``/``rr`` run (see conftest.TOPOLOGY); node3 has none.
NSE_NODE = {"near1": "node1", "near2": "node2"}


def ip_of(cidr: str) -> str:
    return cidr.split("/")[0]


def path_names(conn) -> list[str]:
    return [s.name for s in conn.path.path_segments]


async def check_connection(cluster, client, conn, pod: str, client_node: str) -> str:
    """The path fits where the chosen endpoint runs; traffic reaches it. Returns its name."""
    nse = conn.network_service_endpoint_name
    assert nse in NSE_NODE, nse
    nse_node = NSE_NODE[nse]
    if nse_node == client_node:
        want = [client.name, client_node, f"{client_node}-fwd", nse]
    else:
        want = [client.name, client_node, f"{client_node}-fwd", nse_node, f"{nse_node}-fwd", nse]
    assert path_names(conn) == want
    assert conn.labels["nodeName"] == client_node
    ip = conn.context.ip_context
    await cluster.assert_ping(pod, ip_of(ip.dst_ip_addrs[0]))
    # and the endpoint really is the one with that address
    await cluster.iface_with(cluster.nse_netns(nse), ip.dst_ip_addrs[0])
    return nse


@pytest.mark.timeout(60)
async def test_endpoints_are_labelled_with_their_node(cluster) -> None:
    channel = dial(cluster.lab.registry_url, cluster.lab.security)
    try:
        found = await RegistryClient(channel, timeout=5).find_nse(
            NetworkServiceEndpoint(network_service_names=["near"]))
    finally:
        await channel.close()
    labels = {n.name: {s: dict(n.network_service_labels[s].labels) for s in ("near", "rr")}
              for n in found}
    assert labels == {name: {"near": {"nodeName": node}, "rr": {"nodeName": node}}
                      for name, node in NSE_NODE.items()}


@pytest.mark.timeout(60)
async def test_prefer_own_node_then_fall_through_to_any(cluster) -> None:
    chosen: dict[str, list[str]] = {}
    # Two clients per node: the local endpoint is picked every time where there is one.
    for node in ("node1", "node2", "node3", "node1", "node2", "node3"):
        client, conn, pod = await cluster.connect(node, "near", name=f"nsc-near-{node}")
        chosen.setdefault(node, []).append(await check_connection(cluster, client, conn, pod,
                                                                  node))
    assert chosen["node1"] == ["near1", "near1"]
    assert chosen["node2"] == ["near2", "near2"]
    # node3 has no endpoint: the first match finds none and falls through to any of them
    # (two candidates then: the manager's round robin gives one each).
    assert sorted(chosen["node3"]) == ["near1", "near2"]
    # All of them are up at once: each node carries only its remote halves.
    assert len([n for n in await cluster.tunnel_links("node3") if n.startswith("nsx")]) == 2
    assert len([n for n in await cluster.tunnel_links("node1") if n.startswith("nsx")]) == 1
    assert len([n for n in await cluster.tunnel_links("node2") if n.startswith("nsx")]) == 1


@pytest.mark.timeout(60)
async def test_round_robin_across_nodes_without_matches(cluster) -> None:
    for node in ("node3", "node1"):
        picks = []
        for i in range(4):
            client, conn, pod = await cluster.connect(node, "rr", name=f"nsc-rr-{node}-{i}")
            picks.append(await check_connection(cluster, client, conn, pod, node))
        # In turn: every consecutive pair differs, both endpoints (on two nodes) used twice.
        assert all(a != b for a, b in itertools.pairwise(picks)), picks
        assert sorted(picks) == ["near1", "near1", "near2", "near2"], picks

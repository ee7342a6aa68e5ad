"""Explicit next hops across nodes: another node's manager reached over a **unix** socket (as a
hostPath-shared socket would be) still gets a VXLAN link, because where the endpoint is comes
from its registry record (its ``nodeName``), never from the URL's scheme."""

from __future__ import annotations

import pytest

from nsm.api.registry_pb2 import NetworkServiceEndpoint
from nsm.lab import EndpointSpec, NodeSpec, ServiceSpec, Topology

pytestmark = [pytest.mark.kernel, pytest.mark.asyncio(loop_scope="session")]

UNIX_MANAGER = Topology(
    nodes=(NodeSpec("node1"), NodeSpec("node2", advertise_unix=True)),
    endpoints=(EndpointSpec("nse-ux", "node2", ("ux",), "172.16.31.0/24"),),
    services=(ServiceSpec("ux"),),
)


@pytest.mark.timeout(90)
async def test_a_remote_manager_reached_over_unix_gets_a_vxlan_link(new_lab) -> None:
    async with new_lab(UNIX_MANAGER, tag="u") as cluster:
        manager2 = cluster.lab.node("node2").manager_url
        assert manager2.startswith("unix://")
        (record,) = await cluster.registry_client().find_nse(NetworkServiceEndpoint(name="nse-ux"))
        assert record.url == manager2  # other nodes reach the endpoint through manager2's socket
        client, conn, pod = await cluster.connect("node1", "ux")
        assert [s.name for s in conn.path.path_segments] == [
            client.name, "node1", "node1-fwd", "node2", "node2-fwd", "nse-ux"]
        for node in ("node1", "node2"):
            assert any(name.startswith("nsx") for name in await cluster.tunnel_links(node)), node
        await cluster.assert_ping(pod, conn.context.ip_context.dst_ip_addrs[0].split("/")[0])
        await client.close(raise_errors=True)
        await cluster.assert_clean()

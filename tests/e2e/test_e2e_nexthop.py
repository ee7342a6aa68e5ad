"""Explicit next hops: where a connection goes is decided from the registry record, never from
the URL's scheme or from anything a caller can send.

- An endpoint on the forwarder's node reached over **tcp** gets a KERNEL link (before, a tcp URL
  meant "another node's manager": VXLAN).
- A Request straight to a forwarder with the ``nsm-next-hop-url`` header (the old way a manager
  told its forwarder where to go) is refused, and the forwarder dials nothing: tried with the
  header pointing at a socket of ours, which counts every call it gets.
- A Request naming an endpoint the registry does not know dials nothing either.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.empty_pb2 import Empty

from nsm.api import networkservice_pb2_grpc
from nsm.api.connection_pb2 import Connection
from nsm.api.networkservice_pb2 import NetworkServiceRequest
from nsm.client.sdk import new_request
from nsm.kernel.ping import ping
from nsm.mechanisms import KERNEL, kernel, netns_url
from nsm.transport import Server, Service
from nsm.wellknown import NEXT_HOP_HEADER

pytestmark = [pytest.mark.kernel, pytest.mark.asyncio(loop_scope="session")]


class _Counting(networkservice_pb2_grpc.NetworkServiceServicer):
    """A would-be next hop of ours: counts what reaches it and answers with our mechanism."""

    def __init__(self) -> None:
        self.calls = 0

    async def Request(self, request: NetworkServiceRequest, context: Any) -> Connection:
        self.calls += 1
        conn = Connection()
        conn.CopyFrom(request.connection)
        conn.mechanism.CopyFrom(kernel("evil0", "file:///proc/1/ns/net"))
        return conn

    async def Close(self, request: Connection, context: Any) -> Empty:
        self.calls += 1
        return Empty()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.timeout(60)
async def test_endpoint_on_a_tcp_url_on_its_node_gets_a_kernel_link(mesh) -> None:
    service = mesh.name("tcpsvc")
    url = f"tcp://127.0.0.1:{_free_port()}"
    nse_ns = await mesh.netns("tcpnse")
    name = mesh.name("tcpnse")
    # Registered (and dialed by the forwarder, in the node's namespace) at its tcp URL; the
    # unix one is only for the test to see it serving from outside the node.
    sock = mesh.sock("tcpnse")
    await mesh.start_daemon("tcpnse", [
        "nse", "--name", name, "--service", service, "--cidr", "10.97.0.0/24", "--netns", nse_ns,
        "--listen", sock, "--listen", url, "--advertise", url, "--registry", mesh.registry_url,
        "--node", "node1", "--expiry", "30s"], url=sock)
    await mesh.wait_registered(name)
    pod = await mesh.netns("tcpnsc")
    client = mesh.client(pod, service=service, ifname="nsm-tcp")
    conn = await client.request()
    assert conn.network_service_endpoint_name == name
    assert conn.mechanism.type == KERNEL
    assert "nsm-tcp" in await mesh.link_names(pod)
    assert len(await mesh.link_names(nse_ns)) == 1  # one veth end in the endpoint's pod
    dst = conn.context.ip_context.dst_ip_addrs[0].split("/")[0]
    result = ping(pod, dst, count=3, timeout=2.0)
    assert result.received >= 2, result
    await client.close(raise_errors=True)
    assert await mesh.link_names(pod) == [] and await mesh.link_names(nse_ns) == []


async def _forwarder_request(mesh: Any, request: NetworkServiceRequest,
                             metadata: tuple[tuple[str, str], ...] | None) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await mesh.raw_request(mesh.forwarder_url, request, timeout=10, metadata=metadata or ())
    return info.value


@pytest.mark.timeout(60)
async def test_a_forged_next_hop_is_refused_and_nothing_is_dialed(mesh, tmp_path: Path) -> None:
    ours = _Counting()
    sock = f"unix://{tmp_path}/ours.sock"
    server = Server([sock])
    server.add(Service("networkservice.NetworkService",
                       networkservice_pb2_grpc.add_NetworkServiceServicer_to_server, ours))
    await server.start()
    try:
        pod = await mesh.netns("forged")
        request = new_request(service=mesh.service, name=mesh.name("evil"),
                              mechanisms=[kernel("nsm-1", netns_url(pod))])
        # With the header: refused whatever the rest says, even naming a real endpoint.
        for endpoint in ("", mesh.main.name, "ghost"):
            request.connection.network_service_endpoint_name = endpoint
            error = await _forwarder_request(mesh, request, ((NEXT_HOP_HEADER, sock),))
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED, error.details()
            assert NEXT_HOP_HEADER in (error.details() or "")
        # Without it, naming an endpoint the registry does not know: nothing to dial.
        request.connection.network_service_endpoint_name = mesh.name("ghost")
        error = await _forwarder_request(mesh, request, None)
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
        assert ours.calls == 0
        assert await mesh.link_names(pod) == []
        assert await mesh.link_names(mesh.main.netns) == []
    finally:
        await server.stop(None)

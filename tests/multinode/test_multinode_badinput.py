"""Bad input found by fuzzing, on the remote path (client on node1, endpoint on node2): an
empty or malformed address in the IP context is INVALID_ARGUMENT naming the field at the first
hop, and nothing is built on either node (the ``cluster`` fixture checks every node's links,
policy rules and monitors after the test). It used to reach the VXLAN half of node2's forwarder
and fail there with INTERNAL (``'' does not appear to be an IPv4 or IPv6 interface``)."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from nsm.api.networkservice_pb2_grpc import NetworkServiceStub
from nsm.client.sdk import new_request
from nsm.mechanisms import kernel, netns_url

pytestmark = [pytest.mark.kernel, pytest.mark.asyncio(loop_scope="session")]


def _addr(field: str, value: str) -> Any:
    return lambda ip: getattr(ip, field).append(value)


def _route(field: str, prefix: str) -> Any:
    return lambda ip: getattr(ip, field).add(prefix=prefix)


CASES = {
    "src-ip-addr-empty": (_addr("src_ip_addrs", ""), "ip_context.src_ip_addrs"),
    "dst-ip-addr-empty": (_addr("dst_ip_addrs", ""), "ip_context.dst_ip_addrs"),
    "src-route-empty": (_route("src_routes", ""), "ip_context.src_routes"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", sorted(CASES))
async def test_a_malformed_address_on_the_remote_path_is_invalid_argument(cluster, case: str) -> None:
    pod = await cluster.pod("bad")
    request = new_request(service="ip", name=f"nsc-{case}", mechanisms=[kernel("nsm-1", netns_url(pod))])
    spoil, field = CASES[case]
    spoil(request.connection.context.ip_context)
    stub = NetworkServiceStub(cluster.channel(cluster.node("node1").manager_url))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Request(request, timeout=30)
    err = info.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    assert field in err.details(), err.details()
    assert await cluster.link_names(pod) == []
    await cluster.assert_clean()

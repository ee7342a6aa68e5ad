"""Bad input found by fuzzing, against the real daemons of the single-node mesh: a path
segment's ``expires`` outside the Timestamp range (sent to every hop: manager, forwarder,
endpoint) and malformed addresses in the IP context or the tunnel parameters (sent to the
manager) are INVALID_ARGUMENT naming the field, and nothing is built anywhere.

Requests the SDK would refuse client-side are sent with the raw generated stub.
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from nsm.api.networkservice_pb2 import NetworkServiceRequest
from nsm.client.sdk import new_request
from nsm.mechanisms import kernel, netns_url, vxlan

pytestmark = [pytest.mark.kernel, pytest.mark.asyncio(loop_scope="session")]

TS_MAX_SECONDS = 253402300799  # 9999-12-31T23:59:59Z


async def refused(mesh: Any, url: str, request: NetworkServiceRequest, pod: str) -> str:
    """Send ``request`` to ``url``: INVALID_ARGUMENT, and no hop holds or built anything."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await mesh.raw_request(url, request)  # signed as the hop's real caller
    err = info.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    assert "Traceback" not in (err.details() or "")
    for hop, conns in (await mesh.all_connections()).items():
        assert not conns, f"{hop} holds {list(conns)}"
    assert await mesh.link_names(pod) == []
    assert await mesh.link_names(mesh.main.netns) == []
    return err.details()


def first_request(mesh: Any, pod: str) -> NetworkServiceRequest:
    return new_request(service=mesh.service, name=mesh.name("raw"),
                       mechanisms=[kernel("nsm-1", netns_url(pod))])


#: (seconds, nanos) of the client's segment expiry: each outside the Timestamp range.
BAD_EXPIRES = {"seconds-past-max": (TS_MAX_SECONDS + 1, 0), "seconds-huge": (10**15, 0),
               "seconds-before-min": (-62135596801, 0), "nanos-negative": (1_900_000_000, -1),
               "nanos-a-second": (1_900_000_000, 1_000_000_000)}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("hop", ["manager", "forwarder", "endpoint"])
@pytest.mark.parametrize("case", sorted(BAD_EXPIRES))
async def test_expires_outside_the_timestamp_range_is_invalid_argument_at_every_hop(
        mesh, hop: str, case: str) -> None:
    pod = await mesh.netns()
    request = first_request(mesh, pod)
    expires = request.connection.path.path_segments[0].expires
    expires.seconds, expires.nanos = BAD_EXPIRES[case]
    url = {"manager": mesh.manager_url, "forwarder": mesh.forwarder_url,
           "endpoint": mesh.main.url}[hop]
    details = await refused(mesh, url, request, pod)
    assert "expires" in details and "outside" in details, details


#: case → (where the bad value goes, the value, the field the message must name). Where:
#: an IP context list, a route list (the value is the prefix, or prefix,nextHop) or a parameter
#: of a VXLAN preference put first.
BAD_ADDRESSES = {
    "src-ip-addr-empty": ("src_ip_addrs", "", "ip_context.src_ip_addrs"),
    "dst-ip-addr-empty": ("dst_ip_addrs", "", "ip_context.dst_ip_addrs"),
    "dst-ip-addr-garbage": ("dst_ip_addrs", "10.0.0.1/99", "ip_context.dst_ip_addrs"),
    "src-route-empty": ("src_routes", "", "ip_context.src_routes prefix"),
    "dst-route-next-hop": ("dst_routes", "10.0.0.0/8,router", "dst_routes nextHop"),
    "excluded-prefix-empty": ("excluded_prefixes", "", "ip_context.excluded_prefixes"),
    "vxlan-src-ip-empty": ("src_ip", "", "mechanism parameter src_ip"),
    "vxlan-dst-ip-empty": ("dst_ip", "", "mechanism parameter dst_ip"),
}


def spoil(request: NetworkServiceRequest, where: str, value: str) -> None:
    ip = request.connection.context.ip_context
    if where.endswith("_routes"):
        prefix, _, next_hop = value.partition(",")
        getattr(ip, where).add(prefix=prefix, nextHop=next_hop)
    elif where in ("src_ip", "dst_ip"):
        tunnel = vxlan("10.0.0.1")
        tunnel.parameters[where] = value
        request.mechanism_preferences.insert(0, tunnel)
    else:
        getattr(ip, where).append(value)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", sorted(BAD_ADDRESSES))
async def test_a_malformed_address_is_invalid_argument_naming_the_field(mesh, case: str) -> None:
    pod = await mesh.netns()
    request = first_request(mesh, pod)
    where, value, field = BAD_ADDRESSES[case]
    spoil(request, where, value)
    details = await refused(mesh, mesh.manager_url, request, pod)
    assert field in details, details
    # The mesh still serves well-formed requests (and handed out no address meanwhile).
    client = mesh.client(await mesh.netns("ok"), ifname="nsm-1")
    conn = await client.request()
    ip = conn.context.ip_context
    assert (ip.dst_ip_addrs[0], ip.src_ip_addrs[0]) == mesh.first_pair
    await client.close(raise_errors=True)

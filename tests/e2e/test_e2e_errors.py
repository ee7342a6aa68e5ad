"""Bad input: the manager answers the right gRPC code, and nothing half-built remains — no
interface in either pod, no connection in any monitor, no address pair kept by the endpoint.

Requests the SDK would refuse client-side are sent with the raw generated stub.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest

from nsm.api.connection_pb2 import Connection, Mechanism
from nsm.api.networkservice_pb2 import NetworkServiceRequest
from nsm.api.networkservice_pb2_grpc import NetworkServiceStub
from nsm.api.registry_pb2 import NetworkServiceEndpoint
from nsm.client.sdk import new_request
from nsm.errors import NotFound, ResourceExhausted
from nsm.mechanisms import kernel, netns_url

pytestmark = [pytest.mark.kernel, pytest.mark.asyncio(loop_scope="session")]


async def raw_request(mesh: Any, request: NetworkServiceRequest) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await mesh.raw_request(mesh.manager_url, request)  # signed, as a client would
    return info.value


async def assert_nothing_built(mesh: Any, client_ns: str, *, allowed: list[str] | None = None) -> None:
    assert await mesh.link_names(client_ns) == sorted(allowed or []), "interface left in the client pod"
    assert await mesh.link_names(mesh.main.netns) == [], "interface left in the endpoint pod"
    snaps = await mesh.all_connections()
    assert not any(snaps.values()), f"connections left: { {k: list(v) for k, v in snaps.items()} }"


async def assert_pool_untouched(mesh: Any) -> None:
    """With no other connection, a good request gets the endpoint's first pair: none leaked."""
    client = mesh.client(await mesh.netns("ipam"), ifname="nsm-1")
    conn = await client.request()
    ip = conn.context.ip_context
    assert (ip.dst_ip_addrs[0], ip.src_ip_addrs[0]) == mesh.first_pair
    await client.close(raise_errors=True)


def request_for(mesh: Any, ns: str, *, service: str | None = None,
                mechanism: Mechanism | None = None) -> NetworkServiceRequest:
    mech = mechanism or kernel("nsm-1", netns_url(ns))
    return new_request(service=mesh.service if service is None else service, name=mesh.name("raw"),
                       mechanisms=[mech])


def with_params(**params: str) -> Callable[[str], Mechanism]:
    def make(ns: str) -> Mechanism:
        m = kernel("nsm-1", netns_url(ns))
        for k, v in params.items():
            m.parameters[k] = v
        return m
    return make


def mech(cls: str, type_: str) -> Callable[[str], Mechanism]:
    def make(ns: str) -> Mechanism:
        m = kernel("nsm-1", netns_url(ns))
        m.cls, m.type = cls, type_
        return m
    return make


INVALID: dict[str, dict[str, Any]] = {
    "ifname-16-chars": {"mechanism": with_params(name="nsm-0123456789ab")},
    "ifname-bad-chars": {"mechanism": with_params(name="nsm 1/x")},
    "empty-service": {"service": ""},
    "service-with-space": {"service": "e2e ip"},
    "bad-class": {"mechanism": mech("SIDEWAYS", "KERNEL")},
    "empty-type": {"mechanism": mech("LOCAL", "")},
    "inode-url-not-file": {"mechanism": with_params(inodeURL="http://example.com/netns/x")},
    "inode-url-relative": {"mechanism": with_params(inodeURL="file://relative")},
    "mtu-not-a-number": {"mechanism": with_params(MTU="abc")},
    "mtu-out-of-range": {"mechanism": with_params(MTU="10")},
    "payload-unknown": {"payload": "BOGUS"},
    "path-index-outside": {"path_index": 5},
    "conn-id-with-space": {"conn_id": "a b"},
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", sorted(INVALID))
async def test_malformed_request_is_invalid_argument(mesh, case: str) -> None:
    ns = await mesh.netns()
    spec = INVALID[case]
    mechanism = spec["mechanism"](ns) if "mechanism" in spec else None
    request = request_for(mesh, ns, service=spec.get("service"), mechanism=mechanism)
    if "payload" in spec:
        request.connection.payload = spec["payload"]
    if "path_index" in spec:
        request.connection.path.index = spec["path_index"]
    if "conn_id" in spec:
        request.connection.id = request.connection.path.path_segments[0].id = spec["conn_id"]
    err = await raw_request(mesh, request)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    assert err.details()
    await assert_nothing_built(mesh, ns)
    await assert_pool_untouched(mesh)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("cls,type_", [("LOCAL", "MEMIF"), ("REMOTE", "KERNEL")])
async def test_unsupported_mechanism_is_unimplemented(mesh, cls: str, type_: str) -> None:
    """Well-formed but not offered by this mesh: UNIMPLEMENTED, naming what is supported."""
    ns = await mesh.netns()
    err = await raw_request(mesh, request_for(mesh, ns, mechanism=mech(cls, type_)(ns)))
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED, (err.code(), err.details())
    assert f"{type_}/{cls}" in err.details() and "KERNEL/LOCAL" in err.details()
    await assert_nothing_built(mesh, ns)
    await assert_pool_untouched(mesh)


@pytest.mark.timeout(30)
async def test_unknown_service_is_not_found(mesh) -> None:
    ns = await mesh.netns()
    client = mesh.client(ns, service="no-such-service")
    with pytest.raises(NotFound) as info:
        await client.request()
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    assert "no-such-service" in info.value.message
    # the same with the raw stub
    err = await raw_request(mesh, request_for(mesh, ns, service="no-such-service"))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    await assert_nothing_built(mesh, ns)
    await assert_pool_untouched(mesh)


@pytest.mark.timeout(30)
async def test_missing_client_namespace_is_not_found_naming_the_path(mesh) -> None:
    missing = f"/var/run/netns/{mesh.name('missing')}"
    request = request_for(mesh, missing, mechanism=kernel("nsm-1", netns_url(missing)))
    err = await raw_request(mesh, request)
    assert err.code() == grpc.StatusCode.NOT_FOUND, (err.code(), err.details())
    assert missing in err.details()
    assert await mesh.link_names(mesh.main.netns) == []
    assert not any((await mesh.all_connections()).values())
    await assert_pool_untouched(mesh)


@pytest.mark.timeout(30)
async def test_existing_client_interface_is_already_exists_and_left_alone(mesh) -> None:
    ns = await mesh.netns()
    await mesh.netlink.create_veth("nsm-1", ns, "pre-peer", ns, mtu=1400, alias="not-nsm")
    await mesh.netlink.setup_interface(ns, "nsm-1", addresses=["192.0.2.7/24"], routes=[], mtu=1400)
    before = await mesh.netlink.link(ns, "nsm-1")
    before_addrs = await mesh.netlink.addresses(ns, "nsm-1")

    err = await raw_request(mesh, request_for(mesh, ns))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS, (err.code(), err.details())
    assert "nsm-1" in err.details()

    after = await mesh.netlink.link(ns, "nsm-1")
    assert after == before
    assert await mesh.netlink.addresses(ns, "nsm-1") == before_addrs
    await assert_nothing_built(mesh, ns, allowed=["nsm-1", "pre-peer"])
    await assert_pool_untouched(mesh)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("cidr", ["10.0.0.0/33", "10.0.0.1/24", "not-a-cidr", "10.0.0.0", "10.0.0.0/32"])
async def test_endpoint_with_invalid_cidr_exits_with_a_clear_message(mesh, cidr: str) -> None:
    name = mesh.name("badnse")
    ns = await mesh.netns("badnsens")
    sock = mesh.sock("badnse")
    result = await mesh.run_cli("nse", "--name", name, "--service", "e2e-bad", "--cidr", cidr,
                                "--netns", ns, "--listen", sock, "--registry", mesh.registry_url)
    assert result.returncode != 0
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert "CIDR" in lines[0] and cidr in lines[0], lines[0]
    assert await mesh.registry_client().find_nse(NetworkServiceEndpoint(name=name)) == []


@pytest.mark.timeout(60)
async def test_exhausted_endpoint_is_resource_exhausted_and_builds_nothing(mesh) -> None:
    service = "e2e-tiny"
    tiny = await mesh.start_nse("tiny", services=[service], cidr="10.99.0.0/30")  # one pair
    first_ns, second_ns = await mesh.netns(), await mesh.netns()
    first = mesh.client(first_ns, service=service, ifname="nsm-1")
    conn = await first.request()
    pair = (conn.context.ip_context.dst_ip_addrs[0], conn.context.ip_context.src_ip_addrs[0])
    assert pair == ("10.99.0.1/32", "10.99.0.2/32")

    second = mesh.client(second_ns, service=service, ifname="nsm-1")
    with pytest.raises(ResourceExhausted) as info:
        await second.request()
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await mesh.link_names(second_ns) == []
    assert len(await mesh.link_names(tiny.netns)) == 1
    snaps = await mesh.all_connections()
    for hop in ("manager", "forwarder", tiny.name):
        assert len(snaps[hop]) == 1, (hop, list(snaps[hop]))
        (only,) = snaps[hop].values()
        assert only.path.path_segments[0].id == first.conn_id

    # The failed request kept nothing: once the first closes, the pair is free again.
    await first.close(raise_errors=True)
    assert await mesh.link_names(tiny.netns) == []
    third = mesh.client(await mesh.netns(), service=service, ifname="nsm-1")
    conn3 = await third.request()
    assert (conn3.context.ip_context.dst_ip_addrs[0], conn3.context.ip_context.src_ip_addrs[0]) == pair
    await third.close(raise_errors=True)


@pytest.mark.timeout(30)
async def test_close_of_an_unknown_connection_is_ok(mesh) -> None:
    stub = NetworkServiceStub(mesh.channel(mesh.manager_url))
    ns = await mesh.netns()
    unknown = request_for(mesh, ns).connection
    await stub.Close(unknown, timeout=10)
    await stub.Close(Connection(id="never-heard-of-it", network_service=mesh.service), timeout=10)
    await stub.Close(Connection(), timeout=10)
    await assert_nothing_built(mesh, ns)


@pytest.mark.timeout(30)
async def test_no_mechanism_offered_is_invalid_argument(mesh) -> None:
    ns = await mesh.netns()
    request = request_for(mesh, ns)
    del request.mechanism_preferences[:]
    err = await raw_request(mesh, request)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    await assert_nothing_built(mesh, ns)

"""Namespace confinement on a running one-node mesh: a client that names what is not a pod's
network namespace — the node's own (where the forwarder runs), by its path or the forwarder's
``/proc/<pid>/ns/net``, PID 1's, a regular file, a mount namespace — is refused with
PERMISSION_DENIED by the forwarder, and nothing is built anywhere (not in the node's
namespace, not in the endpoint's pod; no connection left in any monitor)."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from nsm.client.sdk import new_request
from nsm.mechanisms import kernel, netns_url
from nsm.security.ids import workload_id

pytestmark = [pytest.mark.kernel, pytest.mark.asyncio(loop_scope="session")]


def named(mesh: Any, case: str) -> str:
    pid = mesh.forwarder.pid
    return {
        "node-namespace": mesh.forwarder.netns,
        "forwarder-pid": f"/proc/{pid}/ns/net",
        "pid1": "/proc/1/ns/net",
        "regular-file": "/etc/hostname",
        "mount-namespace": f"/proc/{pid}/ns/mnt",
    }[case]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", ["node-namespace", "forwarder-pid", "pid1", "regular-file",
                                  "mount-namespace"])
async def test_a_namespace_that_is_not_a_pods_is_refused(mesh, case: str) -> None:
    target = named(mesh, case)
    node_links = await mesh.link_names(mesh.forwarder.netns)
    request = new_request(service=mesh.service, name=mesh.name("conf"),
                          mechanisms=[kernel("nsm-1", netns_url(target))])
    with pytest.raises(grpc.aio.AioRpcError) as info:
        # Signed like a client's, but no listener in the target: the structural checks refuse.
        await mesh.raw_request(mesh.manager_url, request, prove=False)
    err = info.value
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED, (err.code(), err.details())
    assert target in err.details()
    assert await mesh.link_names(mesh.forwarder.netns) == node_links, "built in the node's namespace"
    assert await mesh.link_names(mesh.main.netns) == [], "interface left in the endpoint pod"
    assert not any((await mesh.all_connections()).values())
    assert "denied" in mesh.log_since_mark(mesh.forwarder)


@pytest.mark.timeout(30)
async def test_another_pods_namespace_is_refused_and_nothing_is_built(mesh) -> None:
    """A client (its own identity) names the namespace of a pod that is another workload's
    (whose own listener is inside): the forwarder asks the namespace who owns it and refuses."""
    victim_ns = await mesh.netns("victim")
    victim = mesh.client(victim_ns, ifname="nsm-1")
    await victim.request()  # the victim's SDK keeps its listener in its namespace
    attacker = mesh.lab.identity(workload_id(mesh.lab.trust_domain, mesh.name("attacker")))
    request = new_request(service=mesh.service, name=mesh.name("att"),
                          mechanisms=[kernel("nsm-2", netns_url(victim_ns))])
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await mesh.raw_request(mesh.manager_url, request, security=attacker, prove=False)
    err = info.value
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED, (err.code(), err.details())
    assert sorted(await mesh.link_names(victim_ns)) == ["nsm-1"], "built in the victim's pod"
    conns = await mesh.all_connections()
    assert all(len(c) == 1 for c in conns.values() if c), conns  # only the victim's
    assert "denied" in mesh.log_since_mark(mesh.forwarder)
    await victim.close(raise_errors=True)

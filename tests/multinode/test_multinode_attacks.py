"""The attacks of issue 9, tried as an attacker would: a process on another node (in node3's
namespace: it reaches node1's manager and the registry over the fabric, over TCP, and nothing
else) while a victim's connection runs from node1 to node2. First without a certificate and with
one of another CA; then as a compromised workload holding a valid SVID of the trust domain (the
strongest attacker mTLS lets in). Every attempt is refused, and the victim's connection, the
nodes' namespaces and the registry are as they were.
"""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap
from typing import Any

import pytest

from nsm.lab.processes import NSM_ROOT, daemon_env

pytestmark = [pytest.mark.kernel, pytest.mark.asyncio(loop_scope="session")]

ATTACKER = textwrap.dedent('''
    import asyncio, json, sys
    import grpc
    from google.protobuf.timestamp_pb2 import Timestamp
    from nsm.api import connection_pb2, connection_pb2_grpc, networkservice_pb2_grpc, registry_pb2
    from nsm.api import registry_pb2_grpc
    from nsm.client.chain import new_request
    from nsm.elements.tokens import HopTokens
    from nsm.mechanisms import kernel, netns_url
    from nsm.security.ca import CertificateAuthority
    from nsm.security.policy import Policies
    from nsm.security.sources import CaSource
    from nsm.security.tls import Security
    from nsm.transport import Channels, dial

    ca_dir, td, manager, registry, victim_id, victim_nse, node_ns, service = sys.argv[1:9]
    results = {}

    def code(exc):
        return exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else type(exc).__name__

    async def outcome(name, aw):
        try:
            await aw
            results[name] = "OK"
        except Exception as exc:
            results[name] = code(exc)

    async def health(channel):
        from grpc_health.v1 import health_pb2, health_pb2_grpc
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)

    async def main():
        # 1. No certificate; 2. a certificate of another authority (same trust domain name).
        plain = dial(manager)
        await outcome("plaintext", health(plain))
        other_ca = CertificateAuthority.create(td)
        forged = Security(CaSource(other_ca, f"spiffe://{td}/nsm/node/node1/forwarder",
                                   trust_domain=td, dns_names=(td,)), trust_domain=td)
        await forged.start()
        await outcome("other_ca", health(dial(manager, forged)))
        # 3. A compromised workload with a valid SVID of the trust domain.
        me = Security(CaSource(ca_dir, f"spiffe://{td}/ns/default/pod/attacker", trust_domain=td,
                               dns_names=(td,)), trust_domain=td)
        await me.start()
        channels = Channels(security=me)
        tokens = HopTokens(channels, Policies(next_token_signed=False))
        stub = networkservice_pb2_grpc.NetworkServiceStub(channels.get(manager))

        async def request(req):
            md = await tokens.sign(manager, req.connection)
            return await stub.Request(req, metadata=md, timeout=15)

        async def close(conn):
            md = await tokens.sign(manager, conn)
            return await stub.Close(conn, metadata=md, timeout=15)

        # a KERNEL link into node1's own namespace, with a default route of ours
        req = new_request(service=service, name="attacker",
                          mechanisms=[kernel("evil0", netns_url(node_ns))])
        req.connection.context.ip_context.dst_routes.add(prefix="0.0.0.0/0")
        await outcome("node_namespace", request(req))
        # pretend to be a forwarder: a VXLAN/REMOTE request
        vx = new_request(service=service, name="attacker", mechanisms=[connection_pb2.Mechanism(
            cls="REMOTE", type="VXLAN", parameters={"src_ip": "10.254.0.3", "vni": "4242"})])
        await outcome("remote_mechanism", request(vx))
        # the monitor: what connections can we see?
        mon = connection_pb2_grpc.MonitorConnectionStub(channels.get(manager)).MonitorConnections(
            connection_pb2.MonitorScopeSelector(), timeout=5)
        first = await mon.read()
        mon.cancel()
        results["monitor_sees"] = sorted(first.connections)
        # Close the victim's connection by its id; take it over with a Request
        await outcome("close_victim", close(connection_pb2.Connection(
            id=victim_id, network_service=service, path=connection_pb2.Path(
                index=0, path_segments=[connection_pb2.PathSegment(name="attacker", id=victim_id)]))))
        takeover = new_request(service=service, name="attacker",
                               mechanisms=[kernel("evil1", netns_url(node_ns))])
        takeover.connection.id = victim_id
        takeover.connection.path.path_segments[0].id = victim_id
        await outcome("takeover", request(takeover))
        # the registry: overwrite the victim's endpoint, unregister it, a rogue forwarder record
        reg = registry_pb2_grpc.NetworkServiceEndpointRegistryStub(channels.get(registry))
        exp = Timestamp()
        exp.FromSeconds(2**31)
        await outcome("overwrite_nse", reg.Register(registry_pb2.NetworkServiceEndpoint(
            name=victim_nse, network_service_names=[service], url="tcp://10.254.0.3:9",
            expiration_time=exp), timeout=10))
        await outcome("unregister_nse", reg.Unregister(
            registry_pb2.NetworkServiceEndpoint(name=victim_nse), timeout=10))
        await outcome("rogue_forwarder", reg.Register(registry_pb2.NetworkServiceEndpoint(
            name="evil-fwd", network_service_names=["forwarder"], url="tcp://10.254.0.3:9",
            network_service_labels={"forwarder": registry_pb2.NetworkServiceLabels(
                labels={"nodeName": "node1", "nsmgrURL": manager})}, expiration_time=exp),
            timeout=10))
        await channels.close()
        print(json.dumps(results), flush=True)

    asyncio.run(main())
''')


@pytest.mark.timeout(90)
async def test_every_attack_from_another_node_is_refused(cluster) -> None:
    lab = cluster.lab
    victim_pod = await cluster.pod("victim")
    victim = cluster.client("node1", "ip", victim_pod)
    conn = await victim.request()
    routes_before = await cluster.netlink.routes(lab.node("node1").netns)
    links_before = await cluster.link_names(lab.node("node1").netns)
    registered_before = {n.name: n.url for n in await cluster.registry_client().find_nse()}

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nsm.lab.netns_exec", lab.node("node3").netns, "--",
        sys.executable, "-c", ATTACKER, str(lab.ca_dir), lab.trust_domain,
        lab.node("node1").manager_tcp_url, lab.registry_tcp_url, conn.id,
        conn.network_service_endpoint_name, lab.node("node1").netns, "ip",
        cwd=NSM_ROOT, env=daemon_env(), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()[-3000:]
    results: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])

    assert results.pop("plaintext") == "UNAVAILABLE"  # no certificate: no TLS session
    assert results.pop("other_ca") == "UNAVAILABLE"  # the handshake refuses another authority
    assert results.pop("monitor_sees") == []  # the victim's connection is not shown
    assert results == {
        "node_namespace": "PERMISSION_DENIED",
        "remote_mechanism": "PERMISSION_DENIED",
        "close_victim": "PERMISSION_DENIED",
        "takeover": "PERMISSION_DENIED",
        "overwrite_nse": "PERMISSION_DENIED",
        "unregister_nse": "PERMISSION_DENIED",
        "rogue_forwarder": "PERMISSION_DENIED",
    }, results
    # Nothing changed: node1's routes and links, the registry, the victim's connection.
    assert await cluster.netlink.routes(lab.node("node1").netns) == routes_before
    assert await cluster.link_names(lab.node("node1").netns) == links_before
    assert {n.name: n.url for n in await cluster.registry_client().find_nse()} == registered_before
    dst = conn.context.ip_context.dst_ip_addrs[0].split("/")[0]
    await cluster.assert_ping(victim_pod, dst)
    await victim.close(raise_errors=True)

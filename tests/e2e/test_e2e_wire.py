"""Wire compatibility: a client generated independently from protos in the upstream layout
(``upstream_protos/``: same packages, files, message and field names and numbers as
networkservicemesh/api, written by hand) registers and finds on our registry, and requests,
monitors and closes on our manager.

The generated modules register ``connection.proto`` & co. in protobuf's global descriptor pool,
as ``nsm.api`` does: the upstream client therefore runs in its own Python process, which imports
nothing from ``nsm``. It reports JSON lines on stdout and waits for a line on stdin before Close,
so the test can look at the kernel while the connection is up.

It is secure as the reference's clients are: mTLS with an X.509-SVID (PEM files the test issues
from the lab's CA) and an ES256 path token in ``nsm-client-token`` (made with PyJWT, not with
``nsm``); the audience is the manager's SPIFFE ID. What grpcio cannot do for it (prove its pod
namespace, serve the URL it registers) the test does with the same identity.
"""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from nsm.security.ca import CertificateAuthority
from nsm.security.ids import MANAGER, node_id, workload_id
from nsm.security.netns import NetnsProof
from nsm.transport import Server

pytestmark = [pytest.mark.kernel, pytest.mark.asyncio(loop_scope="session")]

PROTOS = Path(__file__).resolve().parent / "upstream_protos"
FILES = ["connectioncontext.proto", "connection.proto", "networkservice.proto", "registry.proto"]

CLIENT = textwrap.dedent('''
    import json, sys, time, uuid

    gen, registry_target, manager_target, service, netns, pki, manager_id, nse_url = sys.argv[1:9]
    sys.path.insert(0, gen)

    import grpc, jwt
    from datetime import datetime, timezone
    from google.protobuf import json_format
    from google.protobuf.timestamp_pb2 import Timestamp

    import connection_pb2, connection_pb2_grpc
    import networkservice_pb2, networkservice_pb2_grpc
    import registry_pb2, registry_pb2_grpc

    assert not any(m == "nsm" or m.startswith("nsm.") for m in sys.modules), "nsm was imported"

    def out(kind, **fields):
        print(json.dumps({"kind": kind, **fields}), flush=True)

    def as_dict(msg):
        return json_format.MessageToDict(msg, preserving_proto_field_name=True)

    def ts(seconds):
        t = Timestamp()
        t.FromSeconds(int(seconds))
        return t

    def pem(name):
        with open(f"{pki}/{name}", "rb") as f:
            return f.read()

    creds = grpc.ssl_channel_credentials(pem("svid_bundle.pem"), pem("svid_key.pem"), pem("svid.pem"))
    options = [("grpc.ssl_target_name_override", pem("server_name").decode())]

    def token_metadata(conn):
        """Sign our segment of ``conn`` for the manager, as the reference's updatetoken does."""
        exp = int(time.time()) + 120
        claims = {"sub": pem("spiffe_id").decode(), "aud": [manager_id], "iat": int(time.time()),
                  "exp": exp}
        token = jwt.encode(claims, pem("svid_key.pem"), algorithm="ES256")
        conn.path.path_segments[0].token = token
        conn.path.path_segments[0].expires.FromSeconds(exp)
        when = datetime.fromtimestamp(exp, timezone.utc).isoformat().replace("+00:00", "Z")
        return (("nsm-client-token", token), ("nsm-client-token-expires", when))

    R = registry_pb2
    reg = grpc.secure_channel(registry_target, creds, options=options)
    ns_stub = registry_pb2_grpc.NetworkServiceRegistryStub(reg)
    nse_stub = registry_pb2_grpc.NetworkServiceEndpointRegistryStub(reg)

    # -- network services
    wire_service = "wire-" + uuid.uuid4().hex[:6]
    ns = R.NetworkService(name=wire_service, payload="ETHERNET", matches=[R.Match(
        source_selector={"app": "x"}, fallthrough=True, metadata=R.Metadata(labels={"m": "1"}),
        routes=[R.Destination(destination_selector={"color": "c"}, weight=5)])])
    registered = ns_stub.Register(ns, timeout=10)
    found = [r.network_service for r in ns_stub.Find(
        R.NetworkServiceQuery(network_service=R.NetworkService(name=wire_service)), timeout=10)]
    out("ns", registered=as_dict(registered), found=[as_dict(f) for f in found])

    # -- endpoints: watch, register, find, unregister
    watch = nse_stub.Find(R.NetworkServiceEndpointQuery(network_service_endpoint=R.NetworkServiceEndpoint(
        network_service_names=[wire_service]), watch=True), timeout=20)
    nse = R.NetworkServiceEndpoint(
        name="wire-nse-" + uuid.uuid4().hex[:6], network_service_names=[wire_service],
        network_service_labels={wire_service: R.NetworkServiceLabels(labels={"color": "c"})},
        url=nse_url, expiration_time=ts(time.time() + 60))
    got = nse_stub.Register(nse, timeout=10)
    event = next(watch)
    watch.cancel()
    found = [as_dict(r.network_service_endpoint) for r in nse_stub.Find(
        R.NetworkServiceEndpointQuery(network_service_endpoint=R.NetworkServiceEndpoint(
            network_service_names=[wire_service])), timeout=10)]
    nse_stub.Unregister(R.NetworkServiceEndpoint(name=got.name), timeout=10)
    after = [as_dict(r.network_service_endpoint) for r in nse_stub.Find(
        R.NetworkServiceEndpointQuery(network_service_endpoint=R.NetworkServiceEndpoint(
            name=got.name)), timeout=10)]
    ns_stub.Unregister(R.NetworkService(name=wire_service), timeout=10)
    out("nse", sent=as_dict(nse), registered=as_dict(got), event=as_dict(event),
        found=found, after_unregister=after)

    # -- a connection through our manager
    mgr = grpc.secure_channel(manager_target, creds, options=options)
    C = connection_pb2
    conn_id = str(uuid.uuid4())
    request = networkservice_pb2.NetworkServiceRequest(
        connection=C.Connection(
            id=conn_id, network_service=service, labels={"app": "wire"},
            path=C.Path(index=0, path_segments=[C.PathSegment(
                name="upstream-nsc", id=conn_id, expires=ts(time.time() + 120))])),
        mechanism_preferences=[C.Mechanism(cls="LOCAL", type="KERNEL", parameters={
            "name": "wire-1", "inodeURL": "file://" + netns})])
    client = networkservice_pb2_grpc.NetworkServiceStub(mgr)
    conn = client.Request(request, timeout=20, metadata=token_metadata(request.connection))
    monitor = connection_pb2_grpc.MonitorConnectionStub(mgr).MonitorConnections(
        C.MonitorScopeSelector(network_services=[service]), timeout=10)
    first = next(monitor)
    monitor.cancel()
    out("requested", conn=as_dict(conn), monitor_type=C.ConnectionEventType.Name(first.type),
        monitor=[as_dict(c) for c in first.connections.values()])
    sys.stdin.readline()
    client.Close(conn, timeout=20, metadata=token_metadata(conn))
    client.Close(conn, timeout=20, metadata=token_metadata(conn))  # idempotent
    out("closed")
''')


def generated_files(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("*.py"))


async def compile_protos(mesh: Any, out: Path) -> None:
    result = await mesh.run_cli_python(
        "-m", "grpc_tools.protoc", f"-I{PROTOS}", f"--python_out={out}", f"--grpc_python_out={out}",
        *FILES)
    assert result.returncode == 0, result.stderr
    generated = generated_files(out)
    assert "registry_pb2_grpc.py" in generated and "connection_pb2.py" in generated, generated


@pytest.mark.timeout(90)
async def test_upstream_generated_client_against_registry_and_manager(mesh, tmp_path: Path) -> None:
    gen = tmp_path / "gen"
    gen.mkdir()
    await compile_protos(mesh, gen)
    ns = await mesh.netns()
    script = tmp_path / "upstream_client.py"
    script.write_text(CLIENT)
    registry_target = "unix:" + mesh.registry_url.removeprefix("unix://")
    manager_target = "unix:" + mesh.manager_url.removeprefix("unix://")
    # The upstream client's identity: PEM files in spiffe-helper's layout.
    lab = mesh.lab
    spiffe_id = workload_id(lab.trust_domain, mesh.name("upstream"))
    svid = CertificateAuthority.open(lab.ca_dir, lab.trust_domain).issue(
        spiffe_id, dns_names=(lab.trust_domain,))
    pki = tmp_path / "pki"
    pki.mkdir()
    for name, data in (("svid.pem", svid.chain_pem), ("svid_key.pem", svid.key_pem),
                       ("svid_bundle.pem", svid.bundle_pem), ("spiffe_id", svid.id.encode()),
                       ("server_name", lab.trust_domain.encode())):
        (pki / name).write_bytes(data)
    # What it cannot do with grpcio alone, the test does with the same identity: serve the URL
    # it registers (the registry asks it to prove who it is) and prove its pod's namespace.
    same = lab.identity(spiffe_id)
    await same.start()
    nse_url = f"unix://{tmp_path}/upstream-nse.sock"
    nse_server = Server([nse_url], security=same)
    await nse_server.start()
    mesh.stack.push_async_callback(nse_server.stop, 0)
    await mesh.stack.enter_async_context(NetnsProof.listen(same, ns))
    manager_id = node_id(lab.trust_domain, "node1", MANAGER)
    proc = await mesh.spawn_python(str(script), str(gen), registry_target, manager_target,
                                   mesh.service, ns, str(pki), manager_id, nse_url)
    assert proc.stdout is not None and proc.stdin is not None

    async def line() -> dict[str, Any]:
        raw = await asyncio.wait_for(proc.stdout.readline(), 30)
        if not raw:
            err = (await proc.stderr.read()).decode() if proc.stderr else ""
            raise AssertionError(f"upstream client ended early: {err}")
        return json.loads(raw)

    # Registry: NetworkService with matches survives the round trip.
    ns_out = await line()
    assert ns_out["kind"] == "ns"
    assert ns_out["found"] == [ns_out["registered"]]
    (match,) = ns_out["registered"]["matches"]
    assert match == {"source_selector": {"app": "x"}, "fallthrough": True,
                     "metadata": {"labels": {"m": "1"}},
                     "routes": [{"destination_selector": {"color": "c"}, "weight": 5}]}
    assert ns_out["registered"]["payload"] == "ETHERNET"

    # Registry: NSE register / watch / find / unregister.
    nse_out = await line()
    assert nse_out["kind"] == "nse"
    sent, got = nse_out["sent"], nse_out["registered"]
    for key in ("name", "network_service_names", "network_service_labels", "url"):
        assert got[key] == sent[key], key
    assert "expiration_time" in got and "initial_registration_time" in got
    assert nse_out["event"]["network_service_endpoint"]["name"] == sent["name"]
    assert not nse_out["event"].get("deleted", False)
    assert [f["name"] for f in nse_out["found"]] == [sent["name"]]
    assert nse_out["after_unregister"] == []

    # Manager: Request returns the full 4-segment path, the addresses and the mechanism.
    req = await line()
    assert req["kind"] == "requested"
    conn = req["conn"]
    assert conn["network_service"] == mesh.service
    assert conn["network_service_endpoint_name"] == mesh.main.name
    assert conn["payload"] == "IP"
    assert conn["mechanism"]["cls"] == "LOCAL" and conn["mechanism"]["type"] == "KERNEL"
    assert conn["mechanism"]["parameters"]["name"] == "wire-1"
    ip = conn["context"]["ip_context"]
    assert (ip["dst_ip_addrs"][0], ip["src_ip_addrs"][0]) == mesh.first_pair
    segs = conn["path"]["path_segments"]
    assert segs[0]["name"] == "upstream-nsc"
    assert len(segs) == 4 and segs[-1]["name"] == mesh.main.name
    assert conn["path"].get("index", 0) == 0
    assert conn["id"] == segs[0]["id"]
    assert conn["labels"]["app"] == "wire"
    assert req["monitor_type"] == "INITIAL_STATE_TRANSFER"
    assert len(req["monitor"]) == 1 and req["monitor"][0]["path"]["path_segments"][0]["id"] == conn["id"]
    # ... and the kernel has the link.
    assert ip["src_ip_addrs"][0] in await mesh.netlink.addresses(ns, "wire-1")

    proc.stdin.write(b"close\n")
    await proc.stdin.drain()
    assert (await line())["kind"] == "closed"
    assert await asyncio.wait_for(proc.wait(), 10) == 0
    assert await mesh.link_names(ns) == []
    assert sys.modules.get("connection_pb2") is None  # nothing leaked into this process

"""The emulated cluster (nsm.lab): description, building, reachability over the fabric,
daemons serving and registered, teardown without leftovers (also after a failed or cancelled
build), the ``nsm lab up/down/status`` round trip, and a local connection through a lab's
manager."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from nsm.api.registry_pb2 import NetworkServiceEndpoint
from nsm.client.sdk import Client
from nsm.errors import AlreadyExists, InvalidArgument, NsmError, Unavailable
from nsm.kernel import netns as nsns
from nsm.kernel.netlink import Netlink
from nsm.kernel.ping import ping
from nsm.lab import (
    EndpointSpec,
    Lab,
    MatchSpec,
    NodeSpec,
    PodSpec,
    ServiceSpec,
    Topology,
    cleanup,
    is_alive,
    lab_namespaces,
    pids_in_netns,
    read_state,
)
from nsm.lab.processes import daemon_env, pids_naming, wait_serving
from nsm.registry.client import RegistryClient
from nsm.transport import dial
from nsm.wellknown import FORWARDER_SERVICE, MANAGER_URL_LABEL, NODE_LABEL

F = TypeVar("F", bound=Callable[..., Any])


def kernel(fn: F) -> F:
    """Mark a test that needs root and real namespaces."""
    return pytest.mark.kernel(
        pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")(fn))

_HEALTH = ("import asyncio, sys\n"
           "from nsm.lab.processes import daemon_env, pids_naming, wait_serving\n"
           "from nsm.security.options import security_from_environment\n"
           "async def main():\n"
           "    async with security_from_environment('spiffe://nsm.lab/nsm/lab') as security:\n"
           "        await wait_serving(sys.argv[1], timeout=5, security=security)\n"
           "asyncio.run(main())\n")


async def health_from(netns: str, url: str, lab_env: dict[str, str]) -> tuple[int, str]:
    """Check gRPC health of ``url`` from a process inside ``netns`` (the lab's tcp URLs are
    only reachable over its fabric, not from the test's root namespace)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nsm.lab.netns_exec", netns, "--", sys.executable, "-c", _HEALTH, url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=daemon_env(lab_env))
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode or 0, err.decode(errors="replace")


def lab_processes(marker: str) -> list[int]:
    """Live processes whose command line mentions ``marker`` (a lab's work dir or prefix)."""
    return [pid for pid, _ in pids_naming(marker)]


def assert_gone(lab: Lab, workdir: Path) -> None:
    assert lab_namespaces(lab.prefix) == []
    for d in lab.daemons.values():
        assert d.pid is None
    assert lab_processes(str(workdir)) == []
    assert not workdir.exists()


# ---------------------------------------------------------------------------------- description


def test_simple_topology() -> None:
    t = Topology.simple(3, pods_per_node=2, service="blue")
    assert [n.name for n in t.nodes] == ["node1", "node2", "node3"]
    assert [(p.name, p.node) for p in t.pods][:2] == [("node1-pod1", "node1"),
                                                     ("node1-pod2", "node1")]
    assert [(e.name, e.cidr) for e in t.endpoints] == [
        ("node1-nse", "172.16.0.0/24"), ("node2-nse", "172.16.1.0/24"),
        ("node3-nse", "172.16.2.0/24")]
    assert t.registry_node == "node1"
    assert t.node_ip("node3") == "172.30.0.3"
    assert hash(t) == hash(Topology.simple(3, pods_per_node=2, service="blue"))


def test_topology_lists_and_labels_become_tuples() -> None:
    t = Topology(nodes=[NodeSpec("a")], pods=[PodSpec("p", "a")],
                 endpoints=[EndpointSpec("e", "a", ["s"], "10.0.0.0/24",
                                        labels={"x": "1"})],  # type: ignore[arg-type]
                 services=[ServiceSpec("s", matches=[MatchSpec(
                     source={"app": "c"}, routes=[{"x": "1"}])])])  # type: ignore[arg-type]
    assert t.endpoints[0].labels == (("x", "1"),)
    assert t.endpoints[0].pod_name == "e"
    proto = t.services[0].to_proto()
    assert proto.matches[0].source_selector["app"] == "c"
    assert proto.matches[0].routes[0].destination_selector["x"] == "1"


@pytest.mark.parametrize("make", [
    lambda: Topology(nodes=[]),
    lambda: Topology(nodes=[NodeSpec("a"), NodeSpec("a")]),
    lambda: Topology(nodes=[NodeSpec("a")], registry_node="b"),
    lambda: Topology(nodes=[NodeSpec("a")], pods=[PodSpec("p", "b")]),
    lambda: Topology(nodes=[NodeSpec("a")], pods=[PodSpec("a", "a")]),
    lambda: Topology(nodes=[NodeSpec("a")], endpoints=[EndpointSpec("e", "b", ("s",), "10.0.0.0/8")]),
    lambda: Topology(nodes=[NodeSpec("a")], pods=[PodSpec("e", "a")],
                     endpoints=[EndpointSpec("e", "a", ("s",), "10.0.0.0/8")]),
    lambda: NodeSpec("a-node-name-too-long"),
    lambda: NodeSpec("fab"),
    lambda: EndpointSpec("e", "a", (), "10.0.0.0/8"),
    lambda: EndpointSpec("e", "a", ("s",), "not-a-cidr"),
    lambda: ServiceSpec("s", payload="FOO"),
    lambda: Lab(Topology.simple(1), prefix="has-dash"),
    lambda: Lab(Topology.simple(1), prefix="ok", extra_args={"manager.node9": ["--x"]}),
])
def test_bad_descriptions_are_rejected(make: object) -> None:
    with pytest.raises(InvalidArgument):
        make()  # type: ignore[operator]


# ---------------------------------------------------------------------------------- a built lab


@kernel
@pytest.mark.timeout(60)
@pytest.mark.usefixtures("no_leaked_tasks")
async def test_two_nodes_build_and_reach_each_other_over_the_fabric(lab2: Lab) -> None:
    n1, n2 = lab2.node("node1"), lab2.node("node2")
    assert (n1.ip, n2.ip) == ("172.30.0.1", "172.30.0.2")
    assert n1.netns == f"/var/run/netns/{lab2.prefix}-node1"
    assert sorted(lab_namespaces(lab2.prefix)) == sorted(
        f"{lab2.prefix}-{n}" for n in ("fab", "node1", "node2", "node1-pod1", "node2-pod1"))
    assert lab2.pod("node2-pod1").node == "node2"

    async with Netlink(prune_interval=0) as nl:
        for node in (n1, n2):
            eth0 = await nl.link(node.netns, "eth0")
            assert eth0 is not None and eth0.mtu == 1500 and eth0.oper_up
            v4 = [a for a in await nl.addresses(node.netns, "eth0") if ":" not in a]
            assert v4 == [f"{node.ip}/24"]
            assert await nl.sysctl_in_netns(node.netns, "net.ipv4.ip_forward") == "1"
            assert (await nl.link(node.netns, "lo")).admin_up  # type: ignore[union-attr]
            port = await nl.link(lab2.fabric_netns, node.name)
            bridge = await nl.link(lab2.fabric_netns, "br0")
            assert port is not None and bridge is not None and port.master == bridge.index

    for src, dst in ((n1, n2), (n2, n1)):
        result = await asyncio.to_thread(ping, src.netns, dst.ip, count=3, interval=0.01)
        assert result.received == 3, result
    # Full-size frames pass the 1500 underlay unfragmented.
    big = await asyncio.to_thread(ping, n1.netns, n2.ip, count=1, size=1472, dont_fragment=True)
    assert big.received == 1, big


@kernel
@pytest.mark.timeout(60)
async def test_daemons_serve_on_unix_and_across_the_fabric(lab2: Lab) -> None:
    n1, n2 = lab2.node("node1"), lab2.node("node2")
    for url in (lab2.registry_url, n1.manager_url, n2.manager_url, n1.forwarder_url,
                n2.forwarder_url):
        await wait_serving(url, timeout=5, security=lab2.security)
    # The registry and each manager answer over tcp from the *other* node.
    checks = [(n2.netns, lab2.registry_tcp_url), (n2.netns, n1.manager_tcp_url),
              (n1.netns, n2.manager_tcp_url)]
    results = await asyncio.gather(*(health_from(ns, url, lab2.daemon_env) for ns, url in checks))
    for (ns, url), (rc, err) in zip(checks, results, strict=True):
        assert rc == 0, f"{url} from {ns}: {err}"
    # Every daemon runs inside its node's namespace, none in the root one.
    assert sorted(pids_in_netns([n1.netns])) == sorted(
        d.pid or 0 for k, d in lab2.daemons.items()
        if k in ("registry", "manager.node1", "forwarder.node1"))


@kernel
@pytest.mark.timeout(60)
async def test_forwarders_are_registered(lab2: Lab) -> None:
    channel = dial(lab2.registry_url, lab2.security)
    try:
        found = await RegistryClient(channel, timeout=5).find_nse()
    finally:
        await channel.close()
    forwarders = {n.name: n for n in found if FORWARDER_SERVICE in n.network_service_names}
    assert sorted(forwarders) == ["node1-fwd", "node2-fwd"]
    labels = forwarders["node2-fwd"].network_service_labels[FORWARDER_SERVICE].labels
    assert labels[NODE_LABEL] == "node2"
    assert labels[MANAGER_URL_LABEL] == lab2.node("node2").manager_url
    assert await lab2.forwarders() == ["node1-fwd", "node2-fwd"]


@kernel
@pytest.mark.timeout(60)
async def test_kill_and_restart_a_daemon(lab2: Lab) -> None:
    mgr = lab2.node("node2").manager
    old = mgr.pid
    await lab2.kill("manager.node2")
    assert mgr.pid is None and not is_alive(old)
    with pytest.raises(Unavailable):
        await wait_serving(lab2.node("node2").manager_url, timeout=0.5, security=lab2.security)
    await lab2.restart(mgr)
    assert mgr.pid not in (None, old)
    rc, err = await health_from(lab2.node("node1").netns, lab2.node("node2").manager_tcp_url,
                                lab2.daemon_env)
    assert rc == 0, err
    assert "manager serving" in lab2.logs()["manager.node2"]


# ---------------------------------------------------------------------------------- teardown


@kernel
@pytest.mark.timeout(60)
@pytest.mark.usefixtures("no_leaked_tasks")
async def test_teardown_leaves_nothing(prefix: str) -> None:
    lab = Lab(Topology.simple(2, service="lab-ip"), prefix=prefix)
    async with lab:
        assert lab.workdir is not None
        workdir = lab.workdir
        pids = [d.pid for d in lab.daemons.values()]
        assert len(pids) == 7 and all(pids)
        paths = [f"/var/run/netns/{n}" for n in lab_namespaces(prefix)]
    assert lab.teardown_seconds < 10
    assert_gone(lab, workdir)
    assert not any(is_alive(p) for p in pids)
    assert pids_in_netns(paths) == []
    await lab.stop()  # idempotent


@kernel
@pytest.mark.timeout(90)
async def test_a_daemon_that_cannot_start_tears_everything_down(prefix: str,
                                                               short_tmp: Path) -> None:
    workdir = short_tmp / "lab"
    lab = Lab(Topology.simple(2), prefix=prefix, workdir=workdir,
              extra_args={"forwarder.node2": ["--no-such-flag"]})
    with pytest.raises(Unavailable) as err:
        await lab.start()
    text = str(err.value)
    assert "forwarder.node2 did not start" in text
    assert "--no-such-flag" in text  # the tail of its log says why
    assert_gone(lab, workdir)


@kernel
@pytest.mark.timeout(90)
@pytest.mark.parametrize("after", [0.05, 0.6])
async def test_cancelled_build_tears_everything_down(prefix: str, after: float,
                                                     short_tmp: Path) -> None:
    workdir = short_tmp / "lab"
    lab = Lab(Topology.simple(2), prefix=prefix, workdir=workdir)
    task = asyncio.create_task(lab.start())
    await asyncio.sleep(after)  # namespaces being made / daemons starting
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert_gone(lab, workdir)


@kernel
@pytest.mark.timeout(60)
async def test_an_existing_lab_with_the_same_prefix_is_refused(lab2: Lab) -> None:
    with pytest.raises(AlreadyExists, match="nsm lab down --prefix"):
        await Lab(Topology.simple(1), prefix=lab2.prefix).start()
    assert len(lab_namespaces(lab2.prefix)) == 5  # the running lab is untouched
    await wait_serving(lab2.registry_url, timeout=2, security=lab2.security)


# ---------------------------------------------------------------------------------- CLI


def nsm(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nsm.cli", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, check=False)


@pytest.fixture
def state_dir(prefix: str, short_tmp: Path) -> Iterator[Path]:
    path = short_tmp / "state"
    yield path
    cleanup(prefix, state_dir=path)  # if the test failed before `nsm lab down`


@kernel
@pytest.mark.timeout(120)
def test_cli_up_status_down(prefix: str, state_dir: Path) -> None:
    up = nsm("lab", "up", "--nodes", "2", "--prefix", prefix, "--state-dir", str(state_dir))
    assert up.returncode == 0, up.stderr + up.stdout
    assert f"nsm lab down --prefix {prefix}" in up.stdout
    state = read_state(prefix, state_dir)
    assert state is not None and state["ready"]
    assert sorted(state["nodes"]) == ["node1", "node2"]
    assert len(lab_namespaces(prefix)) == 5
    pids = [d["pid"] for d in state["daemons"].values()] + [state["supervisor"]["pid"]]
    assert all(is_alive(p) for p in pids)

    again = nsm("lab", "up", "--nodes", "1", "--prefix", prefix, "--state-dir", str(state_dir))
    assert again.returncode == 1 and "already up" in again.stderr

    status = nsm("lab", "status", "--prefix", prefix, "--state-dir", str(state_dir))
    assert status.returncode == 0, status.stdout + status.stderr
    assert "forwarder.node2" in status.stdout and "serving" in status.stdout
    as_json = nsm("lab", "status", "--json", "--prefix", prefix, "--state-dir", str(state_dir))
    assert json.loads(as_json.stdout)["prefix"] == prefix

    down = nsm("lab", "down", "--prefix", prefix, "--state-dir", str(state_dir))
    assert down.returncode == 0, down.stderr
    assert lab_namespaces(prefix) == []
    assert not any(is_alive(p) for p in pids)
    assert list(state_dir.iterdir()) == []

    assert nsm("lab", "down", "--prefix", prefix, "--state-dir", str(state_dir)).returncode == 0
    assert nsm("lab", "status", "--prefix", prefix, "--state-dir", str(state_dir)).returncode == 3


@kernel
@pytest.mark.timeout(120)
def test_cleanup_after_the_supervisor_crashed(prefix: str, state_dir: Path) -> None:
    up = nsm("lab", "up", "--nodes", "2", "--prefix", prefix, "--state-dir", str(state_dir))
    assert up.returncode == 0, up.stderr + up.stdout
    state = read_state(prefix, state_dir)
    assert state is not None
    os.kill(state["supervisor"]["pid"], signal.SIGKILL)  # no teardown: daemons stay behind
    daemons = [d["pid"] for d in state["daemons"].values()]
    assert all(is_alive(p) for p in daemons)

    status = nsm("lab", "status", "--prefix", prefix, "--state-dir", str(state_dir))
    assert status.returncode == 1 and "DEAD" in status.stdout

    report = cleanup(prefix, state_dir=state_dir)
    assert sorted(report.processes) == sorted(daemons)
    assert len(report.namespaces) == 5
    assert lab_namespaces(prefix) == [] and not any(is_alive(p) for p in daemons)
    assert cleanup(prefix, state_dir=state_dir).empty


def test_cli_rejects_bad_input() -> None:
    bad = nsm("lab", "up", "--prefix", "bad-prefix", "--state-dir", "/nonexistent")
    assert bad.returncode == 2 and "prefix" in bad.stderr


# ---------------------------------------------------------------------------------- end to end


@kernel
@pytest.mark.timeout(90)
@pytest.mark.parametrize(("nse_node", "path"), [
    ("node1", ["node1", "node1-fwd", "nse"]),
    ("node2", ["node1", "node1-fwd", "node2", "node2-fwd", "nse"]),  # VXLAN over the fabric
], ids=["same-node", "cross-node"])
async def test_connection_through_the_lab(prefix: str, nse_node: str, path: list[str]) -> None:
    topology = Topology(
        nodes=[NodeSpec("node1"), NodeSpec("node2")],
        pods=[PodSpec("client", "node1")],
        endpoints=[EndpointSpec("nse", nse_node, ("lab-svc",), "172.16.77.0/24")],
        services=[ServiceSpec("lab-svc")],
    )
    async with Lab(topology, prefix=prefix) as lab:
        # Registered through its node's manager, which advertises its fabric URL for it.
        channel = dial(lab.registry_url, lab.security)
        try:
            (nse,) = await RegistryClient(channel, timeout=5).find_nse(
                NetworkServiceEndpoint(name="nse"))
        finally:
            await channel.close()
        assert nse.url == lab.node(nse_node).manager_tcp_url
        client_ns = lab.pod("client").netns
        client = Client(manager_url=lab.node("node1").manager_url, service="lab-svc",
                        netns=client_ns, ifname="nsm-1", security=lab.pod_identity(client_ns))
        try:
            conn = await client.request()
            assert [s.name for s in conn.path.path_segments][1:] == path
            dst = conn.context.ip_context.dst_ip_addrs[0].split("/")[0]
            # One spare echo, as in tests/multinode (Cluster.assert_ping).
            result = await asyncio.to_thread(ping, client_ns, dst, count=4, interval=0.01)
            assert result.received >= 3, result
        finally:
            with contextlib.suppress(NsmError):
                await client.close()
        async with Netlink(prune_interval=0) as nl:
            assert await nl.link(client_ns, "nsm-1") is None
    assert not nsns.netns_exists(f"{prefix}-client")

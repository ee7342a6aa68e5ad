"""The image's entry points start every role with the environment the manifests give them.

Each container of the rendered base (and the example endpoint) runs here as the container would
run it, ``nsm <args>`` with exactly its ``env`` — ``$(VAR)`` expanded, the downward-API values
filled in — as a real process in a scratch network namespace standing for the node (host
network: every daemon of the node shares it). Only what a cluster provides is substituted: host
paths move into a scratch directory, the registry Service's name becomes its address, and the CNI
agent, outside a cluster, gets a kubeconfig instead of the in-cluster service account. Then
every probe the manifests declare must pass (exec probes run ``nsm health`` in the container's
environment; ``grpc:`` probes are checked on the port and address the kubelet would dial), the
init container installs nsm-cni (the image's self-contained bundle) into a copy of kind's
kindnet conflist (and deploy/uninstall's takes it out again), and a pod asking for the example's
service through the installed plugin gets its interface and answers a ping.

Secure, as the manifests run: the cluster's CA (the Secret ``nsm-ca``) is made with ``nsm
ca-init`` as e2e/kind/run.sh makes it, and stands at the Secret's mount path; every daemon and
every probe issues itself its identity from it. The example endpoint runs in a namespace of its
own (a pod's, with its pod IP): the forwarder programs only pods' namespaces.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from nsm.kernel.netlink import Netlink
from nsm.kernel.ping import ping
from nsm.lab.harness import NetnsGroup, eventually
from nsm.lab.processes import daemon_env
from tests.deploy.render import containers, env_of, find, render

pytestmark = [pytest.mark.kernel, pytest.mark.slow, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[2]
#: The node's address, on its eth0 (a bridge standing for the node's uplink).
NODE_IP = "10.255.0.1"
#: The example endpoint pod's address (a veth to the node; the node's side has POD_GW).
POD_IP, POD_GW = "10.255.1.2", "10.255.1.1"
SERVICE = "registry.nsm-system.svc.cluster.local"


class Node:
    """A scratch node: a namespace, a directory standing for the host's paths, its processes."""

    def __init__(self, netns: str, root: Path) -> None:
        self.netns = netns
        self.root = root
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self.logs: dict[str, Path] = {}
        self.netnses: dict[str, str] = {}

    def host(self, text: str) -> str:
        for path in ("/run/nsm", "/var/lib/nsm/cni", "/opt/cni/bin", "/etc/cni/net.d", "/opt/nsm-cni",
                     "/etc/nsm/ca"):
            text = text.replace(path, str(self.root / path.strip("/").replace("/", "_")))
        return text.replace(SERVICE, NODE_IP)

    def env(self, container: dict[str, Any], **values: str) -> dict[str, str]:
        fields = {"NODE_NAME": "node1", "NODE_IP": NODE_IP, "POD_IP": NODE_IP,
                  "POD_NAMESPACE": "nsm-examples", **values}
        return {k: self.host(v) for k, v in env_of(container, fields).items()}

    def command(self, args: list[str], netns: str | None = None) -> list[str]:
        return [sys.executable, "-m", "nsm.lab.netns_exec", netns or self.netns, "--", sys.executable, "-m",
                "nsm.cli", *args]

    async def start(self, name: str, container: dict[str, Any], env: dict[str, str],
                    netns: str | None = None) -> None:
        self.logs[name] = self.root / f"{name}.log"
        self.netnses[name] = netns or self.netns
        out = os.open(self.logs[name], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            self.procs[name] = await asyncio.create_subprocess_exec(
                *self.command(container["args"], netns), env=daemon_env(env),
                stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
        finally:
            os.close(out)

    async def run(self, args: list[str], env: dict[str, str], timeout: float = 30,
                  netns: str | None = None) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            *self.command(args, netns), env=daemon_env(env), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
        return proc.returncode or 0, out.decode()

    async def probe(self, name: str, container: dict[str, Any], env: dict[str, str], host_ip: str) -> None:
        """Wait until each of the container's probes passes, as the kubelet runs it."""
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container.get(kind)
            if probe is None:
                continue
            if "exec" in probe:
                cmd = probe["exec"]["command"]
                assert cmd[0] == "nsm"
                args, probe_env = cmd[1:], env
            else:
                args, probe_env = ["health", "--url", f"tcp://{host_ip}:{probe['grpc']['port']}"], {}
            last: list[str] = []

            async def passes(args: list[str] = args, probe_env: dict[str, str] = probe_env,
                             last: list[str] = last) -> bool:
                proc = self.procs[name]
                assert proc.returncode is None, f"{name} exited {proc.returncode}:\n{self.log(name)}"
                status, out = await self.run(args, probe_env, netns=self.netnses[name])
                last[:] = [out]
                return status == 0

            try:
                await eventually(passes, timeout=30, interval=0.3, what=f"{name}'s {kind}")
            except AssertionError as exc:
                raise AssertionError(f"{exc}: {last}\n{self.log(name)}") from None

    def log(self, name: str) -> str:
        path = self.logs.get(name)
        return path.read_text()[-4000:] if path and path.exists() else ""

    async def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()


@pytest.fixture
async def node(nsm_run_prefix: str) -> AsyncIterator[Node]:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    group = NetnsGroup(f"{nsm_run_prefix}-k8s")
    root = Path(tempfile.mkdtemp(prefix=f"{nsm_run_prefix}-k8s-"))
    n = Node(group("node"), root)
    n.pods = group  # type: ignore[attr-defined]
    try:
        async with Netlink() as nl:
            await nl.create_bridge("eth0", n.netns)
            await nl.add_address(n.netns, "eth0", f"{NODE_IP}/24")
            await nl.set_up(n.netns, "eth0")
        yield n
    finally:
        await n.stop()
        group.cleanup()
        shutil.rmtree(root, ignore_errors=True)


def kubeconfig(root: Path) -> str:
    path = root / "kubeconfig"
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "t",
        "clusters": [{"name": "t", "cluster": {"server": "http://127.0.0.1:1"}}],
        "contexts": [{"name": "t", "context": {"cluster": "t", "user": "t"}}],
        "users": [{"name": "t", "user": {"token": "x"}}]}))
    return str(path)


def build_bundle(dest: Path) -> None:
    import runpy

    script = ROOT / "deploy" / "image" / "cni_bundle.py"
    runpy.run_path(str(script), run_name="cni_bundle")["build"](str(dest))


async def test_every_role_starts_with_the_manifests_environment(node: Node) -> None:
    base = render("base")
    registry = find(base, "Deployment", "registry")
    ds = find(base, "DaemonSet", "nsm-node")
    by_name = {c["name"]: c for c in containers(ds)}
    nse = containers(find(render("examples/kernel2kernel"), "Deployment", "nse-icmp-responder"))[0]
    for d in ("run_nsm", "var_lib_nsm_cni", "opt_cni_bin", "etc_cni_net.d"):
        (node.root / d).mkdir()
    # The Secret nsm-ca, made as e2e/kind/run.sh makes it, of the manifests' trust domain.
    trust_domain = node.env(by_name["manager"])["NSM_TRUST_DOMAIN"]
    status, out = await node.run(["ca-init", "--dir", str(node.root / "etc_nsm_ca"), "--trust-domain",
                                  trust_domain], {})
    assert status == 0, out
    assert node.env(by_name["manager"])["NSM_CA_DIR"] == str(node.root / "etc_nsm_ca")
    shutil.copy(Path(__file__).parent / "conflists" / "10-kindnet.conflist", node.root / "etc_cni_net.d")

    # The init container: nsm-cni (the image's bundle) into the bin dir, into kindnet's conflist.
    build_bundle(node.root / "opt_nsm-cni")
    install = by_name["cni-install"]
    status, out = await node.run(install["args"], node.env(install))
    assert status == 0, out
    conf = json.loads((node.root / "etc_cni_net.d" / "10-kindnet.conflist").read_text())
    entry = conf["plugins"][-1]
    assert entry["type"] == "nsm-cni" and entry["socket"] == str(node.root / "run_nsm" / "cni" / "agent.sock")

    # The daemons, in the order Kubernetes would get them serving.
    reg = registry["spec"]["template"]["spec"]["containers"][0]
    await node.start("registry", reg, node.env(reg))
    await node.probe("registry", reg, node.env(reg), NODE_IP)
    envs = {name: node.env(by_name[name]) for name in ("manager", "forwarder", "cni-agent")}
    envs["cni-agent"]["NSM_KUBECONFIG"] = kubeconfig(node.root)  # in a cluster: the service account
    for name in ("manager", "forwarder", "cni-agent"):
        await node.start(name, by_name[name], envs[name])
    for name in ("manager", "forwarder", "cni-agent"):
        await node.probe(name, by_name[name], envs[name], NODE_IP)
    nse_env = node.env(nse, POD_NAME="nse-icmp-responder-1", POD_IP=POD_IP)
    nse_pod = node.pods("nsepod")  # type: ignore[attr-defined]
    async with Netlink() as nl:
        await nl.create_veth("eth0", nse_pod, "vethnse", node.netns)
        await nl.add_address(nse_pod, "eth0", f"{POD_IP}/24")
        await nl.add_address(node.netns, "vethnse", f"{POD_GW}/24")
        for ns, dev in ((nse_pod, "eth0"), (node.netns, "vethnse")):
            await nl.set_up(ns, dev)
        await nl.add_route(nse_pod, f"{NODE_IP}/32", "eth0", gateway=POD_GW)
    await node.start("nse", nse, nse_env, netns=nse_pod)
    await node.probe("nse", nse, nse_env, NODE_IP)

    # A pod created by the runtime: kindnet's list at 0.3.1, nsm-cni last (here: asked by config).
    pod = node.pods("pod")  # type: ignore[attr-defined]
    config = {"cniVersion": conf["cniVersion"], "name": conf["name"], **entry,
              "services": ["kernel://icmp-responder/nsm-1"],
              "prevResult": {"cniVersion": conf["cniVersion"], "interfaces": [], "ips": []}}
    plugin_env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": pod, "CNI_IFNAME": "eth0",
                  "CNI_PATH": str(node.root / "opt_cni_bin")}
    plugin = str(node.root / "opt_cni_bin" / "nsm-cni")

    async def exec_plugin(env: dict[str, str]) -> tuple[int, dict[str, Any]]:
        proc = await asyncio.create_subprocess_exec(plugin, env=env, stdin=asyncio.subprocess.PIPE,
                                                    stdout=asyncio.subprocess.PIPE)
        out, _ = await asyncio.wait_for(proc.communicate(json.dumps(config).encode()), 60)
        return proc.returncode or 0, json.loads(out or b"null")

    status, result = await exec_plugin(plugin_env)  # nothing of the host's environment: the bundle's own
    assert status == 0, f"{result}\n{node.log('cni-agent')}"
    assert [i["name"] for i in result["interfaces"]] == ["nsm-1"]
    ip = result["ips"][0]
    assert ip["version"] == "4"  # 0.3.1's shape
    peer = next(r["dst"] for r in result["routes"]).split("/")[0]
    answered = await asyncio.to_thread(ping, pod, peer, count=3, timeout=1.0)
    assert answered.received == 3, answered

    status, result = await exec_plugin({**plugin_env, "CNI_COMMAND": "DEL"})
    assert status == 0, result
    assert (await node.run(["cni-agent", "--list"], envs["cni-agent"]))[1].strip() == ""

    # Every daemon stops cleanly on SIGTERM (what Kubernetes sends).
    await node.stop()
    for name, proc in node.procs.items():
        assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{node.log(name)}"

    # deploy/uninstall's init container puts the node back as it was.
    uninstall = containers(find(render("uninstall"), "DaemonSet", "nsm-cni-uninstall"))[0]
    status, out = await node.run(uninstall["args"], node.env(uninstall))
    assert status == 0, out
    assert os.listdir(node.root / "opt_cni_bin") == []
    kindnet = Path(__file__).parent / "conflists" / "10-kindnet.conflist"
    assert json.loads((node.root / "etc_cni_net.d" / "10-kindnet.conflist").read_text()) == json.loads(
        kindnet.read_text())
    assert os.listdir(node.root / "etc_cni_net.d") == ["10-kindnet.conflist"]

"""Fixtures for the CNI tests: a two-node lab (:mod:`nsm.lab`) with an ``nsm cni-agent`` on
node1, and conflists chaining Debian's real ``bridge`` + ``host-local`` then ``nsm-cni``,
executed plugin by plugin the way a runtime does it (:class:`nsm.lab.cni.Runtime`, in node1's
namespace).

- ``cni_session`` (one per xdist worker): that lab as a :class:`CniLab`: endpoint ``near`` on
  node1 (service :data:`LOCAL`), ``far`` on node2 (service :data:`REMOTE`), the agent
  (:func:`nsm.lab.cni.start_agent`, state in the lab's work directory, sweeping every 0.3 s).
- ``cni`` (per test): the same lab in a :meth:`~nsm.lab.harness.LabHarness.scope`: pods made
  through it are deleted at the end, then nothing may be left: no connection in any monitor, no
  interface in an endpoint's pod, no attachment in the agent, every daemon running.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from nsm.kernel.netns import run_in_netns
from nsm.lab import EndpointSpec, NodeSpec, ServiceSpec, Topology
from nsm.lab.cni import SYSTEM_CNI_PATH, CniNode, Runtime, start_agent
from nsm.lab.harness import LabHarness

LOCAL = "cni-near"
REMOTE = "cni-far"
LOCAL_CIDR = "172.18.0.0/24"
REMOTE_CIDR = "172.18.1.0/24"
#: The primary network (bridge + host-local) of node1's pods, and its gateway (the bridge).
PRIMARY = "10.123.0.0/16"
GATEWAY = "10.123.0.1"
AGENT = "cni-agent.node1"
NODE = "node1"
TOPOLOGY = Topology(
    nodes=(NodeSpec("node1"), NodeSpec("node2")),
    endpoints=(EndpointSpec("near", "node1", (LOCAL,), LOCAL_CIDR),
               EndpointSpec("far", "node2", (REMOTE,), REMOTE_CIDR)),
    services=(ServiceSpec(LOCAL), ServiceSpec(REMOTE)),
)


class CniLab(LabHarness):
    """The lab, the agent and conflists (see the module docstring)."""

    local, remote, local_cidr, remote_cidr, gateway = LOCAL, REMOTE, LOCAL_CIDR, REMOTE_CIDR, GATEWAY
    primary = PRIMARY

    async def setup(self) -> None:
        assert self.lab.workdir is not None
        self.work = self.lab.workdir
        self.node1 = await start_agent(self.lab, NODE, key=AGENT, name="cni-node1",
                                       extra=["--sweep-interval", "300ms"], log_level="debug")
        self.socket = self.node1.socket

    @property
    def agent(self) -> Any:
        return self.lab.daemon(AGENT)

    def runtime(self, version: str, services: Sequence[str] | None = (f"kernel://{LOCAL}/nsm-1",), *,
                primary: bool = True, **nsm: Any) -> Runtime:
        """A runtime of node1 for a conflist bridge (unless not ``primary``) → nsm-cni."""
        return self.node1.runtime(version, services, primary=PRIMARY if primary else None, **nsm)

    async def another_agent(self, label: str, extra: Sequence[str]) -> CniNode:
        """One more agent on node1 (its own socket, state and name), removed at the end of the
        test."""
        key = self.name(label)
        agent = await start_agent(self.lab, NODE, key=key, name=key, extra=extra, log_level="debug")
        self.stack.push_async_callback(self.lab.remove_daemon, key)
        agent.ipam_dir = self.node1.ipam_dir  # one address pool for node1's bridge
        return agent

    async def container(self, tag: str = "c") -> tuple[str, str]:
        """A fresh pod: (container id, namespace path)."""
        return uuid.uuid4().hex, await self.pod(tag)

    async def attachments(self) -> int:
        return (await self.daemon_status(AGENT))["attachments"]

    async def attachments_zero(self) -> bool:
        return await self.attachments() == 0

    async def adopted(self, links: int) -> bool:
        """The restarted agent holds ``links`` connections and adopts nothing any more."""
        status = await self.daemon_status(AGENT)
        return status["adopting"] == 0 and status["connections"] == links

    @staticmethod
    async def ready(rt: Runtime) -> bool:
        return (await rt.status()).failed is None

    async def manager_knows_its_endpoint(self) -> bool:
        """node1's manager knows its endpoint (after a restart: once it registered again)."""
        return (await self.daemon_status("manager.node1")).get("local_endpoints", 0) >= 1

    async def add_works(self, rt: Runtime) -> bool:
        """An ADD (then DEL) of a fresh pod succeeds."""
        c, ns = await self.container("probe")
        ok = (await rt.add(c, ns)).failed is None
        (await rt.delete(c, ns)).ok()
        return ok

    @staticmethod
    def iface_index(result: dict[str, Any], name: str) -> int:
        return next(i for i, iface in enumerate(result["interfaces"]) if iface["name"] == name)

    @staticmethod
    def address_of(result: dict[str, Any], name: str) -> str:
        """The address the result gives interface ``name``."""
        index = CniLab.iface_index(result, name)
        return next(ip["address"] for ip in result["ips"] if ip.get("interface") == index)

    @staticmethod
    def route_into(result: dict[str, Any], cidr: str) -> str:
        """The destination (an address) of the result's route into ``cidr``."""
        net = ipaddress.ip_network(cidr)
        for route in result.get("routes", []):
            dst = ipaddress.ip_network(route["dst"], strict=False)
            if dst.subnet_of(net):
                return str(dst.network_address)
        raise AssertionError(f"no route into {cidr} in {result.get('routes')}")

    async def leftovers(self, nodes: Sequence[str] | None = None) -> list[str]:
        problems = await super().leftovers(nodes)
        if self.agent.running:
            status = await self.daemon_status(AGENT)
            problems += [f"cni agent: {status['attachments']} attachments"] * bool(status["attachments"])
            problems += [f"cni agent: {status['connections']} connections"] * bool(status["connections"])
        return problems


class FakeKube:
    """A fake Kubernetes API server (pods only: GET, and PATCH with a JSON merge patch of the
    annotations), listening on 127.0.0.1 of a namespace (None: this one), with a kubeconfig
    file for it. ``pods``: ``(namespace, name)`` → annotations; ``patches``: what it was sent."""

    def __init__(self, directory: Path) -> None:
        self.pods: dict[tuple[str, str], dict[str, str]] = {}
        self.patches: list[tuple[str, str, dict[str, Any]]] = []
        self.kubeconfig = directory / f"kubeconfig-{uuid.uuid4().hex[:6]}"
        self._server: ThreadingHTTPServer | None = None

    def start(self, netns: str | None = None) -> FakeKube:
        listener = (run_in_netns(netns, socket.create_server, ("127.0.0.1", 0)) if netns
                    else socket.create_server(("127.0.0.1", 0)))
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _pod(self) -> tuple[str, str] | None:
                parts = self.path.split("?")[0].strip("/").split("/")
                if len(parts) == 6 and parts[:2] == ["api", "v1"] and parts[4] == "pods":
                    return parts[3], parts[5]
                return None

            def _answer(self, key: tuple[str, str] | None) -> None:
                if key is None or key not in fake.pods:
                    body = {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                            "message": f"pods {key} not found", "reason": "NotFound", "code": 404}
                    code = 404
                else:
                    body = {"apiVersion": "v1", "kind": "Pod", "metadata": {
                        "namespace": key[0], "name": key[1], "annotations": fake.pods[key]}}
                    code = 200
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._answer(self._pod())

            def do_PATCH(self) -> None:
                key = self._pod()
                patch = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if key is not None and key in fake.pods:
                    fake.patches.append((*key, patch))
                    for k, v in patch.get("metadata", {}).get("annotations", {}).items():
                        if v is None:
                            fake.pods[key].pop(k, None)
                        else:
                            fake.pods[key][k] = v
                self._answer(key)

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
        server.socket.close()
        server.socket = listener
        server.server_address = listener.getsockname()
        self._server = server
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        self.kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": url}}],
            "users": [{"name": "agent", "user": {"token": "t"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "agent",
                                                      "namespace": "default"}}]}))
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


@pytest.fixture
def fake_kube(tmp_path: Path) -> Iterator[Callable[..., FakeKube]]:
    """``fake_kube(netns=None)``: a started :class:`FakeKube`, stopped after the test."""
    made: list[FakeKube] = []

    def make(netns: str | None = None) -> FakeKube:
        made.append(FakeKube(tmp_path).start(netns))
        return made[-1]

    yield make
    for kube in made:
        kube.stop()


def _runnable() -> str:
    """Why these tests cannot run here ("" when they can)."""
    if os.geteuid() != 0:
        return "CNI tests need root (network namespaces, veth)"
    if not os.access(os.path.join(SYSTEM_CNI_PATH, "bridge"), os.X_OK) or not shutil.which("nsenter"):
        return "CNI tests need containernetworking-plugins (./dev setup) and nsenter"
    return ""


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def cni_session(lab_prefix_base: str) -> AsyncIterator[CniLab]:
    if _runnable():
        pytest.skip(_runnable())
    async with CniLab.running(TOPOLOGY, prefix=f"{lab_prefix_base}_c") as lab:
        yield lab


@pytest_asyncio.fixture(loop_scope="session")
async def cni(cni_session: CniLab) -> AsyncIterator[CniLab]:
    """The session's lab, checked clean after the test (see the module docstring)."""
    for daemon in (cni_session.agent, cni_session.lab.daemon("manager.node1")):
        if not daemon.running:  # a failed test left it stopped: the next ones still run
            await cni_session.lab.start_daemon(daemon)
    async with cni_session.scope():
        yield cni_session

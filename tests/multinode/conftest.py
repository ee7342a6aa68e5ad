"""Fixtures for the multi-node tests: an emulated cluster (:mod:`nsm.lab`) with real traffic, on
the one harness (:class:`nsm.lab.harness.LabHarness`).

- ``cluster_session`` (one per xdist worker, built on first use, ~4 s): the three-node lab
  :data:`TOPOLOGY` (registry on node1; a manager and a forwarder per node; endpoints ``nse-ip``
  (service ``ip``, IP payload), ``nse-eth`` (service ``eth``, ETHERNET) and their IPv6 twins
  ``nse-ip6``/``nse-eth6`` (services ``ip6``/``eth6``) on node2, ``near1`` on node1 and ``near2`` on
  node2 offering ``near`` (prefers the client's own node, then any) and ``rr`` (no matches);
  node3 has none), as a :class:`Cluster` with the helpers the tests use.
- ``cluster`` (per test): the same cluster in a :meth:`~nsm.lab.harness.LabHarness.scope`; the
  pods (namespaces) and SDK clients a test makes through it are removed/closed at the end of the
  test even if it fails, then the whole cluster is checked clean: no ``nsv``/``nsx``/``nsb`` link,
  policy rule or extra routing table on any node, no interface in any endpoint's pod, no
  connection in any daemon's monitor, no daemon stopped.
- ``new_lab``: a dedicated lab for a test that breaks daemons (``async with new_lab(topo) as lab``).
- ``module_lab`` / ``lab``: one dedicated lab per test module of the module's ``LAB_TOPOLOGY``,
  for tests that break daemons but leave the lab whole (each restarts what it kills); ``lab`` is
  it in a per-test :meth:`~nsm.lab.harness.LabHarness.scope` (checked clean like ``cluster``).
- When a test fails, what every daemon logged during it is attached to its report
  (``tests/conftest.py``).

Lab prefixes are the run's (``lab_prefix_base``) plus ``_<tag>``: the root conftest's check at
session end finds whatever of them is left.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import subprocess
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio

from nsm.api.connection_pb2 import Connection
from nsm.client.sdk import Client
from nsm.lab import EndpointSpec, LabNode, MatchSpec, NodeSpec, ServiceSpec, Topology
from nsm.lab.harness import LabHarness

NODES = ("node1", "node2", "node3")
NEAR = ServiceSpec("near", matches=(
    # The client's own node first ...
    MatchSpec(routes=((("nodeName", "{{.nodeName}}"),),), fallthrough=True),
    # ... else any endpoint (an empty destination selector matches every one).
    MatchSpec(routes=((),)),
))
TOPOLOGY = Topology(
    nodes=tuple(NodeSpec(n) for n in NODES),
    endpoints=(
        EndpointSpec("nse-ip", "node2", ("ip",), "172.16.1.0/24"),
        EndpointSpec("nse-eth", "node2", ("eth",), "172.16.2.0/24"),
        EndpointSpec("near1", "node1", ("near", "rr"), "172.16.3.0/24"),
        EndpointSpec("near2", "node2", ("near", "rr"), "172.16.4.0/24"),
        EndpointSpec("nse-ip6", "node2", ("ip6",), "fd00:16::/64"),
        EndpointSpec("nse-eth6", "node2", ("eth6",), "fd00:17::/64"),
    ),
    services=(ServiceSpec("ip"), ServiceSpec("eth", payload="ETHERNET"), NEAR, ServiceSpec("rr"),
              ServiceSpec("ip6"), ServiceSpec("eth6", payload="ETHERNET")),
)


def ns_name(path: str) -> str:
    """The name ``ip -n`` takes for a named namespace path."""
    return os.path.basename(path)


class Cluster(LabHarness):
    """A running lab plus what the multi-node tests share (see the module docstring)."""

    def node(self, name: str) -> LabNode:
        return self.lab.node(name)

    def node_netns(self, name: str) -> str:
        return self.lab.node(name).netns

    def nse_netns(self, name: str) -> str:
        return self.lab.endpoint(name).netns

    def client(self, node: str, service: str, netns: str, *, ifname: str = "nsm-1",
               **kwargs: Any) -> Client:
        """An SDK client of ``node``'s manager, closed at the end of the test."""
        return self.open_client(node, service, netns, ifname=ifname, **kwargs)

    async def connect(self, node: str, service: str, *, tag: str = "p", ifname: str = "nsm-1",
                      **kwargs: Any) -> tuple[Client, Connection, str]:
        """A new pod with a connection from ``node``: (client, connection, pod netns)."""
        pod = await self.pod(tag)
        c = self.client(node, service, pod, ifname=ifname, **kwargs)
        return c, await c.request(), pod

    async def spawn(self, *args: str) -> Any:
        """``python -m nsm.cli ARGS`` (stdout piped), SIGKILLed at the end of the test."""
        return await self.spawn_cli(*args)

    @staticmethod
    def ip_json(netns: str, *args: str) -> Any:
        """``ip -j -n <ns> ARGS`` (assertions only)."""
        out = subprocess.run(["ip", "-j", "-n", ns_name(netns), *args], check=True,
                             capture_output=True, text=True, timeout=10).stdout
        return json.loads(out or "[]")

    def rules_text(self, node: str) -> str:
        """``ip -n <node> rule`` for both families (what an operator would look at)."""
        ns = ns_name(self.node_netns(node))
        return "".join(subprocess.run(["ip", fam, "-n", ns, "rule"], check=True,
                                      capture_output=True, text=True, timeout=10).stdout
                       for fam in ("-4", "-6"))

    def vxlans(self, node: str) -> dict[str, dict[str, Any]]:
        """VXLAN devices of a node: name → ``ip -d`` info data (id, remote, local, port...)."""
        out = {}
        for link in self.ip_json(self.node_netns(node), "-d", "link", "show", "type", "vxlan"):
            out[link["ifname"]] = {**link["linkinfo"]["info_data"], "mtu": link["mtu"]}
        return out


# ---------------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("multi-node tests need root (network namespaces, veth, VXLAN)")


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def cluster_session(lab_prefix_base: str) -> AsyncIterator[Cluster]:
    async with Cluster.running(TOPOLOGY, prefix=f"{lab_prefix_base}_s") as cluster:
        yield cluster


@pytest_asyncio.fixture(loop_scope="session")
async def cluster(cluster_session: Cluster) -> AsyncIterator[Cluster]:
    """The session's cluster; what the test made is removed after it, then the cluster must be
    clean."""
    async with cluster_session.scope():
        yield cluster_session


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def module_lab(request: pytest.FixtureRequest, lab_prefix_base: str) -> AsyncIterator[Cluster]:
    """A lab of the test module's ``LAB_TOPOLOGY`` for all its tests (see the module docstring)."""
    topology = request.module.LAB_TOPOLOGY
    tag = "".join(c for c in request.module.__name__.rsplit("_", 1)[-1] if c.isalnum())[:6]
    async with Cluster.running(topology, prefix=f"{lab_prefix_base}_m{tag}") as cl:
        yield cl


@pytest_asyncio.fixture(loop_scope="session")
async def lab(module_lab: Cluster) -> AsyncIterator[Cluster]:
    """The module's lab; what the test made is removed after it, then the lab must be clean."""
    async with module_lab.scope():
        yield module_lab


@pytest.fixture
def new_lab(lab_prefix_base: str) -> Callable[..., Any]:
    """``async with new_lab(topology, tag="u", **lab_kwargs) as cluster``: a dedicated lab (for a
    test that breaks daemons) as a :class:`Cluster` whose pods and clients go at the end of the
    block; torn down then (its daemons' logs printed if the block raised)."""
    tags = itertools.count(1)

    @contextlib.asynccontextmanager
    async def make(topology: Topology, tag: str = "d", **kwargs: Any) -> AsyncIterator[Cluster]:
        async with Cluster.running(topology, prefix=f"{lab_prefix_base}_{tag}{next(tags)}",
                                   **kwargs) as cl, cl.scope(check=False):
            yield cl

    return make

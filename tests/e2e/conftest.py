"""Fixtures for the end-to-end tests of the single-node mesh: a one-node lab (:mod:`nsm.lab`:
the registry, the manager and the forwarder as real ``nsm`` processes in the node's namespace, on
unix sockets), pods as network namespaces, and endpoints that register straight at the registry
(no manager's proxy on a single node).

- ``mesh_session`` (one per xdist worker): that lab plus a main endpoint (service
  :data:`SERVICE`, CIDR :data:`CIDR`), as a :class:`Mesh` (a :class:`nsm.lab.harness.LabHarness`
  with the single node's conveniences).
- ``mesh`` (per test): the same mesh in a :meth:`~nsm.lab.harness.LabHarness.scope`: everything
  the test makes through it (namespaces, SDK clients, extra endpoints and daemons, CLI
  processes) is removed at the end of the test even when it fails; then no connection may be
  left in any daemon's monitor, no interface in the main endpoint's namespace, no session daemon
  stopped.
- When a test fails, what the daemons logged during it is attached to the report
  (``tests/conftest.py``).

Every e2e test runs in the session's event loop (``loop_scope="session"``), since the mesh's
channels live there. Test modules import nothing from here: everything comes as a fixture.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import pytest
import pytest_asyncio

from nsm.api.connection_pb2 import Connection
from nsm.client.sdk import Client
from nsm.lab import Daemon, Lab, NodeSpec, Topology
from nsm.lab.harness import CliResult, LabHarness, Nse

#: The main endpoint's service and address pool (first pair: .1 endpoint, .2 client).
SERVICE = "e2e-ip"
CIDR = "172.30.0.0/24"
FIRST_PAIR = ("172.30.0.1/32", "172.30.0.2/32")
NODE = "node1"
#: One node; its underlay (unused: every connection is local) apart from the tests' addresses.
TOPOLOGY = Topology(nodes=(NodeSpec(NODE),), subnet="10.254.0.0/24")


class Mesh(LabHarness):
    """The running single-node mesh and the helpers tests use (see the module docstring)."""

    service = SERVICE
    cidr = CIDR
    first_pair = FIRST_PAIR

    def __init__(self, lab: Lab) -> None:
        super().__init__(lab)
        node = lab.node(NODE)
        assert lab.workdir is not None
        self.work = lab.workdir
        self.registry_url = lab.registry_url
        self.manager_url = node.manager_url
        self.forwarder_url = node.forwarder_url
        self.forwarder_name = node.forwarder_name
        self.main: Nse | None = None

    async def setup(self) -> None:
        self.main = await self.start_nse("nse-main", services=[SERVICE], cidr=CIDR, expiry=60.0)

    @property
    def registry(self) -> Daemon:
        return self.lab.daemon("registry")

    @property
    def manager(self) -> Daemon:
        return self.lab.daemon(f"manager.{NODE}")

    @property
    def forwarder(self) -> Daemon:
        return self.lab.daemon(f"forwarder.{NODE}")

    def log_since_mark(self, daemon: Daemon) -> str:
        """What ``daemon`` logged since the test started."""
        return self.daemon_log(daemon)

    async def netns(self, label: str = "nsc") -> str:
        """A fresh pod namespace (path), deleted at the end of the test."""
        return await self.pod(label)

    async def netns_many(self, count: int, label: str = "nsc") -> list[str]:
        return [await self.netns(label) for _ in range(count)]

    def client(self, netns: str, *, service: str | None = None, **kwargs: Any) -> Client:
        """An SDK client for a pod namespace (closed at the end of the test)."""
        return self.open_client(NODE, service or self.service, netns, **kwargs)

    async def start_nse(self, label: str = "nse", *, services: Sequence[str] | None = None,
                        cidr: str = "172.29.0.0/24", labels: Mapping[str, str] | None = None,
                        expiry: float = 30.0, netns: str | None = None, node: str | None = None,
                        registry: str | None = None, extra: Sequence[str] = (),
                        wait: bool = True) -> Nse:
        """One more endpoint process (with its own namespace unless given), registered straight
        at the registry, stopped and unregistered at the end of the test."""
        return await super().start_nse(label, services=services or [self.service], cidr=cidr,
                                       labels=labels, expiry=expiry, netns=netns, node=node,
                                       registry=registry or self.registry_url, extra=extra,
                                       wait=wait)

    async def run_cli_python(self, *args: str, env: Mapping[str, str] | None = None,
                             timeout: float = 30.0) -> CliResult:
        """Run ``python ARGS`` to completion."""
        return await self.run_python(*args, env=env, timeout=timeout)

    async def all_connections(self) -> dict[str, dict[str, Connection]]:
        """Every live daemon's monitor: ``manager``, ``forwarder`` and each endpoint by name."""
        urls = {"manager": self.manager_url, "forwarder": self.forwarder_url}
        urls.update({n.name: n.url for n in self.nses.values() if n.daemon.running})
        snaps = await asyncio.gather(*(self.connections(u) for u in urls.values()))
        return dict(zip(urls, snaps, strict=True))


@pytest.fixture(autouse=True)
def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("e2e tests need root (network namespaces, veth)")


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def mesh_session(lab_prefix_base: str) -> AsyncIterator[Mesh]:
    if os.geteuid() != 0:
        pytest.skip("e2e tests need root (network namespaces, veth)")
    async with Mesh.running(TOPOLOGY, prefix=f"{lab_prefix_base}_e", log_level="debug") as mesh:
        yield mesh


@pytest_asyncio.fixture(loop_scope="session")
async def mesh(mesh_session: Mesh) -> AsyncIterator[Mesh]:
    """The session's mesh, with per-test cleanup and a leak check at the end of the test."""
    async with mesh_session.scope():
        yield mesh_session

"""Every daemon of a lab serves its metrics (``NSM_METRICS_LISTEN``): a connection through a
node shows in the manager's, the forwarder's and the endpoint's Request and Close counts and in
what each holds, a refused Request by its code, the registry its records; a pod's identity may
not read them. Secure (HTTPS, the lab's identity reads) and ``--insecure`` (plain HTTP)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys

import pytest
from prometheus_client.parser import text_string_to_metric_families

from nsm.client.sdk import Client
from nsm.errors import NotFound, NsmError
from nsm.lab import EndpointSpec, Lab, NodeSpec, PodSpec, ServiceSpec, Topology
from nsm.lab.processes import daemon_env
from nsm.metrics import METRICS_PATH
from nsm.transport import http_get

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(90),
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")]

TOPOLOGY = Topology(nodes=[NodeSpec("node1")], pods=[PodSpec("client", "node1")],
                    endpoints=[EndpointSpec("nse", "node1", ("lab-svc",), "172.16.78.0/24")],
                    services=[ServiceSpec("lab-svc")])
ROLES = {"manager.node1": "manager", "forwarder.node1": "forwarder", "nse.nse": "endpoint",
         "registry": "registry"}


async def values(lab: Lab, key: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = await lab.scrape(key)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def requests(got: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> dict[tuple[str, str], float]:
    return {(dict(labels)["method"], dict(labels)["code"]): v for (name, labels), v in got.items()
            if name == "nsm_requests_total"}


def held(got: dict[tuple[str, tuple[tuple[str, str], ...]], float], what: str) -> float:
    return got[("nsm_held", (("what", what),))]


@pytest.mark.parametrize("secure", [True, False], ids=["secure", "insecure"])
async def test_every_daemon_counts_what_it_served_and_holds(prefix: str, secure: bool) -> None:
    async with Lab(TOPOLOGY, prefix=prefix, secure=secure) as lab:
        for key, role in ROLES.items():
            got = await values(lab, key)
            assert next(labels for (name, labels) in got if name == "nsm_info")[1] == ("role", role)
            assert got[("nsm_tasks", ())] > 0
        registry = await values(lab, "registry")
        assert held(registry, "endpoints") == 2  # the endpoint, the forwarder
        assert requests(registry)[("nse.Register", "OK")] >= 2  # (through the manager's proxy)

        client_ns = lab.pod("client").netns
        client = Client(manager_url=lab.node("node1").manager_url, service="lab-svc",
                        netns=client_ns, ifname="nsm-1", security=lab.pod_identity(client_ns))
        try:
            await client.request()
            for key in ("manager.node1", "forwarder.node1", "nse.nse"):
                got = await values(lab, key)
                assert requests(got) == {("Request", "OK"): 1}, key
                assert held(got, "connections") == 1, key
                assert got[("nsm_request_duration_seconds_count", (("method", "Request"),))] == 1
        finally:
            with contextlib.suppress(NsmError):
                await client.close()
        for key in ("manager.node1", "forwarder.node1", "nse.nse"):
            got = await values(lab, key)
            assert requests(got) == {("Request", "OK"): 1, ("Close", "OK"): 1}, key
            assert held(got, "connections") == 0, key

        unknown = Client(manager_url=lab.node("node1").manager_url, service="no-such-svc",
                         netns=client_ns, ifname="nsm-2", security=lab.pod_identity(client_ns))
        with pytest.raises(NotFound):
            await unknown.request()
        assert requests(await values(lab, "manager.node1"))[("Request", "NOT_FOUND")] == 1

        if secure:  # a pod may not read a daemon's metrics
            status, body = await http_get(lab.metrics_url("manager.node1"), METRICS_PATH,
                                          lab.pod_identity(client_ns))
            assert status == 403 and b"may not read this" in body

        # `nsm metrics` as an operator runs it in a daemon's container: its environment (the
        # lab's CA, NSM_METRICS_LISTEN), its own identity of the CA (spiffe://<td>/nsm/metrics)
        env = daemon_env({**lab.daemon_env, "NSM_METRICS_LISTEN": lab.metrics_url("forwarder.node1")})
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "nsm.cli", "metrics", env=env, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()
        assert 'nsm_info{name="node1-fwd",role="forwarder"} 1.0' in out.decode()

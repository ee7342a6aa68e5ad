"""The ``nsm`` command line against the running mesh: ``nsm nsc`` success and failures, every
subcommand's ``--help``, and daemons configured only by ``NSM_*`` environment variables."""

from __future__ import annotations

import asyncio
import re

import pytest

from nsm.api.registry_pb2 import NetworkServiceEndpoint

pytestmark = [pytest.mark.kernel, pytest.mark.asyncio(loop_scope="session")]

LINE = re.compile(r"^connected id=(?P<id>\S+) ifname=(?P<ifname>\S+) src=(?P<src>\S+) "
                  r"dst=(?P<dst>\S+) endpoint=(?P<endpoint>\S+)$")


@pytest.mark.timeout(60)
async def test_nsc_once_prints_the_connection_and_exits_0(mesh) -> None:
    ns = await mesh.netns()
    result = await mesh.run_cli("nsc", "--manager", mesh.manager_url, "--service", mesh.service,
                                "--netns", ns, "--ifname", "nsm-7", "--once")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    m = LINE.match(lines[0])
    assert m, lines[0]
    assert m["ifname"] == "nsm-7"
    assert (m["dst"], m["src"]) == mesh.first_pair
    assert m["endpoint"] == mesh.main.name
    # --once closed it again
    assert await mesh.link_names(ns) == []


@pytest.mark.timeout(60)
async def test_nsc_unknown_service_exits_1_with_the_grpc_code(mesh) -> None:
    ns = await mesh.netns()
    result = await mesh.run_cli("nsc", "--manager", mesh.manager_url, "--service", "nope-nope",
                                "--netns", ns, "--once")
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "NOT_FOUND" in lines[0] and "nope-nope" in lines[0], lines[0]
    assert await mesh.link_names(ns) == []


@pytest.mark.timeout(60)
async def test_nsc_missing_manager_socket_exits_1_clearly(mesh) -> None:
    ns = await mesh.netns()
    missing = f"{mesh.work}/no-manager-here.sock"
    result = await mesh.run_cli("nsc", "--manager", f"unix://{missing}", "--service", mesh.service,
                                "--netns", ns, "--once", "--timeout", "3s")
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "UNAVAILABLE" in lines[0] or "DEADLINE_EXCEEDED" in lines[0], lines[0]
    assert missing in lines[0] or "manager" in lines[0].lower(), lines[0]


@pytest.mark.timeout(60)
async def test_every_command_has_help(mesh) -> None:
    commands = [[], ["registry"], ["manager"], ["forwarder"], ["nse"], ["nsc"], ["demo"]]
    results = await asyncio.gather(*(mesh.run_cli(*c, "--help") for c in commands))
    for cmd, result in zip(commands, results, strict=True):
        assert result.returncode == 0, (cmd, result.stderr)
        assert result.stdout.startswith("usage:"), (cmd, result.stdout[:200])
        assert result.stderr == "", (cmd, result.stderr)
    # Every flag names its environment variable.
    for cmd, result in zip(commands[1:], results[1:], strict=True):
        assert "NSM_" in result.stdout, cmd


@pytest.mark.timeout(60)
async def test_daemons_and_client_configured_only_by_environment(mesh) -> None:
    ns = await mesh.netns("envnse")
    name = mesh.name("envnse")
    url = mesh.sock("envnse")
    await mesh.start_daemon("envnse", ["nse"], url=url, env={
        "NSM_NAME": name, "NSM_SERVICE": "e2e-env", "NSM_CIDR": "10.96.0.0/24",
        "NSM_NETNS": ns, "NSM_LISTEN": url, "NSM_REGISTRY": mesh.registry_url,
        "NSM_LABEL": "via=env,second=yes", "NSM_EXPIRY": "20s", "NSM_NODE": "node1"})
    await mesh.wait_registered(name)
    (nse,) = await mesh.registry_client().find_nse(NetworkServiceEndpoint(name=name))
    assert list(nse.network_service_names) == ["e2e-env"]
    assert dict(nse.network_service_labels["e2e-env"].labels) == {
        "via": "env", "second": "yes", "nodeName": "node1"}
    assert nse.url == url

    pod = await mesh.netns()
    result = await mesh.run_cli("nsc", env={
        "NSM_MANAGER": mesh.manager_url, "NSM_SERVICE": "e2e-env", "NSM_NETNS": pod,
        "NSM_IFNAME": "env-1", "NSM_ONCE": "true"})
    assert result.returncode == 0, result.stderr
    m = LINE.match(result.stdout.strip())
    assert m, result.stdout
    assert (m["ifname"], m["endpoint"], m["src"]) == ("env-1", name, "10.96.0.2/32")
    # A flag on the command line wins over the environment.
    result = await mesh.run_cli("nsc", "--service", "nope-nope", env={
        "NSM_MANAGER": mesh.manager_url, "NSM_SERVICE": "e2e-env", "NSM_NETNS": pod,
        "NSM_ONCE": "1"})
    assert result.returncode == 1 and "NOT_FOUND" in result.stderr, result.stderr
    # A registry configured by the environment only (NSM_LISTEN, NSM_EXPIRY).
    reg_url = mesh.sock("envreg")
    await mesh.start_daemon("envreg", ["registry"], url=reg_url,
                            env={"NSM_LISTEN": reg_url, "NSM_EXPIRY": "5s"})

"""Daemons stop cleanly on SIGTERM: exit 0, their socket files removed, their registrations
gone from the registry; ``nsm nsc`` closes its connection on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from nsm.api.registry_pb2 import NetworkServiceEndpoint
from nsm.client.sdk import Client
from nsm.registry.client import RegistryClient
from nsm.transport import dial
from nsm.wellknown import FORWARDER_SERVICE

pytestmark = [pytest.mark.kernel, pytest.mark.asyncio(loop_scope="session")]


def socket_exists(url: str) -> bool:
    return os.path.exists(url.removeprefix("unix://"))


@pytest.mark.timeout(90)
async def test_daemons_stop_cleanly_on_sigterm(mesh) -> None:
    reg_url, mgr_url, fwd_url, nse_url = (mesh.sock(x) for x in ("lreg", "lmgr", "lfwd", "lnse"))
    node, fwd_name, nse_name = mesh.name("lnode"), mesh.name("lfwd"), mesh.name("lnse")
    nse_ns = await mesh.netns("lnsens")
    registry = await mesh.start_daemon("lreg", ["registry", "--listen", reg_url], url=reg_url)
    manager = await mesh.start_daemon("lmgr", ["manager", "--name", node, "--listen", mgr_url,
                                               "--registry", reg_url], url=mgr_url)
    forwarder = await mesh.start_daemon("lfwd", [
        "forwarder", "--name", fwd_name, "--node", node, "--listen", fwd_url,
        "--manager", mgr_url, "--registry", reg_url], url=fwd_url)
    nse = await mesh.start_daemon("lnse", [
        "nse", "--name", nse_name, "--service", "e2e-life", "--cidr", "10.95.0.0/24",
        "--netns", nse_ns, "--listen", nse_url, "--registry", reg_url, "--node", node], url=nse_url)

    channel = dial(reg_url, mesh.lab.security)
    try:
        reg = RegistryClient(channel, timeout=5)

        async def registered(name: str) -> bool:
            return bool(await reg.find_nse(NetworkServiceEndpoint(name=name)))

        await mesh.eventually(lambda: registered(fwd_name), timeout=10, what="forwarder registered")
        await mesh.eventually(lambda: registered(nse_name), timeout=10, what="endpoint registered")

        # The mini mesh works; its connection is closed before the shutdown.
        pod = await mesh.netns()
        client = Client(manager_url=mgr_url, service="e2e-life", netns=pod,
                        security=mesh.pod_identity(pod))
        try:
            conn = await client.request()
            assert conn.network_service_endpoint_name == nse_name
        finally:
            await client.close(raise_errors=True)

        # Forwarder first: it unregisters, and its socket goes away.
        assert await forwarder.stop() == 0
        assert not socket_exists(fwd_url)
        assert await reg.find_nse(NetworkServiceEndpoint(name=fwd_name)) == []
        assert await reg.find_nse(NetworkServiceEndpoint(network_service_names=[FORWARDER_SERVICE])) == []

        assert await nse.stop() == 0
        assert not socket_exists(nse_url)
        assert await reg.find_nse(NetworkServiceEndpoint(name=nse_name)) == []
    finally:
        await channel.close()

    assert await manager.stop() == 0
    assert not socket_exists(mgr_url)
    assert await registry.stop() == 0
    assert not socket_exists(reg_url)
    for daemon in (registry, manager, forwarder, nse):
        assert daemon.log_path is not None
        text = daemon.log_path.read_text()
        assert "Traceback" not in text, f"{daemon.name} logged a traceback:\n{text[-3000:]}"


@pytest.mark.timeout(60)
async def test_nsc_closes_its_connection_on_sigterm(mesh) -> None:
    ns = await mesh.netns()
    proc = await mesh.spawn_cli("nsc", "--manager", mesh.manager_url, "--service", mesh.service,
                                "--netns", ns, "--name", mesh.name("nsc"))
    assert proc.stdout is not None and proc.stderr is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
    assert line.startswith("connected id="), line
    assert await mesh.link_names(ns) == ["nsm-1"]
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 10) == 0
    err = (await proc.stderr.read()).decode()
    assert "close failed" not in err, err
    assert await mesh.link_names(ns) == []
    assert not any((await mesh.all_connections()).values())

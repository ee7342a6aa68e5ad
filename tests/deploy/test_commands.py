"""The commands the manifests add: ``nsm health`` (exec probes), ``nsm cni-install`` /
``nsm cni-uninstall`` (init containers), as processes; and the plugin at kindnet's 0.3.1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nsm.cni import plugin, spec
from nsm.lab.processes import daemon_env
from nsm.transport import Server

pytestmark = pytest.mark.timeout(60)


def nsm(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nsm.cli", *args], env=daemon_env(env), capture_output=True,
                          text=True, timeout=30)


@pytest.fixture
async def serving(tmp_path: Path) -> AsyncIterator[str]:
    server = Server([f"unix://{tmp_path}/h.sock"])
    await server.start()
    try:
        yield f"unix://{tmp_path}/h.sock"
    finally:
        await server.stop(0)


async def test_health_serving_and_the_default_url(serving: str) -> None:
    import asyncio

    run = await asyncio.to_thread(nsm, "health", "--url", serving, "--insecure")
    assert run.returncode == 0 and "SERVING" in run.stdout, run
    # In a container: NSM_LISTEN is the daemon's, its first URL is the one checked.
    run = await asyncio.to_thread(nsm, "health", env={"NSM_LISTEN": f"{serving},tcp://127.0.0.1:1",
                                                      "NSM_INSECURE": "1"})
    assert run.returncode == 0, run
    run = await asyncio.to_thread(nsm, "health", "--url", serving, "--service", "no.such.Service",
                                  "--insecure")
    assert run.returncode == 1 and "NOT_FOUND" in run.stderr, run


def test_health_failures(tmp_path: Path) -> None:
    run = nsm("health", "--url", f"unix://{tmp_path}/none.sock", "--timeout", "1s", "--insecure")
    assert run.returncode == 1 and "nsm health: unix://" in run.stderr, run
    assert "UNAVAILABLE" in run.stderr
    # A probe never makes a CA of its own (the daemon would not trust it anyway).
    run = nsm("health", "--url", f"unix://{tmp_path}/none.sock", "--ca-dir", f"{tmp_path}/noca")
    assert run.returncode == 1 and "no built-in CA in" in run.stderr, run
    assert not (tmp_path / "noca").exists()
    run = nsm("health")
    assert run.returncode == 2 and "NSM_LISTEN" in run.stderr
    run = nsm("health", "--url", "http://x")
    assert run.returncode == 2 and "unsupported URL" in run.stderr


def test_cni_install_and_uninstall(tmp_path: Path) -> None:
    bin_dir, conf_dir = tmp_path / "bin", tmp_path / "net.d"
    conf_dir.mkdir()
    kindnet = Path(__file__).parent / "conflists" / "10-kindnet.conflist"
    (conf_dir / kindnet.name).write_bytes(kindnet.read_bytes())
    env = {"NSM_BIN_DIR": str(bin_dir), "NSM_CONF_DIR": str(conf_dir), "NSM_SOCKET": "/s.sock",
           "NSM_AGENT_WAIT": "30s"}
    for _ in range(2):  # the second run changes nothing
        run = nsm("cni-install", env=env)
        assert run.returncode == 0, run
    assert "already there" in run.stderr
    conf = json.loads((conf_dir / kindnet.name).read_text())
    assert conf["plugins"][-1] == {"type": "nsm-cni", "socket": "/s.sock", "agentWait": 30}
    # Without a bundle: the compiled fast path in front of a plugin on this interpreter, which
    # answers VERSION.
    assert sorted(os.listdir(bin_dir)) == ["nsm-cni", "nsm-cni-python"]
    out = subprocess.run([str(bin_dir / "nsm-cni")], input="{}", env={"CNI_COMMAND": "VERSION"},
                         capture_output=True, text=True, timeout=30)
    assert json.loads(out.stdout)["supportedVersions"] == list(spec.SUPPORTED)

    run = nsm("cni-uninstall", env=env)
    assert run.returncode == 0 and "nsm-cni removed" in run.stderr, run
    assert os.listdir(bin_dir) == [] and json.loads((conf_dir / kindnet.name).read_text()) == json.loads(
        kindnet.read_text())
    assert nsm("cni-uninstall", env=env).returncode == 0  # idempotent


def test_cni_install_of_a_bundle_with_the_compiled_plugin(tmp_path: Path) -> None:
    """The image's bundle carries the compiled fast path (``shim``): installed as ``nsm-cni``,
    in front of the bundle's launcher (``nsm-cni-python``), which it runs for VERSION."""
    shim = plugin.shim_binary()
    assert shim is not None, "the compiled plugin is not built: run ./dev setup"
    bundle, bin_dir, conf_dir = tmp_path / "bundle", tmp_path / "bin", tmp_path / "net.d"
    python = Path(plugin.write_wrapper(str(tmp_path / "py"), compiled=False))
    bundle.mkdir()
    (bundle / "run").write_text(f"#!/bin/sh\nexec '{python}' \"$@\"\n")
    (bundle / "run").chmod(0o755)
    (bundle / "shim").write_bytes(Path(shim).read_bytes())
    (bundle / "shim").chmod(0o755)
    conf_dir.mkdir()
    (conf_dir / "10-x.conflist").write_text(json.dumps(
        {"cniVersion": "1.0.0", "name": "x", "plugins": [{"type": "bridge"}]}))
    env = {"NSM_BIN_DIR": str(bin_dir), "NSM_CONF_DIR": str(conf_dir), "NSM_RUNTIME": str(bundle)}
    run = nsm("cni-install", env=env)
    assert run.returncode == 0, run
    assert sorted(os.listdir(bin_dir)) == ["nsm-cni", "nsm-cni-python", "nsm-cni.d"]
    assert (bin_dir / "nsm-cni").read_bytes() == Path(shim).read_bytes()
    out = subprocess.run([str(bin_dir / "nsm-cni")], input="{}", env={"CNI_COMMAND": "VERSION"},
                         capture_output=True, text=True, timeout=30)
    assert json.loads(out.stdout)["supportedVersions"] == list(spec.SUPPORTED), out
    assert nsm("cni-uninstall", env=env).returncode == 0
    assert os.listdir(bin_dir) == []


def test_cni_install_bad_input(tmp_path: Path) -> None:
    env = {"NSM_BIN_DIR": str(tmp_path / "bin"), "NSM_CONF_DIR": str(tmp_path / "none")}
    run = nsm("cni-install", "--wait", "1s", env=env)
    assert run.returncode == 1 and "no CNI configuration" in run.stderr, run
    run = nsm("cni-install", "--runtime", str(tmp_path), env=env)
    assert run.returncode == 2 and "not an nsm-cni bundle" in run.stderr, run
    run = nsm("cni-install", env={**env, "NSM_WAIT": "soon"})
    assert run.returncode == 2 and "NSM_WAIT" in run.stderr, run


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1"])
def test_plugin_at_0_3(version: str, tmp_path: Path) -> None:
    """kindnet's list is 0.3.1: VERSION lists it, CHECK is refused as the spec's skel does (code 1),
    and an ADD with no agent waits agentWait, then asks to try again (code 11), at that version."""
    config = {"cniVersion": version, "name": "kindnet", "type": "nsm-cni",
              "socket": str(tmp_path / "agent.sock"), "agentWait": 0.2}
    status, out = plugin.run({"CNI_COMMAND": "VERSION"}, json.dumps(config).encode())
    assert status == 0 and out["cniVersion"] == version and version in out["supportedVersions"]
    env = {"CNI_COMMAND": "CHECK", "CNI_CONTAINERID": "c", "CNI_NETNS": "/proc/self/ns/net",
           "CNI_IFNAME": "eth0"}
    status, out = plugin.run(env, json.dumps(config).encode())
    assert (status, out["code"], out["cniVersion"]) == (1, spec.INCOMPATIBLE_VERSION, version), out
    status, out = plugin.run({**env, "CNI_COMMAND": "ADD"}, json.dumps(config).encode())
    assert (status, out["code"], out["cniVersion"]) == (1, spec.TRY_AGAIN, version), out

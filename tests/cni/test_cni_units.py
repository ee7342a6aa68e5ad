"""The plugin, the wire and the agent's pure parts, without a lab: the plugin against a fake
agent (late, silent, slow, failing), what it imports, the request syntax, the result shapes of
each version, the state directory, GC's keys, and an agent in this process whose manager is
not there."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cni_fakes import FakeAgent  # type: ignore[import-not-found]

from nsm.cni import plugin, spec
from nsm.cni.attachments import Attachment, Link, StateDir, add_result, parse_requests, valid_attachments
from nsm.cni.spec import CniError

pytestmark = pytest.mark.timeout(30)

ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/var/run/netns/x",
       "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin", "HOME": "/root"}


def config(sock: Path, **extra: Any) -> dict[str, Any]:
    return {"cniVersion": "1.0.0", "name": "net", "type": "nsm-cni", "socket": str(sock),
            "services": ["kernel://blue/nsm-1"], "agentWait": 2, "timeout": 2, **extra}


def call(env: dict[str, str], conf: Any) -> tuple[int, Any]:
    out = io.StringIO()
    raw = conf if isinstance(conf, bytes) else json.dumps(conf).encode()
    status = plugin.main(env=env, stdin=io.BytesIO(raw), stdout=out)
    text = out.getvalue().strip()
    return status, json.loads(text) if text else None


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Callable[..., FakeAgent]]:
    made: list[FakeAgent] = []

    def make(answer: Callable[[dict[str, Any]], Any], delay: float = 0.0) -> FakeAgent:
        fake = FakeAgent(tmp_path / "agent.sock", answer, delay).start()
        made.append(fake)
        return fake

    yield make
    for fake in made:
        fake.stop()


def test_the_plugin_imports_nothing_heavy() -> None:
    code = ("import sys, nsm.cni.plugin; print([m for m in sys.modules "
            "if m.split('.')[0] in ('grpc', 'google', 'pyroute2', 'nsm.api')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert out.returncode == 0 and out.stdout.strip() == "[]", out


def test_version_is_answered_without_the_agent(tmp_path: Path) -> None:
    status, out = call({"CNI_COMMAND": "VERSION"}, {"cniVersion": "0.4.0"})
    assert status == 0 and out == {"cniVersion": "0.4.0", "supportedVersions": list(spec.SUPPORTED)}
    status, out = call({"CNI_COMMAND": "VERSION"}, b"")
    assert status == 0 and out["cniVersion"] == spec.LATEST


def test_add_hands_env_and_config_to_the_agent(tmp_path: Path, agent: Any) -> None:
    fake = agent(lambda m: {"result": {"cniVersion": "1.0.0", "interfaces": [{"name": "nsm-1"}]}})
    status, out = call(ENV, config(tmp_path / "agent.sock"))
    assert status == 0 and out["interfaces"] == [{"name": "nsm-1"}]
    sent = fake.messages[0]
    assert sent["env"] == {k: v for k, v in ENV.items() if k.startswith("CNI_")}  # no HOME
    assert sent["config"]["services"] == ["kernel://blue/nsm-1"]


def test_an_agent_error_is_printed_with_the_config_version(tmp_path: Path, agent: Any) -> None:
    agent(lambda m: {"error": {"code": 102, "msg": "no such network service blue"}})
    status, out = call(ENV, config(tmp_path / "agent.sock", cniVersion="0.4.0"))
    assert status == 1
    assert out == {"cniVersion": "0.4.0", "code": 102, "msg": "no such network service blue"}


def test_add_waits_for_a_late_agent(tmp_path: Path, agent: Any) -> None:
    timer = threading.Timer(0.3, lambda: agent(lambda m: {"result": {"cniVersion": "1.0.0"}}))
    timer.start()
    try:
        status, out = call(ENV, config(tmp_path / "agent.sock"))
    finally:
        timer.join()
    assert status == 0 and out == {"cniVersion": "1.0.0"}


@pytest.mark.parametrize("command, code", [("ADD", spec.TRY_AGAIN), ("CHECK", spec.TRY_AGAIN),
                                           ("STATUS", spec.NOT_AVAILABLE), ("GC", spec.TRY_AGAIN),
                                           ("DEL", None)])
def test_no_agent(tmp_path: Path, command: str, code: int | None) -> None:
    t0 = time.monotonic()
    status, out = call({**ENV, "CNI_COMMAND": command},
                       config(tmp_path / "agent.sock", cniVersion="1.1.0", agentWait=0.3))
    elapsed = time.monotonic() - t0
    if code is None:  # DEL never waits and never fails
        assert (status, out) == (0, None) and elapsed < 0.25
    else:
        assert status == 1 and out["code"] == code and 0.3 <= elapsed < 1.5, out


@pytest.mark.parametrize("delay, answer", [(0.0, None), (1.0, {"result": None})],
                         ids=["closes", "too-slow"])
def test_an_agent_that_does_not_answer(tmp_path: Path, agent: Any, delay: float, answer: Any) -> None:
    agent(lambda m: answer, delay)
    status, out = call(ENV, config(tmp_path / "agent.sock", timeout=0.5))
    assert status == 1 and out["code"] == spec.TRY_AGAIN
    status, out = call({**ENV, "CNI_COMMAND": "DEL"}, config(tmp_path / "agent.sock", timeout=0.5))
    assert (status, out) == (0, None)


def test_a_malformed_answer_is_an_io_error(tmp_path: Path, agent: Any) -> None:
    agent(lambda m: ["not", "an", "object"])
    status, out = call(ENV, config(tmp_path / "agent.sock"))
    assert status == 1 and out["code"] == spec.IO_ERROR


@pytest.mark.parametrize("env, conf, code", [
    ({}, {"cniVersion": "1.0.0", "name": "n"}, spec.INVALID_ENV),
    ({**ENV, "CNI_IFNAME": ""}, {"cniVersion": "1.0.0", "name": "n"}, spec.INVALID_ENV),
    (ENV, b"\xff\xfe", spec.DECODE_ERROR),
    (ENV, b"nope", spec.DECODE_ERROR),
    (ENV, {"name": "n"}, spec.INVALID_CONFIG),
    (ENV, {"cniVersion": "1.0.0"}, spec.INVALID_CONFIG),
    (ENV, {"cniVersion": "9.9.9", "name": "n"}, spec.INCOMPATIBLE_VERSION),
    ({**ENV, "CNI_COMMAND": "GC"}, {"cniVersion": "1.0.0", "name": "n"}, spec.INCOMPATIBLE_VERSION),
    (ENV, {"cniVersion": "1.0.0", "name": "n", "agentWait": -1}, spec.INVALID_CONFIG),
    (ENV, {"cniVersion": "1.0.0", "name": "n", "socket": 5}, spec.INVALID_CONFIG),
])
def test_bad_input(env: dict[str, str], conf: Any, code: int) -> None:
    status, out = call(env, conf)
    assert status == 1 and out["code"] == code and out["msg"], out


def test_request_syntax() -> None:
    reqs = parse_requests(["kernel://blue@dom.example/nsm-3?app=web&tier=",
                           "kernel://red, kernel://green/g1"], cni_ifname="eth0", delegate=False)
    assert [(r.service, r.ifname, r.labels) for r in reqs] == [
        ("blue@dom.example", "nsm-3", (("app", "web"), ("tier", ""))),
        ("red", "nsm-2", ()), ("green", "g1", ())]
    assert parse_requests("kernel://red", cni_ifname="net1", delegate=True)[0].ifname == "net1"
    for bad in (["http://x/y"], ["kernel:///nsm-1"], ["kernel://x/a-name-longer-than-15"],
                ["kernel://x/a", "kernel://y/a"], [], "", [3], {"a": 1}, ["kernel://x/a?b"]):
        with pytest.raises(CniError) as err:
            parse_requests(bad, cni_ifname="eth0", delegate=False)
        assert err.value.code == spec.INVALID_CONFIG, bad


@pytest.mark.parametrize("version", spec.VERSIONS)
def test_result_shapes(version: str) -> None:
    prev = {"cniVersion": version, "interfaces": [{"name": "eth0", "sandbox": "/ns"}],
            "ips": [{"address": "10.0.0.2/24", "interface": 0}], "dns": {"nameservers": ["1.1.1.1"]}}
    link = Link(service="blue", ifname="nsm-1", conn_id="x", mac="aa:bb:cc:dd:ee:ff", mtu=1450,
                addresses=["172.16.0.2/32", "fd00::2/128"], routes=[("172.16.0.1/32", None),
                                                                    ("10.9.0.0/16", "172.16.0.1")])
    out = add_result(prev, [link], netns="/ns", version=version)
    assert out["cniVersion"] == version and out["dns"] == prev["dns"]
    assert out["interfaces"][1] == {"name": "nsm-1", "sandbox": "/ns", "mac": "aa:bb:cc:dd:ee:ff",
                                    **({"mtu": 1450} if version == "1.1.0" else {})}
    assert out["ips"][0] == prev["ips"][0]
    ours = out["ips"][1:]
    assert [ip["interface"] for ip in ours] == [1, 1]
    assert [ip.get("version") for ip in ours] == (["4", "6"] if version == "0.4.0" else [None, None])
    assert out["routes"] == [{"dst": "172.16.0.1/32"}, {"dst": "10.9.0.0/16", "gw": "172.16.0.1"}]
    assert prev["interfaces"] == [{"name": "eth0", "sandbox": "/ns"}]  # not modified


def test_state_dir_round_trip(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    state.create()
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    att = Attachment(container_id="c1", cni_ifname="eth0", network="net", netns="/ns",
                     netns_id=(1, 2), cni_version="1.1.0", pod={"K8S_POD_NAME": "p"},
                     links=[Link(service="blue", ifname="nsm-1", conn_id="x", ifindex=7,
                                 routes=[("1.2.3.4/32", None)])])
    state.save(att)
    (tmp_path / "state" / "broken.json").write_text("{")
    (tmp_path / "state" / "x.tmp123").write_text("half")
    found, bad = state.load()
    assert found == [att] and len(bad) == 1
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == [state.file(att.key).name]
    state.remove(att.key)
    state.remove(att.key)
    assert state.load() == ([], [])


def test_gc_keys() -> None:
    assert valid_attachments({"cni.dev/valid-attachments": [{"containerID": "a", "ifname": "eth0"}],
                              "cni.dev/attachments": [{"containerID": "b", "ifname": "eth0"}]}) == {
        ("a", "eth0"), ("b", "eth0")}
    assert valid_attachments({}) == set()
    with pytest.raises(CniError):
        valid_attachments({"cni.dev/attachments": [{"containerID": "a"}]})


async def test_agent_without_its_manager(tmp_path: Path) -> None:
    """STATUS is 50 when the manager is not there; the socket's directory is 0700; LIST works."""
    from nsm.cni.agent import Agent

    sock = tmp_path / "run" / "agent.sock"
    agent = Agent(manager_url=f"unix://{tmp_path}/no-manager.sock", socket=str(sock),
                  state_dir=str(tmp_path / "state"), name="unit")
    async with agent:
        assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
        env = {"CNI_COMMAND": "STATUS"}
        answer = await agent.handle({"env": env, "config": {"cniVersion": "1.1.0", "name": "n"}})
        assert answer["error"]["code"] == spec.NOT_AVAILABLE
        assert await agent.handle({"list": True}) == {"result": []}
        answer = await agent.handle({"env": {**ENV, "CNI_COMMAND": "DEL"},
                                     "config": {"cniVersion": "1.0.0", "name": "n"}})
        assert answer == {"result": None}  # nothing known: nothing to do
        assert (await agent.handle({"env": "x"}))["error"]["code"] == spec.DECODE_ERROR
    assert not sock.exists()


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    root = str(Path(__file__).resolve().parents[2])
    return subprocess.run([sys.executable, "-m", "nsm.cli", "cni-agent", *args], capture_output=True,
                          text=True, timeout=20, env={**os.environ, "PYTHONPATH": root, **(env or {})})


def test_agent_command_line(tmp_path: Path) -> None:
    out = _cli()
    assert out.returncode == 2 and "--manager (or NSM_MANAGER) is required" in out.stderr
    out = _cli("--manager", f"unix://{tmp_path}/m.sock", "--name", "has space",
               "--socket", str(tmp_path / "a.sock"), "--state-dir", str(tmp_path / "s"))
    assert out.returncode == 2 and "agent name" in out.stderr, out
    out = _cli("--list", env={"NSM_SOCKET": str(tmp_path / "none.sock")})
    assert out.returncode == 1 and "did not listen" in out.stderr, out
    assert "NSM_STATE_DIR" in _cli("--help").stdout
    out = _cli("--install-plugin", str(tmp_path / "bin"))  # no --manager: install and exit
    assert out.returncode == 0, out
    wrapper = tmp_path / "bin" / "nsm-cni"
    assert os.access(wrapper, os.X_OK)
    run = subprocess.run([str(wrapper)], input=b"{}", capture_output=True, timeout=20,
                         env={"CNI_COMMAND": "VERSION"})
    assert run.returncode == 0 and json.loads(run.stdout)["supportedVersions"] == list(spec.SUPPORTED)

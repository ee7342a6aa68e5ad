"""The plugin's compiled fast path (``cni/shim/nsm-cni.c``) as a runtime runs it: a process
with the CNI environment and the config on stdin, against a real agent in this process (no
manager: what is checked here is what the plugin and the agent answer, not the mesh; the lab's
CNI tests run the whole chain through the same executable) and against fake agents that fail.

What it must do: answer exactly as the Python plugin does, byte for byte and with the same exit
status, taking the fast path (the Python plugin not run); run the Python plugin for everything
else (VERSION, STATUS, GC, no agent, an agent that says ``fallback``), stdin replayed; and when
the exchange fails half way, have the Python plugin answer for that failure without asking the
agent again."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cni_fakes import FakeAgent  # type: ignore[import-not-found]

from nsm.cni import plugin, spec
from nsm.cni.agent import Agent

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "cni" / "shim" / "nsm-cni.c"
ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/var/run/netns/nowhere",
       "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin", "PATH": os.environ.get("PATH", "/usr/bin")}


def test_the_shim_is_built_from_the_current_source() -> None:
    shim = plugin.shim_binary()
    assert shim is not None, "the compiled plugin is not built: run ./dev setup"
    assert os.stat(shim).st_mtime >= SOURCE.stat().st_mtime, f"{shim} is older than {SOURCE}: run ./dev setup"


@dataclass
class Ran:
    status: int
    stdout: bytes
    stderr: bytes
    #: NSM_CNI_SHIM_FAILED of each run of the Python plugin ("" when unset): the fallbacks.
    fallbacks: list[str]


class Plugins:
    """The executables as installed: the shim as ``nsm-cni`` and, as ``nsm-cni-python``, a
    script that notes each of its runs, then runs the real Python plugin (also run alone:
    :meth:`python`)."""

    def __init__(self, tmp: Path) -> None:
        shim = plugin.shim_binary()
        assert shim is not None, "the compiled plugin is not built: run ./dev setup"
        self.python_only = plugin.write_wrapper(str(tmp / "python"), compiled=False)
        self.notes = tmp / "fallbacks"
        script = (f"#!/bin/sh\necho \"ran:$NSM_CNI_SHIM_FAILED\" >> '{self.notes}'\n"
                  f"exec '{self.python_only}' \"$@\"\n")
        self.shim = plugin.install_executables(str(tmp / "bin"), script, shim=shim)
        assert not os.path.exists(self.python_only + plugin.PYTHON_SUFFIX)

    async def _run(self, exe: str, env: dict[str, str], stdin: bytes) -> Ran:
        with contextlib.suppress(FileNotFoundError):
            self.notes.unlink()
        proc = await asyncio.create_subprocess_exec(
            exe, env=env, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(stdin), 30)
        assert proc.returncode is not None
        notes = self.notes.read_text().splitlines() if self.notes.exists() else []
        return Ran(proc.returncode, out, err, [n.removeprefix("ran:") for n in notes])

    async def shim_run(self, env: dict[str, str], stdin: bytes) -> Ran:
        return await self._run(self.shim, env, stdin)

    async def python(self, env: dict[str, str], stdin: bytes) -> Ran:
        return await self._run(self.python_only, env, stdin)


@pytest.fixture
def plugins(tmp_path: Path) -> Plugins:
    return Plugins(tmp_path)


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[Agent]:
    """A real agent whose manager is not there (no command here reaches the mesh)."""
    sock = tmp_path / "run" / "agent.sock"
    made = Agent(manager_url=f"unix://{tmp_path}/no-manager.sock", socket=str(sock),
                 state_dir=str(tmp_path / "state"), name="shim-test")
    async with made:
        yield made


def skip_if_an_agent_listens_at_the_default() -> None:
    """The fast path asks the default socket when the config names none it can read."""
    if Path(spec.DEFAULT_SOCKET).exists():
        pytest.skip(f"something listens at {spec.DEFAULT_SOCKET} on this machine")


def conf(sock: str | Path, **extra: Any) -> bytes:
    return json.dumps({"cniVersion": "1.0.0", "name": "net", "type": "nsm-cni", "socket": str(sock),
                       "agentWait": 1, "timeout": 5, **extra}).encode()


async def test_the_fast_path_answers_exactly_as_the_python_plugin(plugins: Plugins, agent: Agent) -> None:
    sock = agent.socket_path
    skip_if_an_agent_listens_at_the_default()
    no_ifname = {k: v for k, v in ENV.items() if k != "CNI_IFNAME"}
    cases: list[tuple[str, dict[str, str], bytes, int | None]] = [  # None: an error, any code
        ("DEL of what the agent does not know", {**ENV, "CNI_COMMAND": "DEL"}, conf(sock), 0),
        ("CHECK of what the agent does not know", {**ENV, "CNI_COMMAND": "CHECK"},
         conf(sock, prevResult={"cniVersion": "1.0.0", "interfaces": []}), spec.UNKNOWN_CONTAINER),
        ("stdin that is not JSON", ENV, b'{"cniVersion": "1.0.0", "name": ', spec.DECODE_ERROR),
        ("a config without a name", ENV,
         json.dumps({"cniVersion": "1.0.0", "socket": str(sock)}).encode(), spec.INVALID_CONFIG),
        ("a missing CNI_IFNAME", no_ifname, conf(sock), spec.INVALID_ENV),
        ("CHECK at 0.3.1", {**ENV, "CNI_COMMAND": "CHECK"}, conf(sock, cniVersion="0.3.1"),
         spec.INCOMPATIBLE_VERSION),
        ("an ADD into a namespace that is not there", ENV, conf(sock, services=["kernel://"]),
         spec.INVALID_ENV),
        ("unicode and escapes in the config", ENV,
         conf(sock, services=["kernel://bl\u00fc\"e/nsm-1"], note="\\\n\t"), None),
    ]
    for what, env, stdin, code in cases:
        fast = await plugins.shim_run(env, stdin)
        slow = await plugins.python(env, stdin)
        # What is not JSON names no socket: the default one is asked, where nothing listens
        # here, so the Python plugin answers (the same, as checked next).
        expected = [""] if code == spec.DECODE_ERROR else []
        assert fast.fallbacks == expected, f"{what}: the Python plugin ran ({fast.fallbacks})"
        assert (fast.status, fast.stdout) == (slow.status, slow.stdout), what
        if code == 0:
            assert fast.status == 0 and fast.stdout == b"", what
        else:
            answer = json.loads(fast.stdout)
            assert fast.status == 1 and code in (None, answer["code"]), (what, answer)
            assert answer["cniVersion"] in spec.SUPPORTED and answer["msg"], (what, answer)


async def test_what_the_fast_path_does_not_do_is_the_python_plugins(plugins: Plugins, agent: Agent,
                                                                      tmp_path: Path) -> None:
    sock = agent.socket_path
    # VERSION, STATUS and GC: the Python plugin, stdin replayed to it.
    ran = await plugins.shim_run({**ENV, "CNI_COMMAND": "VERSION"}, conf(sock, cniVersion="0.4.0"))
    assert ran.fallbacks == [""] and ran.status == 0
    assert json.loads(ran.stdout) == spec.version_result("0.4.0")
    ran = await plugins.shim_run({"CNI_COMMAND": "STATUS"}, conf(sock, cniVersion="1.1.0"))
    assert ran.fallbacks == [""] and json.loads(ran.stdout)["code"] == spec.NOT_AVAILABLE  # no manager
    # No agent at the config's socket: DEL succeeds without it, ADD waits agentWait, then 11.
    nowhere = tmp_path / "nowhere.sock"
    ran = await plugins.shim_run({**ENV, "CNI_COMMAND": "DEL"}, conf(nowhere))
    assert ran.fallbacks == [""] and (ran.status, ran.stdout) == (0, b"")
    ran = await plugins.shim_run(ENV, conf(nowhere, agentWait=0.2))
    assert ran.fallbacks == [""] and json.loads(ran.stdout)["code"] == spec.TRY_AGAIN
    # The agent says "fallback" to a config naming another socket than its own.
    other = {"env": base64.b64encode(b"CNI_COMMAND=DEL\0CNI_CONTAINERID=c1\0CNI_IFNAME=eth0\0").decode(),
             "stdin": base64.b64encode(conf(nowhere)).decode(), "shim": 1}
    assert await agent.shim(other) == b"fallback\n"
    assert await agent.shim({**other, "stdin": base64.b64encode(conf(sock)).decode()}) == b"0\n"
    bad = await agent.shim({**other, "env": "not base64!"})
    assert bad.startswith(b"1\n") and json.loads(bad[2:])["code"] == spec.DECODE_ERROR


async def test_a_stdin_too_large_for_the_fast_path_is_the_python_plugins(plugins: Plugins,
                                                                          agent: Agent) -> None:
    """Over ~2.75 MiB of config does not fit the agent's line in base64: the Python plugin
    sends it (as JSON, which fits) and answers as it always does."""
    stdin = conf(agent.socket_path, padding="x" * (3 * 1024 * 1024))
    env = {**ENV, "CNI_COMMAND": "DEL"}
    fast = await plugins.shim_run(env, stdin)
    slow = await plugins.python(env, stdin)
    assert fast.fallbacks == [""] and (fast.status, fast.stdout) == (slow.status, slow.stdout) == (0, b"")


def fake_reply(shim: Callable[[dict[str, Any]], bytes | None]) -> Callable[[dict[str, Any]], Any]:
    """Answers the fast path's messages with ``shim(message)``, the Python plugin's with a
    fixed result."""
    return lambda m: shim(m) if m.get("shim") == 1 else {"result": {"from": "python"}}


@pytest.fixture
def raw_agent(tmp_path: Path) -> Iterator[Callable[..., FakeAgent]]:
    made: list[FakeAgent] = []

    def make(answer: Callable[[dict[str, Any]], bytes | None]) -> FakeAgent:
        made.append(FakeAgent(tmp_path / f"raw{len(made)}.sock", fake_reply(answer)).start())
        return made[-1]

    yield make
    for fake in made:
        fake.stop()


async def test_the_message_carries_the_environment_and_stdin_as_they_are(
        plugins: Plugins, raw_agent: Callable[..., FakeAgent]) -> None:
    fake = raw_agent(lambda m: b'0\n{"printed": true}\n')
    stdin = conf(fake.path, note="\u00e9\u00e8 \\\" \x7f") + b"\n\n"
    env = {**ENV, "CNI_ARGS": "K8S_POD_NAME=p;K8S_POD_NAMESPACE=n", "OTHER": "not sent"}
    ran = await plugins.shim_run(env, stdin)
    assert (ran.status, ran.stdout, ran.fallbacks) == (0, b'{"printed": true}\n', [])
    (message,) = fake.messages
    assert base64.b64decode(message["stdin"]) == stdin
    sent = dict(e.split("=", 1) for e in base64.b64decode(message["env"]).decode().split("\0") if e)
    assert sent == {k: v for k, v in env.items() if k.startswith("CNI_")}
    # Its exit status is the agent's.
    fake.answer = fake_reply(lambda m: b'7\n{"code": 7}\n')
    ran = await plugins.shim_run(env, stdin)
    assert (ran.status, ran.stdout) == (7, b'{"code": 7}\n')


@pytest.mark.parametrize("answer", [None, b"", b"0", b"zero\n{}", b"-1\n", b"999\n"],
                         ids=["closed", "empty", "no line", "not a status", "negative", "too large"])
async def test_an_exchange_that_fails_half_way(plugins: Plugins, raw_agent: Callable[..., FakeAgent],
                                               answer: bytes | None) -> None:
    """The agent got the command but gave no usable answer: the Python plugin answers for that
    failure (ADD: try again, 11, in the config's version; DEL: success), without asking again."""
    fake = raw_agent(lambda m: answer)
    ran = await plugins.shim_run(ENV, conf(fake.path, cniVersion="0.4.0"))
    assert ran.fallbacks == ["closed"] and ran.status == 1
    error = json.loads(ran.stdout)
    assert (error["code"], error["cniVersion"]) == (spec.TRY_AGAIN, "0.4.0"), error
    assert "closed the connection" in error["msg"]
    ran = await plugins.shim_run({**ENV, "CNI_COMMAND": "DEL"}, conf(fake.path))
    assert ran.fallbacks == ["closed"] and (ran.status, ran.stdout) == (0, b"")
    assert b"DEL succeeds" in ran.stderr
    assert [m.get("shim") for m in fake.messages] == [1, 1]  # each asked once, by the shim


async def test_an_agent_that_says_fallback_gets_the_python_plugin(
        plugins: Plugins, raw_agent: Callable[..., FakeAgent]) -> None:
    fake = raw_agent(lambda m: b"fallback\n")
    ran = await plugins.shim_run(ENV, conf(fake.path))
    assert ran.fallbacks == [""] and ran.status == 0
    assert json.loads(ran.stdout) == {"from": "python"}
    assert [m.get("shim") for m in fake.messages] == [1, None]
    assert json.loads(conf(fake.path)) == fake.messages[1]["config"]  # stdin replayed


async def test_an_escaped_socket_path_is_not_guessed(plugins: Plugins, raw_agent: Callable[..., FakeAgent],
                                                     tmp_path: Path) -> None:
    """A socket the shim cannot read plainly (an escape in it) is not guessed at: it asks the
    default socket; with nothing there, the Python plugin (which reads it) asks the right one."""
    fake = raw_agent(lambda m: b"0\n")
    skip_if_an_agent_listens_at_the_default()
    stdin = conf(fake.path).replace(b'"socket": "/', b'"socket": "\\/')
    assert json.loads(stdin)["socket"] == str(fake.path)
    ran = await plugins.shim_run(ENV, stdin)
    assert ran.fallbacks == [""] and json.loads(ran.stdout) == {"from": "python"}
    assert [m.get("shim") for m in fake.messages] == [None]

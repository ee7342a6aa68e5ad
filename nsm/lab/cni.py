"""A container runtime's side of CNI, for tests and benchmarks: a conflist executed plugin by
plugin the way libcni does it, in a node's namespace of the emulated cluster.

- Each plugin is an executable found by its ``type`` in the ``CNI_PATH`` directories, started
  (through ``nsenter --net``) in the node's namespace with the ``CNI_*`` environment and its
  config on stdin: the conflist's ``name`` and ``cniVersion`` plus the plugin's entry, and
  ``prevResult`` (ADD: the previous plugin's result; CHECK and DEL: the cached result of the
  ADD).
- ADD runs the list in order, DEL in reverse (best effort: every plugin runs; DEL's first
  error is returned), CHECK in order; GC and STATUS run every plugin at 1.1.0.
- A plugin whose VERSION does not list the conflist's version runs at the highest version it
  does list (Debian's ``bridge`` 1.1.1 stops at 1.0.0; the 1.0.0 and 1.1.0 results have the
  same shape), and its result is relabelled with the conflist's version.

``nsm-cni`` runs from the wrapper ``nsm cni-agent --install-plugin`` writes, in a directory of
the CNI path (:func:`nsm_cni_dir`), running this process's ``nsm``. :func:`start_agent` starts
an ``nsm cni-agent`` on a lab node and gives its conflists (:class:`CniNode`).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nsm.cni.plugin import write_wrapper
from nsm.lab.builder import Lab

#: Debian's containernetworking-plugins.
SYSTEM_CNI_PATH = "/usr/lib/cni"


@dataclass
class PluginRun:
    """One plugin execution: its exit status, what it printed (parsed when JSON), its stderr
    and how long it took."""

    plugin: str
    command: str
    status: int
    output: Any
    stderr: str
    seconds: float

    @property
    def code(self) -> int | None:
        """The CNI error code of a failure."""
        return self.output.get("code") if self.status and isinstance(self.output, dict) else None


@dataclass
class ListRun:
    """A whole conflist command: the final result (ADD), the first failure, every run."""

    runs: list[PluginRun] = field(default_factory=list)
    result: Any = None

    @property
    def failed(self) -> PluginRun | None:
        return next((r for r in self.runs if r.status != 0), None)

    @property
    def code(self) -> int | None:
        failed = self.failed
        return failed.code if failed is not None else None

    def ok(self) -> Any:
        """The result; AssertionError with the failure otherwise."""
        failed = self.failed
        if failed is not None:
            raise AssertionError(f"{failed.plugin} {failed.command} exited {failed.status}: "
                                 f"{failed.output} {failed.stderr}")
        return self.result


def nsm_cni_dir(directory: str | Path) -> Path:
    """A directory holding an ``nsm-cni`` executable that runs this process's ``nsm``, as
    ``nsm cni-agent --install-plugin`` writes it."""
    write_wrapper(str(directory))
    return Path(directory)


class Runtime:
    """Runs ``conflist`` (a dict) in the namespace ``host_netns`` (a node's; None: this one)
    with plugins from ``cni_path``; caches ADD results for CHECK and DEL like libcni."""

    def __init__(self, conflist: Mapping[str, Any], *, cni_path: Sequence[str | Path],
                 host_netns: str | None = None) -> None:
        self.conflist = dict(conflist)
        self.cni_path = [str(p) for p in cni_path]
        self.host_netns = host_netns
        self.cache: dict[tuple[str, str], Any] = {}
        self._versions: dict[str, list[str]] = {}

    @property
    def version(self) -> str:
        return str(self.conflist["cniVersion"])

    def binary(self, plugin_type: str) -> str:
        for directory in self.cni_path:
            candidate = os.path.join(directory, plugin_type)
            if os.access(candidate, os.X_OK):
                return candidate
        raise AssertionError(f"no CNI plugin {plugin_type!r} in {self.cni_path}")

    async def exec(self, plugin_type: str, command: str, config: Mapping[str, Any] | bytes,
                   env: Mapping[str, str]) -> PluginRun:
        """One plugin execution as a runtime does it."""
        argv = [self.binary(plugin_type)]
        if self.host_netns:
            argv = [shutil.which("nsenter") or "nsenter", f"--net={self.host_netns}", *argv]
        full_env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
                    "CNI_COMMAND": command, "CNI_PATH": os.pathsep.join(self.cni_path), **env}
        stdin = config if isinstance(config, bytes) else json.dumps(config).encode()
        t0 = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            *argv, env=full_env, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate(stdin)
        seconds = time.monotonic() - t0
        text = out.decode(errors="replace").strip()
        try:
            output: Any = json.loads(text) if text else None
        except ValueError:
            output = text
        assert proc.returncode is not None
        return PluginRun(plugin_type, command, proc.returncode, output, err.decode(errors="replace"),
                         seconds)

    async def plugin_version(self, plugin_type: str) -> str:
        """The version ``plugin_type`` runs at for this conflist (see the module)."""
        if plugin_type not in self._versions:
            run = await self.exec(plugin_type, "VERSION", {"cniVersion": self.version}, {})
            supported = (run.output or {}).get("supportedVersions", []) if run.status == 0 else []
            self._versions[plugin_type] = list(supported)
        supported = self._versions[plugin_type]
        if self.version in supported or not supported:
            return self.version
        older = [v for v in supported if _key(v) < _key(self.version)]
        return max(older, key=_key) if older else self.version

    async def _config(self, plugin: Mapping[str, Any], prev: Any, extra: Mapping[str, Any]) -> dict[str, Any]:
        version = await self.plugin_version(plugin["type"])
        config = {"cniVersion": version, "name": self.conflist["name"], **plugin, **extra}
        if prev is not None:
            config["prevResult"] = {**prev, "cniVersion": version}
        return config

    def _env(self, container_id: str, netns: str | None, ifname: str, args: str) -> dict[str, str]:
        env = {"CNI_CONTAINERID": container_id, "CNI_IFNAME": ifname}
        if netns:
            env["CNI_NETNS"] = netns
        if args:
            env["CNI_ARGS"] = args
        return env

    def _relabel(self, output: Any) -> Any:
        return {**output, "cniVersion": self.version} if isinstance(output, dict) else output

    async def add(self, container_id: str, netns: str, ifname: str = "eth0", args: str = "") -> ListRun:
        env = self._env(container_id, netns, ifname, args)
        out = ListRun()
        prev = None
        for plugin in self.conflist["plugins"]:
            run = await self.exec(plugin["type"], "ADD", await self._config(plugin, prev, {}), env)
            out.runs.append(run)
            if run.status != 0:
                return out
            prev = self._relabel(run.output)
        out.result = prev
        self.cache[(container_id, ifname)] = prev
        return out

    async def check(self, container_id: str, netns: str, ifname: str = "eth0", args: str = "", *,
                    only: Sequence[str] | None = None) -> ListRun:
        """CHECK of the list (of the plugins of the types ``only``, when given: Debian's
        ``bridge`` 1.1.1 fails CHECK whenever a later plugin added addresses, since it looks
        for every address of ``prevResult`` on its own interface)."""
        env = self._env(container_id, netns, ifname, args)
        prev = self.cache.get((container_id, ifname))
        out = ListRun()
        for plugin in self.conflist["plugins"]:
            if only is not None and plugin["type"] not in only:
                continue
            run = await self.exec(plugin["type"], "CHECK", await self._config(plugin, prev, {}), env)
            out.runs.append(run)
            if run.status != 0:
                return out
        return out

    async def delete(self, container_id: str, netns: str | None, ifname: str = "eth0",
                     args: str = "", *, prev: bool = True) -> ListRun:
        env = self._env(container_id, netns, ifname, args)
        cached = self.cache.get((container_id, ifname)) if prev else None
        out = ListRun()
        for plugin in reversed(self.conflist["plugins"]):
            out.runs.append(await self.exec(plugin["type"], "DEL",
                                            await self._config(plugin, cached, {}), env))
        if out.failed is None:
            self.cache.pop((container_id, ifname), None)
        return out

    async def _new_commands(self) -> list[Mapping[str, Any]]:
        """The plugins that run STATUS and GC: those at 1.1.0 (libcni skips the others)."""
        return [p for p in self.conflist["plugins"]
                if _key(await self.plugin_version(p["type"])) >= (1, 1, 0)]

    async def status(self) -> ListRun:
        out = ListRun()
        for plugin in await self._new_commands():
            out.runs.append(await self.exec(plugin["type"], "STATUS",
                                            await self._config(plugin, None, {}), {}))
        return out

    async def gc(self, valid: Sequence[tuple[str, str]], *, keys: Sequence[str] = (
            "cni.dev/valid-attachments", "cni.dev/attachments")) -> ListRun:
        attachments = [{"containerID": c, "ifname": i} for c, i in valid]
        out = ListRun()
        for plugin in await self._new_commands():
            extra = {key: attachments for key in keys}
            out.runs.append(await self.exec(plugin["type"], "GC",
                                            await self._config(plugin, None, extra), {}))
        return out


def _key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


@dataclass
class CniNode:
    """An ``nsm cni-agent`` on a lab node and what a conflist for it needs (:func:`start_agent`)."""

    key: str
    node: str
    socket: str
    state_dir: str
    health: str
    cni_path: list[str]
    ipam_dir: str
    host_netns: str
    args: list[str]

    def conflist(self, version: str, services: Sequence[str] | None, *, primary: str | None = None,
                 name: str = "podnet", **nsm: Any) -> dict[str, Any]:
        """``bridge`` (``cni0``, gateway, ``host-local`` IPAM of ``primary``) when ``primary`` is
        a subnet, then ``nsm-cni`` for this agent asking for ``services`` (none: no key)."""
        plugins: list[dict[str, Any]] = []
        if primary:
            plugins.append({"type": "bridge", "bridge": "cni0", "isGateway": True,
                            "ipam": {"type": "host-local", "subnet": primary,
                                     "dataDir": self.ipam_dir}})
        entry: dict[str, Any] = {"type": "nsm-cni", "socket": self.socket, "agentWait": 5, **nsm}
        if services is not None:
            entry["services"] = list(services)
        plugins.append(entry)
        return {"cniVersion": version, "name": name, "plugins": plugins}

    def runtime(self, version: str, services: Sequence[str] | None, *, primary: str | None = None,
                **nsm: Any) -> Runtime:
        return Runtime(self.conflist(version, services, primary=primary, **nsm),
                       cni_path=self.cni_path, host_netns=self.host_netns)


async def start_agent(lab: Lab, node: str, *, key: str, name: str, extra: Sequence[str] = (),
                      log_level: str = "info") -> CniNode:
    """Start ``nsm cni-agent`` (daemon ``key``, path segment name ``name``) on ``node`` of a
    running lab, its socket, state and IPAM directories in the lab's work directory."""
    assert lab.workdir is not None
    work = lab.workdir / key
    work.mkdir(parents=True, exist_ok=True)
    health = f"unix://{work}/health.sock"
    sock, state = str(work / "run" / "agent.sock"), str(work / "state")
    expect = lab.manager_id(node)
    args = ["cni-agent", "--manager", lab.node(node).manager_url, "--socket", sock,
            "--state-dir", state, "--listen", health, "--name", name, "--log-level", log_level,
            *(["--manager-id", expect] if expect else []), *extra]
    await lab.add_daemon(key, args, url=health, node=node)
    cni_path = [str(nsm_cni_dir(lab.workdir / "cni-bin")), SYSTEM_CNI_PATH]
    return CniNode(key=key, node=node, socket=sock, state_dir=state, health=health, cni_path=cni_path,
                   ipam_dir=str(work / "ipam"), host_netns=lab.node(node).netns, args=args)

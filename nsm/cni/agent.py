"""``nsm cni-agent``: the node agent behind the ``nsm-cni`` plugin. It does the work of every
CNI command and holds each pod's NSM connections for the pod's lifetime.

    nsm cni-agent --manager unix:///run/nsm/nsm.sock --socket /run/nsm/cni/agent.sock \\
        --state-dir /var/lib/nsm/cni --name cni-node1

**Why a role of its own, not part of the manager.** The agent is a *client* of the mesh (it runs
the client chain: refresh, heal, adoption by stable ids), the manager a *hop*; merged, a manager
restart would also restart every pod's client side, and an agent bug would take the node's
mesh down. Apart, each restarts without touching the other: the manager keeps no state, the
agent keeps its attachments on disk and adopts its live connections back, and the kernel keeps
carrying the traffic meanwhile. It also runs with what a CNI plugin needs (the pods'
namespaces, the runtime's socket directory), which the manager does not.

What it holds: one :class:`~nsm.client.chain.Connections` (one channel to the node's manager;
every connection refreshed and healed) and per attachment (container id, ``CNI_IFNAME``) its
links, one connection each (:mod:`nsm.cni.attachments`), written to ``--state-dir``.

Commands (from the plugin over ``--socket``, directory mode 0700; :mod:`nsm.cni.spec`):

- ADD: the config's ``services`` and, with ``--kubernetes``, the pod's ``networkservicemesh.io``
  annotation (:mod:`nsm.cni.k8s`; the pod's network-status annotation is written after ADD and
  removed at DEL); nothing asked for: ``prevResult`` passes through unchanged. Requests are
  ``kernel://<service>[@domain]/<ifname>[?label=value&...]`` (a list, each may be
  comma-separated); an interface name already in the pod is refused; each
  connection is requested with a stable id; a failure closes what this ADD made. The result is
  ``prevResult`` with the new interfaces (``sandbox``), addresses and routes appended. Without
  ``prevResult`` (a Multus delegate, not chained) a single request without an interface name
  gets ``CNI_IFNAME``.
- DEL: closes the attachment's connections; idempotent; works without ``prevResult``, without
  ``CNI_NETNS`` and with the namespace gone (then the kernel already removed the pod's ends).
- CHECK: every link's interface is there with the index it had, and its connection is held.
- STATUS: 0 when the manager answers, else 50.
- GC: removes the network's attachments not in ``cni.dev/valid-attachments`` (or
  ``cni.dev/attachments``).
- LIST (ours, ``nsm cni-agent --list``): the attachments with their links' states.

**Restart**: stopping (SIGTERM) closes nothing: the pods keep their interfaces and the hops
their connections until they expire. At start every attachment written down is taken back:
its connections are adopted by id (:meth:`~nsm.client.chain.Connections.adopt`: refreshed on
their own path when the manager has them and the interface is still there with the same
index; no kernel change) or requested again; an attachment whose namespace is gone is removed.
A sweep every ``--sweep-interval`` removes attachments whose namespace disappeared.

``--install-plugin DIR`` writes the ``nsm-cni`` executable into the runtime's CNI directory
(:func:`nsm.cni.plugin.write_wrapper`). On SIGUSR1 it logs a ``status`` line (attachments,
links, connections, adoptions, tasks).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import json
import os
import re
import socket
import stat
import sys
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nsm import log as nsm_log
from nsm.api.connection_pb2 import Connection
from nsm.client.chain import Connections, new_request
from nsm.client.connect import DEFAULT_TIMEOUT
from nsm.client.heal import HealOptions, KernelProbe, Verdict
from nsm.client.main import heal_flags, heal_options
from nsm.client.notify import State, StateChange
from nsm.cni import plugin, spec, wirejson
from nsm.cni.attachments import (
    Attachment,
    Link,
    ServiceRequest,
    StateDir,
    add_result,
    connection_id,
    parse_requests,
    valid_attachments,
)
from nsm.cni.spec import CniError

if TYPE_CHECKING:
    from nsm.cni.k8s import PodApi
from nsm.config import duration, fail, flag, log_flags
from nsm.daemon import serve_until_signal
from nsm.elements.updatepath import DEFAULT_LIFETIME
from nsm.errors import (
    AlreadyExists,
    DeadlineExceeded,
    EndpointUnreachable,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    NsmError,
    PermissionDenied,
    Unavailable,
)
from nsm.kernel.netlink import Netlink
from nsm.kernel.netns import netns_id
from nsm.log import get_logger
from nsm.mechanisms import kernel, netns_url
from nsm.metrics import Metrics, add_metrics_flags, serving_metrics
from nsm.names import check_name
from nsm.retry import Backoff
from nsm.security.ids import CNI_AGENT, node_id
from nsm.security.options import add_security_flags, security_from_args
from nsm.security.tls import Security
from nsm.transport import Server

log = get_logger("nsm.cni")

PROG = "nsm cni-agent"
DEFAULT_STATE_DIR = "/var/lib/nsm/cni"
DEFAULT_NAME = "nsm-cni"
DEFAULT_SWEEP = 2.0
#: How long STATUS waits for the manager's answer.
STATUS_TIMEOUT = 3.0


def cni_error(exc: NsmError, what: str) -> CniError:
    """The CNI error of a failed Request (``what``: which request), for a cluster operator."""
    message = f"{what}: {exc.message}"
    if isinstance(exc, AlreadyExists):
        return CniError(spec.IFACE_EXISTS, message)
    if isinstance(exc, NotFound):
        return CniError(spec.SERVICE_NOT_FOUND, message, "is the network service registered?")
    if isinstance(exc, EndpointUnreachable):
        return CniError(spec.NO_ENDPOINT, message)
    if isinstance(exc, Unavailable | DeadlineExceeded):
        return CniError(spec.TRY_AGAIN, message, "the node's manager or a hop did not answer")
    if isinstance(exc, InvalidArgument):
        return CniError(spec.INVALID_CONFIG, message)
    if isinstance(exc, PermissionDenied | FailedPrecondition):
        return CniError(spec.REFUSED, message)
    return CniError(spec.PLUGIN_ERROR, message, exc.code.name)


class PodProbe:
    """The data-plane check of the agent's connections: the client chain's own
    (:class:`~nsm.client.heal.KernelProbe`), except for a pod whose namespace is gone: there is
    nothing to heal then (a reselect would race the removal), so it cannot tell, and the agent
    removes the attachment at once."""

    def __init__(self, agent: Agent) -> None:
        self._agent = agent
        self._inner = KernelProbe()

    async def __call__(self, conn: Connection, timeout: float) -> Verdict:
        att = self._agent.owner(conn.id)
        if att is not None and self._agent.gone(att):
            self._agent.sweep_now()
            return Verdict(None, "the pod's namespace is gone")
        return await self._inner(conn, timeout)

    async def close(self) -> None:
        await self._inner.close()


class Agent:
    """``async with Agent(manager_url=..., socket=..., state_dir=...) as agent:`` (see module)."""

    def __init__(self, *, manager_url: str, socket: str = spec.DEFAULT_SOCKET,
                 state_dir: str = DEFAULT_STATE_DIR, name: str = DEFAULT_NAME,
                 listen: list[str] | None = None, lifetime: float = DEFAULT_LIFETIME,
                 request_timeout: float = DEFAULT_TIMEOUT, heal: HealOptions | None = HealOptions(),
                 sweep_interval: float = DEFAULT_SWEEP, kubernetes: PodApi | None = None,
                 security: Security | None = None, manager_id: str | None = None) -> None:
        self.security = security or Security.insecure()
        self.name = check_name(name, "agent name")
        self.socket_path = Path(socket)
        self.state = StateDir(state_dir)
        self.listen = list(listen or [])
        self.sweep_interval = sweep_interval
        #: The pods' annotations (None: the Kubernetes API is not used).
        self.kubernetes = kubernetes
        if heal is not None and heal.liveness:
            heal = dataclasses.replace(heal, probe=PodProbe(self))
        self.conns = Connections(manager_url=manager_url, name=self.name, lifetime=lifetime,
                                 request_timeout=request_timeout, on_change=self._changed, heal=heal,
                                 security=self.security, manager_id=manager_id)
        self.netlink = Netlink()
        self.attachments: dict[tuple[str, str], Attachment] = {}
        self._locks: dict[tuple[str, str], tuple[asyncio.Lock, list[int]]] = {}
        self._by_conn: dict[str, tuple[Attachment, Link]] = {}
        self._sweep_now = asyncio.Event()
        self._adopting: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None
        self._health: Server | None = None
        self._sweeper: asyncio.Task[None] | None = None

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        await self.security.start()
        self.state.create()
        found, bad = self.state.load()
        for problem in bad:
            log.warning("unreadable attachment state removed", problem=problem)
        for att in found:
            self._hold(att)
        self.socket_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.socket_path.parent, 0o700)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(self.socket_path.stat().st_mode):
                self.socket_path.unlink()  # a dead agent's: this one takes over
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.socket_path),
                                                       limit=spec.MAX_MESSAGE)
        os.chmod(self.socket_path, 0o600)
        for att in found:
            self._adopting[att.key] = self._spawn(self._take_back(att))
        self._sweeper = self._spawn(self._sweep())
        if self.listen:
            self._health = Server(self.listen, security=self.security)
            await self._health.start()
        log.info("cni agent serving", socket=str(self.socket_path), manager=self.conns.manager_url,
                 attachments=len(found))

    async def stop(self) -> None:
        """Stop serving; every pod keeps its interfaces (nothing is closed: see the module)."""
        if self._health is not None:
            await self._health.stop()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.conns.shutdown(close=False)
        await self.netlink.close()
        if self.kubernetes is not None:
            await self.kubernetes.close()

    async def __aenter__(self) -> Agent:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def status(self) -> dict[str, int]:
        return {"attachments": len(self.attachments),
                "links": sum(len(a.links) for a in self.attachments.values()),
                "connections": len(self.conns.ids()), "adopting": len(self._adopting)}

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @contextlib.asynccontextmanager
    async def _locked(self, key: tuple[str, str]) -> AsyncIterator[None]:
        """One command at a time per attachment (the lock goes when nobody holds or waits)."""
        entry = self._locks.setdefault(key, (asyncio.Lock(), [0]))
        entry[1][0] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1][0] -= 1
            if not entry[1][0]:
                del self._locks[key]

    def _hold(self, att: Attachment) -> None:
        self.attachments[att.key] = att
        for link in att.links:
            self._by_conn[link.conn_id] = (att, link)

    def _drop(self, att: Attachment) -> None:
        self.attachments.pop(att.key, None)
        for link in att.links:
            self._by_conn.pop(link.conn_id, None)
        self.state.remove(att.key)

    def _changed(self, change: StateChange) -> None:
        held = self._by_conn.get(change.conn_id)
        if held is None:
            return
        att, link = held
        link.state = change.state.value
        if change.state is State.HEALED and change.connection is not None:
            self._spawn(self._relearn(att, link, change.connection))

    async def _relearn(self, att: Attachment, link: Link, conn: Connection) -> None:
        """A healed connection may have a new interface and addresses: hold those."""
        async with self._locked(att.key):
            if self.attachments.get(att.key) is att and link in att.links:
                with contextlib.suppress(NsmError):
                    await self._learn(att, link, conn)
                self.state.save(att)

    def owner(self, conn_id: str) -> Attachment | None:
        """The attachment of a connection of ours."""
        held = self._by_conn.get(conn_id)
        return held[0] if held is not None else None

    def sweep_now(self) -> None:
        self._sweep_now.set()

    # -- the socket -----------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                line = await reader.readline()
                message = json.loads(line)
                if not isinstance(message, dict):
                    raise ValueError("not an object")
            except (ValueError, asyncio.LimitOverrunError) as exc:
                answer: dict[str, Any] = {"error": CniError(spec.DECODE_ERROR, "the plugin sent a "
                                                            "malformed message", str(exc)).to_json()}
            else:
                if message.get("shim") == 1:  # the compiled fast path: its own answer's form
                    writer.write(await self.shim(message))
                    await writer.drain()
                    return
                answer = await self.handle(message)
            writer.write(spec.encode(answer))
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def handle(self, message: Mapping[str, Any]) -> dict[str, Any]:
        """One plugin message → the answer (``{"result": ...}`` or ``{"error": ...}``)."""
        try:
            if message.get("list"):
                return {"result": [a.summary() for a in self.attachments.values()]}
            env = message.get("env")
            config = message.get("config")
            if not isinstance(env, dict) or not isinstance(config, dict):
                raise CniError(spec.DECODE_ERROR, "the plugin's message has no env or config")
            command = spec.check_env(env)
            config = spec.parse_config(json.dumps(config), command)
            result = await self.command(command, env, config)
            return {"result": result}
        except CniError as exc:
            log.info("cni command failed", code=exc.code, error=exc.msg)
            return {"error": exc.to_json()}
        except NsmError as exc:
            return {"error": cni_error(exc, "the mesh").to_json()}
        except Exception as exc:  # a bug must still answer the plugin
            log.error("cni command crashed", error=repr(exc), exc_info=True)
            return {"error": CniError(spec.PLUGIN_ERROR, f"the NSM node agent failed: {exc!r}").to_json()}

    async def shim(self, message: Mapping[str, Any]) -> bytes:
        """A command from the compiled plugin (``cni/shim/nsm-cni.c``), which sends the
        environment and stdin as they are: checked and answered here as the Python plugin
        would (:func:`nsm.cni.plugin.prepare`, the same version in errors, the same timeout;
        DEL succeeds when it takes longer), framed ``"<exit status>\n<stdout>"``; or
        ``"fallback\n"`` (the plugin runs in its place) for what the fast path does not do:
        another agent's socket named in the config, a command other than ADD, DEL or CHECK."""
        try:
            env_raw = base64.b64decode(str(message.get("env", "")), validate=True)
            raw = base64.b64decode(str(message.get("stdin", "")), validate=True)
            env = dict(item.split("=", 1) for item in env_raw.decode().split("\0") if "=" in item)
        except (ValueError, UnicodeDecodeError) as exc:
            error = CniError(spec.DECODE_ERROR, "the plugin sent a malformed message", str(exc))
            return _framed(1, error.to_json())
        version = plugin.version_of(raw)
        try:
            command, config, path, _, timeout = plugin.prepare(env, raw)
        except CniError as exc:
            return _framed(1, exc.to_json(version))
        if command not in ("ADD", "DEL", "CHECK") or path != str(self.socket_path):
            return b"fallback\n"
        work = asyncio.ensure_future(self.handle({"env": plugin.cni_env(env), "config": config}))
        try:
            answer = await asyncio.wait_for(asyncio.shield(work), timeout)
        except TimeoutError:  # it goes on, as when the Python plugin stops waiting
            self._tasks.add(work)
            work.add_done_callback(self._tasks.discard)
            if command == "DEL":
                log.warning("cni DEL took longer than the plugin waits; it succeeds meanwhile",
                            timeout=timeout)
                return _framed(0, None)
            error = CniError(spec.TRY_AGAIN, "the NSM node agent did not answer in time", f"at {path}")
            return _framed(1, error.to_json(version))
        if "error" in answer:
            return _framed(1, CniError.from_json(answer["error"]).to_json(version))
        return _framed(0, answer.get("result"))

    async def command(self, command: str, env: Mapping[str, str],
                      config: Mapping[str, Any]) -> Any:
        if command == "VERSION":
            return spec.version_result(config.get("cniVersion"))
        if command == "STATUS":
            return await self.ready()
        if command == "GC":
            return await self.gc(config)
        key = (env["CNI_CONTAINERID"], env["CNI_IFNAME"])
        async with self._locked(key):
            if command == "ADD":
                return await self.add(key, env, config)
            if command == "DEL":
                return await self.delete(key)
            return await self.check(key, config.get("prevResult"))

    # -- the commands ---------------------------------------------------------------------

    async def add(self, key: tuple[str, str], env: Mapping[str, str],
                  config: Mapping[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        netns = env["CNI_NETNS"]
        try:
            ident = netns_id(netns)
        except NsmError:
            raise CniError(spec.INVALID_ENV, f"CNI_NETNS {netns} does not exist") from None
        prev = config.get("prevResult")
        if prev is not None and not isinstance(prev, dict):
            raise CniError(spec.INVALID_CONFIG, "prevResult must be an object")
        args = spec.cni_args(env)
        pod = {k: v for k, v in args.items() if k.startswith("K8S_POD_")}
        wanted = config.get("services")
        annotation = await self._annotation(pod)
        if wanted is None and not annotation:
            if prev is None:
                raise CniError(spec.INVALID_CONFIG, "nothing requested: the config has no services "
                                                    "and the pod no networkservicemesh.io annotation")
            return add_result(prev, [], netns=netns, version=str(config["cniVersion"]))
        texts: list[Any] = []
        if wanted is not None:
            texts += wanted if isinstance(wanted, list) else [wanted]
        if annotation:
            texts.append(annotation)
        requests = parse_requests(texts, cni_ifname=key[1], delegate=prev is None)
        if key in self.attachments:  # a second ADD without DEL: start afresh
            await self._remove(self.attachments[key], "ADD again")
        att = Attachment(container_id=key[0], cni_ifname=key[1], network=str(config["name"]),
                         netns=netns, netns_id=ident, cni_version=str(config["cniVersion"]), pod=pod)
        self._hold(att)
        setup = 0.0  # the time the mesh took, for the log line (benchmarks subtract it)
        try:
            for req in requests:
                setup += await self._connect(att, req)
                self.state.save(att)
        except BaseException:
            await self._remove(att, "ADD failed")
            raise
        await self._report(att, att.links)
        log.info("attached", container=key[0], ifname=key[1], links=len(att.links),
                 setup_ms=round(setup * 1e3, 2), agent_ms=round((time.perf_counter() - started) * 1e3, 2))
        return add_result(prev, att.links, netns=netns, version=att.cni_version)

    @staticmethod
    def _pod(pod: Mapping[str, str]) -> tuple[str, str] | None:
        namespace, name = pod.get("K8S_POD_NAMESPACE"), pod.get("K8S_POD_NAME")
        return (namespace, name) if namespace and name else None

    async def _annotation(self, pod: Mapping[str, str]) -> str | None:
        """The pod's request annotation, when the API is used and the runtime named the pod."""
        where = self._pod(pod)
        if self.kubernetes is None or where is None:
            return None
        try:
            return await self.kubernetes.requested(*where)
        except NotFound as exc:
            raise CniError(spec.K8S_ERROR, exc.message) from None
        except NsmError as exc:
            raise CniError(spec.TRY_AGAIN, exc.message) from None

    async def _report(self, att: Attachment, links: list[Link] | None) -> None:
        """The pod's network-status annotation (best effort: a pod being deleted is gone)."""
        where = self._pod(att.pod)
        if self.kubernetes is None or where is None:
            return
        try:
            await self.kubernetes.report(*where, links)
        except NsmError as exc:
            if links is not None or not isinstance(exc, NotFound):
                log.warning("cannot write the pod's network-status annotation", pod="/".join(where),
                            error=exc.message)

    async def _connect(self, att: Attachment, req: ServiceRequest) -> float:
        """The link of ``req``, added to ``att`` once its connection is up (so that undoing
        closes it); how long its Request took."""
        if await self.netlink.index(att.netns, req.ifname) is not None:
            raise CniError(spec.IFACE_EXISTS, f"interface {req.ifname} already exists in the pod",
                           f"requested by {req.url}")
        link = Link(service=req.service, ifname=req.ifname, labels=dict(req.labels), url=req.url,
                    conn_id=connection_id(self.name, att.container_id, att.cni_ifname, req.ifname))
        self._by_conn[link.conn_id] = (att, link)
        t0 = time.perf_counter()
        try:
            conn = await self.conns.request(self._request(att, link))
        except NsmError as exc:
            self._by_conn.pop(link.conn_id, None)
            raise cni_error(exc, f"network service {req.service} for {req.ifname}") from None
        seconds = time.perf_counter() - t0
        att.links.append(link)
        await self._learn(att, link, conn)
        return seconds

    def _request(self, att: Attachment, link: Link) -> Any:
        return new_request(service=link.service, name=self.name, labels=link.labels,
                           lifetime=self.conns.lifetime, conn_id=link.conn_id,
                           mechanisms=[kernel(link.ifname, netns_url(att.netns))])

    async def _learn(self, att: Attachment, link: Link, conn: Any) -> None:
        ip = conn.context.ip_context
        link.addresses = list(ip.src_ip_addrs)
        link.routes = [(r.prefix, r.nextHop or None) for r in ip.src_routes]
        info = await self.netlink.link(att.netns, link.ifname)
        if info is not None:
            if link.ifindex is not None and link.ifindex != info.index:
                log.warning("interface index changed", ifname=link.ifname, before=link.ifindex,
                            now=info.index, container=att.container_id)
            link.ifindex, link.mac, link.mtu = info.index, info.mac, info.mtu

    async def delete(self, key: tuple[str, str]) -> None:
        att = self.attachments.get(key)
        if att is not None:
            await self._remove(att, "DEL")
        return None

    async def _remove(self, att: Attachment, why: str) -> None:
        """Close every connection of ``att`` (best effort) and forget it."""
        task = self._adopting.pop(att.key, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        for link in att.links:
            await self._close(att, link)
        self._drop(att)
        if why != "ADD failed":
            await self._report(att, None)
        log.info("detached", container=att.container_id, ifname=att.cni_ifname, why=why)

    async def _close(self, att: Attachment, link: Link) -> None:
        try:
            if self.conns.connection(link.conn_id) is None:
                # Not held (an adoption that never happened): take it over first, if the manager
                # still has it, so that Close goes along its path.
                await self.conns.adopt(self._request(att, link))
            await self.conns.close(link.conn_id)
        except NsmError as exc:
            log.warning("close failed (the hops release it at expiry)", conn=link.conn_id,
                        code=exc.code.name, error=exc.message)

    async def check(self, key: tuple[str, str], prev: Any) -> None:
        """Every link's interface is in the pod, as ``prev`` (the runtime's result of the ADD)
        recorded it (its MAC) and as this agent holds it (its index), and its connection is
        held."""
        att = self.attachments.get(key)
        if att is None:
            raise CniError(spec.UNKNOWN_CONTAINER, f"no NSM attachment for container {key[0]} "
                                                   f"interface {key[1]}")
        interfaces = prev.get("interfaces") if isinstance(prev, dict) else None
        recorded = {i.get("name"): i.get("mac") for i in interfaces or []
                    if isinstance(i, dict) and i.get("sandbox") == att.netns}
        for link in att.links:
            info = await self.netlink.link(att.netns, link.ifname)
            if info is None:
                raise CniError(spec.IFACE_CHANGED, f"interface {link.ifname} of network service "
                                                   f"{link.service} is missing from the pod")
            mac = recorded.get(link.ifname)
            if mac and info.mac and mac.lower() != info.mac.lower():
                raise CniError(spec.IFACE_CHANGED, f"interface {link.ifname} is not the one ADD made "
                                                   f"(MAC {info.mac}, was {mac})")
            if link.ifindex is not None and info.index != link.ifindex:
                raise CniError(spec.IFACE_CHANGED, f"interface {link.ifname} was replaced (index "
                                                   f"{info.index}, was {link.ifindex})")
            if self.conns.connection(link.conn_id) is None:
                raise CniError(spec.IFACE_CHANGED, f"the connection of {link.ifname} to "
                                                   f"{link.service} is not held", link.state)
        return None

    async def ready(self) -> None:
        try:
            await asyncio.wait_for(self.conns.find(f"{self.name}-status"), STATUS_TIMEOUT)
        except (NsmError, TimeoutError) as exc:
            raise CniError(spec.NOT_AVAILABLE, "the node's network service manager does not answer",
                           f"{self.conns.manager_url}: {exc}") from None
        return None

    async def gc(self, config: Mapping[str, Any]) -> None:
        keep = valid_attachments(config)
        stale = [a for a in self.attachments.values()
                 if a.network == config["name"] and a.key not in keep]
        for att in stale:
            async with self._locked(att.key):
                if self.attachments.get(att.key) is att:
                    await self._remove(att, "GC")
        return None

    # -- restart and sweeping -------------------------------------------------------------

    def gone(self, att: Attachment) -> bool:
        """Whether the pod's namespace is gone (or another one is at its path)."""
        try:
            return netns_id(att.netns) != tuple(att.netns_id)
        except NsmError:
            return True

    async def _take_back(self, att: Attachment) -> None:
        """After a restart: adopt ``att``'s connections (or request them again, retrying)."""
        try:
            if self.gone(att):
                async with self._locked(att.key):
                    await self._remove(att, "namespace gone")
                return
            await asyncio.gather(*(self._take_back_link(att, link) for link in att.links))
            self.state.save(att)
        finally:
            if self._adopting.get(att.key) is asyncio.current_task():
                del self._adopting[att.key]

    async def _take_back_link(self, att: Attachment, link: Link) -> None:
        link.state = "adopting"

        async def present(found: Any) -> bool:
            info = await self.netlink.link(att.netns, link.ifname)
            return info is not None and (link.ifindex is None or info.index == link.ifindex)

        backoff = Backoff()
        while True:
            try:
                conn = await self.conns.adopt(self._request(att, link), present)
                if conn is None:
                    conn = await self.conns.request(self._request(att, link))
                await self._learn(att, link, conn)
                return
            except NsmError as exc:
                link.state = "failed"
                log.warning("taking back a connection failed, retrying", conn=link.conn_id,
                            code=exc.code.name, error=exc.message)
                await backoff.sleep()

    async def _sweep(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._sweep_now.wait(), self.sweep_interval)
            self._sweep_now.clear()
            for att in list(self.attachments.values()):
                if self.gone(att) and att.key not in self._adopting:
                    async with self._locked(att.key):
                        if self.attachments.get(att.key) is att:
                            await self._remove(att, "namespace gone")


# -- the command line ---------------------------------------------------------------------


def _framed(status: int, out: Any) -> bytes:
    """The compiled plugin's answer: its exit status, then what it prints (the Python plugin's
    output for the same result: :func:`nsm.cni.plugin.main`)."""
    text = "" if out is None else wirejson.dumps(out) + "\n"
    return f"{status}\n{text}".encode()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The agent's flags (each also settable as ``NSM_<FLAG>``)."""
    for name, default, what in (
            ("--manager", None, "the node's manager URL, e.g. unix:///run/nsm/nsm.sock"),
            ("--manager-id", None, "the SPIFFE ID the manager must have (spiffe://<td>/nsm/node/"
                                   "<node>/manager): its TLS handshake then proves it"),
            ("--socket", spec.DEFAULT_SOCKET,
             "unix socket the nsm-cni plugin talks to (its directory gets mode 0700)"),
            ("--state-dir", DEFAULT_STATE_DIR, "directory of the attachments' state (survives a restart)"),
            ("--name", DEFAULT_NAME, "this agent's path segment name: keep it across restarts (adoption)"),
            ("--install-plugin", None, "write the nsm-cni executable into this directory (the "
                                       "runtime's CNI directory, e.g. /opt/cni/bin) at start"),
            ("--kubeconfig", None, "kubeconfig file for --kubernetes (default: in-cluster service "
                                   "account, else $KUBECONFIG or ~/.kube/config)")):
        flag(parser, name, default=default, help=what)
    flag(parser, "--listen", many=True, default=[],
         help="URL(s) serving gRPC health (for probes), e.g. unix:///run/nsm/cni/health.sock")
    for name, seconds, what in (
            ("--lifetime", DEFAULT_LIFETIME, "connection lifetime without a refresh, e.g. 45s"),
            ("--timeout", DEFAULT_TIMEOUT, "timeout of each Request/Close to the manager, e.g. 15s"),
            ("--sweep-interval", DEFAULT_SWEEP,
             "how often attachments whose namespace is gone are looked for, e.g. 2s")):
        flag(parser, name, type=duration, default=seconds, help=what)
    flag(parser, "--kubernetes", switch=True, default=False,
         help="read each pod's networkservicemesh.io annotation and write its network-status "
              "through the Kubernetes API (pod named by K8S_POD_NAMESPACE/K8S_POD_NAME in CNI_ARGS)")
    flag(parser, "--node", default=None,
         help="this node's name, for the agent's SPIFFE ID (default: the host name)")
    heal_flags(parser)
    add_security_flags(parser)
    add_metrics_flags(parser)
    flag(parser, "--list", switch=True, default=False,
         help="print the running agent's attachments (JSON lines) and exit")
    log_flags(parser)


def _list(socket_path: str) -> int:
    from nsm.cni.plugin import ask_agent  # the plugin's client side: the same wire

    try:
        result = ask_agent(socket_path, {"list": True}, command="LIST", wait=0.0, timeout=10.0)
    except CniError as exc:
        return fail(PROG, exc.msg)
    for att in result or []:
        print(json.dumps(att))
    return 0


async def run(args: argparse.Namespace) -> int:
    if args.list:
        return await asyncio.to_thread(_list, args.socket)
    if args.install_plugin:
        from nsm.cni.plugin import write_wrapper

        print(f"{PROG}: wrote {write_wrapper(args.install_plugin)}", file=sys.stderr)
    if not args.manager:
        if args.install_plugin:
            return 0
        return fail(PROG, "--manager (or NSM_MANAGER) is required", 2)
    nsm_log.setup(args.log_level, args.log_json)
    kubernetes = None
    if args.kubernetes or args.kubeconfig:
        from nsm.cni.k8s import PodApi

        try:
            kubernetes = PodApi(kubeconfig=args.kubeconfig)
        except Exception as exc:  # lightkube's ConfigError, a bad file
            return fail(PROG, f"no Kubernetes credentials: {exc}", 2)
    node = args.node or re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()) or "node"
    try:
        security = security_from_args(args, node_id(args.trust_domain, node, CNI_AGENT))
    except NsmError as exc:
        return fail(PROG, exc.message, 2)
    agent = Agent(manager_url=args.manager, socket=args.socket, state_dir=args.state_dir,
                  name=args.name, listen=args.listen, lifetime=args.lifetime,
                  request_timeout=args.timeout, heal=heal_options(args),
                  sweep_interval=args.sweep_interval, kubernetes=kubernetes, security=security,
                  manager_id=args.manager_id)
    try:
        async with serving_metrics(args, Metrics("cni-agent", node, status=agent.status), security):
            await serve_until_signal(agent.start, agent.stop, status=agent.status)
    finally:
        await security.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return asyncio.run(run(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())

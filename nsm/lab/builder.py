"""Building a :class:`~nsm.lab.topology.Topology` on this machine and tearing it down
(:class:`Lab`); see :mod:`nsm.lab` for what gets built and the names it gets."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from nsm import log as nsm_log
from nsm.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, NsmError, Unavailable
from nsm.kernel import netns as nsns
from nsm.kernel.netlink import Netlink
from nsm.lab.leftovers import write_json
from nsm.lab.processes import Daemon, end_processes_in, identity, start_time, tail
from nsm.lab.topology import BRIDGE, DEFAULT_PREFIX, FABRIC, Topology, validate_prefix
from nsm.metrics import METRICS_PATH
from nsm.registry.client import RegistryClient
from nsm.security.ca import CertificateAuthority
from nsm.security.ids import DEFAULT_TRUST_DOMAIN, MANAGER, node_id, workload_id
from nsm.security.sources import CaSource
from nsm.security.tls import Security
from nsm.transport import dial, http_get
from nsm.wellknown import FORWARDER_SERVICE

log = nsm_log.get_logger(__name__)

T = TypeVar("T")

REGISTRY_PORT = 5000
MANAGER_PORT = 5001
NODE_IFNAME = "eth0"

@dataclass(frozen=True)
class LabNode:
    """A built node."""

    name: str
    netns: str
    ip: str
    manager_url: str
    manager_tcp_url: str
    forwarder_url: str
    forwarder_name: str
    manager: Daemon = field(compare=False, repr=False)
    forwarder: Daemon = field(compare=False, repr=False)


@dataclass(frozen=True)
class LabPod:
    """A built pod (or an endpoint's pod)."""

    name: str
    node: str
    netns: str


@dataclass(frozen=True)
class LabEndpoint:
    """A running endpoint."""

    name: str
    node: str
    pod: str
    netns: str
    url: str
    daemon: Daemon = field(compare=False, repr=False)


async def _gather_all(jobs: Sequence[Awaitable[None]]) -> None:
    """Run all jobs to their end (none is cut short by another's failure); then raise the first
    cancellation, else the first error."""
    results = await asyncio.gather(*jobs, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException) and not isinstance(r, Exception):
            raise r
    for r in results:
        if isinstance(r, Exception):
            raise r


async def shielded(aw: Awaitable[T]) -> T:
    """Run ``aw`` to completion even if the caller is cancelled meanwhile (teardown must finish);
    re-raise the cancellation afterwards."""
    task = asyncio.ensure_future(aw)
    interrupted = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done():
                break
            interrupted = True
    if interrupted:
        raise asyncio.CancelledError
    return task.result()


class Lab:
    """Builds a :class:`Topology` (``async with Lab(topology, prefix=...) as lab:``).

    ``workdir`` (sockets and logs) must not exist or be empty; default a fresh temporary
    directory. It is removed at teardown, so when the ``async with`` body raises, the daemons'
    logs are printed to stderr first (``print_logs_on_error``; :meth:`format_logs` gives them).
    ``extra_args`` adds flags to daemons by key (see :meth:`daemon`), e.g.
    ``{"forwarder.node2": ["--expiry", "5s"]}``. ``state_file``, if given, gets the lab's JSON
    description (for ``nsm lab status``/``down``).

    Secure by default: a built-in CA in ``<workdir>/ca`` issues every daemon its SVID (each
    gets ``NSM_CA_DIR``; its SPIFFE ID is its role's default), every gRPC hop is mTLS with path
    tokens. :attr:`security` is the lab's own identity (``spiffe://<td>/nsm/lab``, an observer
    every daemon lets see all connections), :meth:`identity` makes more for in-process clients.
    ``secure=False`` runs everything ``--insecure``. ``svid_ttl``: the lifetime of every SVID
    the lab's CA issues (``NSM_SVID_TTL`` of every daemon, and the lab's own identities), e.g. a
    few seconds to see rotations.
    """

    def __init__(self, topology: Topology, *, prefix: str = DEFAULT_PREFIX,
                 workdir: str | Path | None = None, state_file: str | Path | None = None,
                 log_level: str = "info", extra_args: Mapping[str, Sequence[str]] | None = None,
                 start_timeout: float = 30.0, stop_timeout: float = 5.0,
                 print_logs_on_error: bool = True, secure: bool = True,
                 trust_domain: str = DEFAULT_TRUST_DOMAIN, svid_ttl: float | None = None) -> None:
        self.topology = topology
        self.secure = secure
        self.trust_domain = trust_domain
        if svid_ttl is not None and not svid_ttl > 0:
            raise InvalidArgument(f"SVID lifetime must be positive, not {svid_ttl}")
        #: Lifetime of every SVID of the lab (its daemons' and its own), None: the default.
        self.svid_ttl = svid_ttl
        #: The lab's own identity (plaintext until built, and always when not ``secure``).
        self.security = Security.insecure()
        self._identities: dict[str, Security] = {}
        self.print_logs_on_error = print_logs_on_error
        self.prefix = validate_prefix(prefix)
        self._workdir_arg = Path(workdir) if workdir is not None else None
        self.state_file = Path(state_file) if state_file is not None else None
        self.log_level = log_level
        self.extra_args = {k: list(v) for k, v in (extra_args or {}).items()}
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.workdir: Path | None = None
        self._namespaces: list[str] = []  # names created by us, in creation order
        self._node_ns: dict[str, str] = {}
        self._daemons: dict[str, Daemon] = {}
        self._tiers: list[list[str]] = []  # daemon keys in start order, by tier
        self.nodes: dict[str, LabNode] = {}
        self.pods: dict[str, LabPod] = {}
        self.endpoints: dict[str, LabEndpoint] = {}
        self._state = "new"
        self._wrote_state = False
        self.build_seconds = 0.0
        self.teardown_seconds = 0.0
        self._log = log.bind(lab=self.prefix)
        bad = set(self.extra_args) - set(self._all_keys())
        if bad:
            raise InvalidArgument(f"extra_args for unknown daemons: {sorted(bad)}")

    # -------------------------------------------------------------- names

    def ns_name(self, name: str) -> str:
        """The namespace name of a node, pod or endpoint pod (``<prefix>-<name>``)."""
        return f"{self.prefix}-{name}"

    @property
    def fabric_netns(self) -> str:
        return nsns.netns_path(self.ns_name(FABRIC))

    def _all_keys(self) -> list[str]:
        keys = ["registry"]
        for n in self.topology.nodes:
            keys += [f"manager.{n.name}", f"forwarder.{n.name}"]
        keys += [f"nse.{e.name}" for e in self.topology.endpoints]
        return keys

    def _namespace_names(self) -> list[str]:
        t = self.topology
        return ([self.ns_name(FABRIC)] + [self.ns_name(n.name) for n in t.nodes]
                + [self.ns_name(p.name) for p in t.pods]
                + [self.ns_name(e.name) for e in t.endpoints if not e.pod])

    @property
    def registry_node(self) -> str:
        return self.topology.registry_node

    @property
    def registry_url(self) -> str:
        """The registry's unix socket URL (reachable from the root namespace)."""
        return self._url("registry.sock")

    @property
    def registry_tcp_url(self) -> str:
        """The registry's URL on the fabric (what the daemons use)."""
        return f"tcp://{self.topology.node_ip(self.registry_node)}:{REGISTRY_PORT}"

    @property
    def log_dir(self) -> Path:
        """Where the daemons' logs are (``<key>.log``)."""
        if self.workdir is None:
            raise FailedPrecondition("the lab is not started")
        return self.workdir / "logs"

    def _url(self, *parts: str) -> str:
        if self.workdir is None:
            raise FailedPrecondition("the lab is not started")
        return f"unix://{self.workdir.joinpath(*parts)}"

    # -------------------------------------------------------------- access

    def node(self, name: str) -> LabNode:
        try:
            return self.nodes[name]
        except KeyError:
            raise NotFound(f"lab {self.prefix} has no node {name!r}") from None

    def pod(self, name: str) -> LabPod:
        try:
            return self.pods[name]
        except KeyError:
            raise NotFound(f"lab {self.prefix} has no pod {name!r}") from None

    def endpoint(self, name: str) -> LabEndpoint:
        try:
            return self.endpoints[name]
        except KeyError:
            raise NotFound(f"lab {self.prefix} has no endpoint {name!r}") from None

    @property
    def daemons(self) -> dict[str, Daemon]:
        """Daemons by key: ``registry``, ``manager.<node>``, ``forwarder.<node>``, ``nse.<name>``."""
        return dict(self._daemons)

    def metrics_url(self, key: str | Daemon) -> str:
        """Where daemon ``key`` serves its metrics (``--metrics-listen``, a unix socket in the
        lab's work directory; readable by the lab's identity)."""
        name = key.name if isinstance(key, Daemon) else key
        assert self.workdir is not None
        return f"unix://{self.workdir / 'metrics' / name}.sock"

    async def scrape(self, key: str | Daemon) -> str:
        """Daemon ``key``'s metrics (the text exposition), read as the lab."""
        status, body = await http_get(self.metrics_url(self.daemon(key)), METRICS_PATH, self.security)
        if status != 200:
            raise Unavailable(f"metrics of {self.daemon(key).name}: HTTP {status}: "
                              f"{body[:200].decode(errors='replace')}")
        return body.decode()

    def _env_of(self, key: str) -> dict[str, str]:
        return {**self.daemon_env, "NSM_METRICS_LISTEN": self.metrics_url(key)}

    def daemon(self, key: str | Daemon) -> Daemon:
        if isinstance(key, Daemon):
            if key not in self._daemons.values():
                raise NotFound(f"daemon {key.name!r} is not one of lab {self.prefix}'s")
            return key
        try:
            return self._daemons[key]
        except KeyError:
            raise NotFound(f"lab {self.prefix} has no daemon {key!r} "
                           f"(have: {', '.join(self._daemons)})") from None

    async def kill(self, key: str | Daemon) -> None:
        """SIGKILL a daemon (no chance to clean up: for healing tests)."""
        d = self.daemon(key)
        self._log.info("killing daemon", daemon=d.name, pid=d.pid)
        await d.kill()
        self._write_state()

    async def stop_daemon(self, key: str | Daemon) -> int | None:
        """Stop a daemon gracefully (SIGTERM, then SIGKILL); returns its exit status."""
        d = self.daemon(key)
        status = await d.stop(self.stop_timeout)
        self._write_state()
        return status

    async def start_daemon(self, key: str | Daemon) -> None:
        """Start a stopped or killed daemon again, with the same flags."""
        await self._start(self.daemon(key))
        self._write_state()

    async def restart(self, key: str | Daemon) -> None:
        """Stop (if running) and start a daemon again."""
        d = self.daemon(key)
        await d.stop(self.stop_timeout)
        await self._start(d)
        self._write_state()

    async def add_daemon(self, key: str, args: Sequence[str], *, url: str, node: str | None = None,
                         env: Mapping[str, str] | None = None, timeout: float | None = None) -> Daemon:
        """Start one more ``nsm`` daemon (``args`` after ``nsm``, as given: no flag is added)
        inside the namespace of ``node`` (default: the registry's), logging to ``<key>.log`` in
        the lab's log directory, and wait until it serves at ``url``. It stops with the lab, or
        earlier with :meth:`remove_daemon`; meanwhile it is one of :attr:`daemons`."""
        if self._state != "running":
            raise FailedPrecondition(f"lab {self.prefix} is not running")
        if key in self._daemons:
            raise AlreadyExists(f"lab {self.prefix} has a daemon {key!r} already")
        netns = self.node(node or self.registry_node).netns
        assert self.workdir is not None
        d = Daemon(key, args, url=url, env={**self._env_of(key), **(env or {})},
                   log_path=self.workdir / "logs" / f"{key}.log", netns=netns, security=self.security)
        self._daemons[key] = d
        self._tiers[-1].append(key)
        try:
            await self._start(d, timeout)
        except BaseException:
            self._forget(key)
            raise
        self._write_state()
        return d

    async def remove_daemon(self, key: str | Daemon) -> int | None:
        """Stop a daemon (SIGTERM, then SIGKILL) and forget it; returns its exit status. For
        daemons started with :meth:`add_daemon` (the topology's own stay for the lab's life)."""
        d = self.daemon(key)
        if d.name not in self._tiers[-1]:
            raise FailedPrecondition(f"daemon {d.name!r} is one of the topology's, not added")
        try:
            return await d.stop(self.stop_timeout)
        finally:
            self._forget(d.name)
            self._write_state()

    def _forget(self, key: str) -> None:
        self._daemons.pop(key, None)
        for tier in self._tiers:
            if key in tier:
                tier.remove(key)

    def logs(self, lines: int | None = None) -> dict[str, str]:
        """Each daemon's log (the last ``lines`` lines), by key."""
        return {k: tail(d.log_path, lines) for k, d in self._daemons.items()}

    def format_logs(self, lines: int | None = 60) -> str:
        """All daemons' logs as one printable text (for test failures)."""
        parts = []
        for key, text in self.logs(lines).items():
            d = self._daemons[key]
            parts.append(f"----- {key} (pid {d.pid}, {d.log_path}) -----\n{text}")
        return "\n".join(parts)

    # -------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> Lab:
        await self.start()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        if e is not None and self.print_logs_on_error:
            print(f"===== lab {self.prefix}: {type(e).__name__}; the daemons' logs =====\n"
                  f"{self.format_logs()}", file=sys.stderr, flush=True)
        await shielded(self.stop())

    async def start(self) -> Lab:
        """Build everything; on any failure (or cancellation) tear down what was built and
        raise."""
        if self._state != "new":
            raise FailedPrecondition(f"lab {self.prefix} was already started")
        if os.geteuid() != 0:
            raise FailedPrecondition("the lab needs root (it creates namespaces and links)")
        self._state = "starting"
        t0 = time.perf_counter()
        self._log.info("lab building", nodes=len(self.topology.nodes), pods=len(self.topology.pods),
                       endpoints=len(self.topology.endpoints))
        try:
            await self._build()
        except BaseException as exc:
            self._log.error("lab build failed; tearing down", error=str(exc) or type(exc).__name__)
            await shielded(self.stop())
            raise
        self.build_seconds = time.perf_counter() - t0
        self._state = "running"
        self._write_state()
        self._log.info("lab ready", seconds=round(self.build_seconds, 2))
        return self

    async def _build(self) -> None:
        existing = [n for n in self._namespace_names() if nsns.netns_exists(n)]
        if existing:
            raise AlreadyExists(
                f"namespaces of lab {self.prefix!r} exist already ({', '.join(existing)}): another "
                f"lab with this prefix is running, or one was left behind; remove it with "
                f"`nsm lab down --prefix {self.prefix}`")
        self.workdir = self._make_workdir()
        (self.workdir / "logs").mkdir()
        (self.workdir / "metrics").mkdir()
        if self.secure:
            await asyncio.to_thread(CertificateAuthority.open, self.ca_dir, self.trust_domain)
            self.security = self.identity(self.lab_id)
            await self.security.start()
        self._write_state()  # early, so that `nsm lab down` finds the work dir of a crashed build
        await self._build_network()
        self._define_daemons()
        await self._start_daemons()
        await self._wait_registered()

    # -------------------------------------------------------------- identities

    @property
    def ca_dir(self) -> Path:
        """The built-in CA's directory (in the work directory)."""
        assert self.workdir is not None
        return self.workdir / "ca"

    @property
    def lab_id(self) -> str:
        return f"spiffe://{self.trust_domain}/nsm/lab"

    def manager_id(self, node: str) -> str | None:
        """The SPIFFE ID of ``node``'s manager, which its clients expect (``nsm nsc
        --manager-id``); None when the lab is not secure."""
        return node_id(self.trust_domain, node, MANAGER) if self.secure else None

    @property
    def daemon_env(self) -> dict[str, str]:
        """What every daemon and command of the lab gets in its environment: the CA and the
        trust domain (each daemon's SPIFFE ID is its role's default), the lab as an observer
        and as a reader of the metrics; or ``NSM_INSECURE``."""
        if not self.secure:
            return {"NSM_INSECURE": "1"}
        env = {"NSM_CA_DIR": str(self.ca_dir), "NSM_TRUST_DOMAIN": self.trust_domain,
               "NSM_OBSERVERS": self.lab_id, "NSM_METRICS_SCRAPERS": self.lab_id}
        if self.svid_ttl is not None:
            env["NSM_SVID_TTL"] = f"{self.svid_ttl:g}s"
        return env

    def identity(self, spiffe_id: str) -> Security:
        """A :class:`Security` with an SVID of the lab's CA for ``spiffe_id`` (one per ID,
        started by its first use or ``await identity(...).start()``, closed with the lab); the
        insecure one when the lab is not secure."""
        if not self.secure:
            return Security.insecure()
        held = self._identities.get(spiffe_id)
        if held is None:
            ttl = {} if self.svid_ttl is None else {"ttl": self.svid_ttl}
            held = Security(CaSource(self.ca_dir, spiffe_id, trust_domain=self.trust_domain,
                                     dns_names=(self.trust_domain,), **ttl),
                            trust_domain=self.trust_domain)
            self._identities[spiffe_id] = held
        return held

    def pod_identity(self, netns: str) -> Security:
        """The identity of the pod of ``netns`` (``spiffe://<td>/ns/default/pod/<name>``), as
        ``nsm nsc`` takes it by default (started by its first use)."""
        return self.identity(workload_id(self.trust_domain, os.path.basename(netns.rstrip("/"))))

    def _make_workdir(self) -> Path:
        if self._workdir_arg is None:
            return Path(tempfile.mkdtemp(prefix=f"nsmlab-{self.prefix}-"))
        path = self._workdir_arg
        path.mkdir(parents=True, exist_ok=True)
        if any(path.iterdir()):
            raise FailedPrecondition(f"lab work directory {path} is not empty")
        return path

    def _create_netns(self, name: str) -> str:
        # Synchronous (about a millisecond): a cancelled thread would leave an unrecorded one.
        path = nsns.create_netns(name)
        self._namespaces.append(name)
        return path

    async def _build_network(self) -> None:
        t = self.topology
        netlink = Netlink(prune_interval=0)
        try:
            fabric = self._create_netns(self.ns_name(FABRIC))
            await netlink.create_bridge(BRIDGE, fabric, mtu=t.mtu)
            await netlink.set_up(fabric, BRIDGE)
            node_ns = self._node_ns
            for n in t.nodes:
                node_ns[n.name] = self._create_netns(self.ns_name(n.name))

            async def wire(node: str) -> None:
                ns = node_ns[node]
                await netlink.create_veth(NODE_IFNAME, ns, node, fabric, mtu=t.mtu,
                                          alias=f"nsm-lab-{self.prefix}-underlay",
                                          peer_alias=f"nsm-lab-{self.prefix}-{node}")
                await netlink.set_master(fabric, node, BRIDGE)
                await netlink.set_up(fabric, node)
                await netlink.setup_interface(
                    ns, NODE_IFNAME, addresses=[f"{t.node_ip(node)}/{t.prefixlen}"], routes=[],
                    mtu=t.mtu)
                # A node routes its pods' traffic (routed VXLAN payloads), both families.
                await netlink.set_sysctl_in_netns(ns, "net.ipv4.ip_forward", 1)
                await netlink.set_sysctl_in_netns(ns, "net.ipv6.conf.all.forwarding", 1)

            await asyncio.gather(*(wire(n.name) for n in t.nodes))
            for pod in t.pods:
                self.pods[pod.name] = LabPod(pod.name, pod.node,
                                             self._create_netns(self.ns_name(pod.name)))
            for ep in t.endpoints:
                if not ep.pod:
                    self.pods[ep.name] = LabPod(ep.name, ep.node,
                                                self._create_netns(self.ns_name(ep.name)))
        finally:
            await netlink.close()  # its sockets would pin the namespaces

    def _new_daemon(self, key: str, args: list[str], url: str, netns: str) -> Daemon:
        assert self.workdir is not None
        args = [*args, "--log-level", self.log_level, *self.extra_args.get(key, [])]
        d = Daemon(key, args, url=url, env=self._env_of(key),
                   log_path=self.workdir / "logs" / f"{key}.log", netns=netns, security=self.security)
        self._daemons[key] = d
        return d

    def _define_daemons(self) -> None:
        t = self.topology
        assert self.workdir is not None
        reg_ns = self._node_ns[t.registry_node]
        self._new_daemon("registry", [
            "registry", "--listen", self.registry_url, "--listen", self.registry_tcp_url,
        ], self.registry_url, reg_ns)
        for n in t.nodes:
            (self.workdir / n.name).mkdir()
            ip = t.node_ip(n.name)
            mgr_url = self._url(n.name, "nsm.sock")
            mgr_tcp = f"tcp://{ip}:{MANAGER_PORT}"
            fwd_url = self._url(n.name, "fwd.sock")
            fwd_name = f"{n.name}-fwd"
            mgr = self._new_daemon(f"manager.{n.name}", [
                "manager", "--name", n.name, "--listen", mgr_url, "--listen", mgr_tcp,
                "--registry", self.registry_tcp_url,
                *(["--advertise", mgr_url] if n.advertise_unix else []),
            ], mgr_url, self._node_ns[n.name])
            fwd = self._new_daemon(f"forwarder.{n.name}", [
                "forwarder", "--name", fwd_name, "--node", n.name, "--listen", fwd_url,
                "--manager", mgr_url, "--registry", mgr_url,
            ], fwd_url, self._node_ns[n.name])
            self.nodes[n.name] = LabNode(n.name, self._node_ns[n.name], ip, mgr_url, mgr_tcp,
                                         fwd_url, fwd_name, mgr, fwd)
        for ep in t.endpoints:
            url = self._url(ep.node, f"{ep.name}.sock")
            pod = self.pods[ep.pod_name]
            # Registered through its node's manager, which advertises its own tcp URL for it.
            args = ["nse", "--name", ep.name, "--cidr", ep.cidr, "--netns", pod.netns,
                    "--listen", url, "--registry", self.nodes[ep.node].manager_url]
            for s in ep.services:
                args += ["--service", s]
            for k, v in ep.labels:
                args += ["--label", f"{k}={v}"]
            d = self._new_daemon(f"nse.{ep.name}", args, url, self._node_ns[ep.node])
            self.endpoints[ep.name] = LabEndpoint(ep.name, ep.node, pod.name, pod.netns, url, d)
        self._tiers = [["registry"], [k for k in self._daemons if k.split(".")[0] == "manager"],
                       [k for k in self._daemons if k.split(".")[0] == "forwarder"],
                       [k for k in self._daemons if k.startswith("nse.")],
                       []]  # added later (add_daemon)

    async def _start(self, d: Daemon, timeout: float | None = None) -> None:
        try:
            await d.start(timeout or self.start_timeout)
        except NsmError as exc:
            last = tail(d.log_path, 25).strip() or "(empty log)"
            raise Unavailable(f"lab {self.prefix}: {d.name} did not start: {exc.message}\n"
                              f"--- last lines of {d.log_path} ---\n{last}") from exc
        self._log.info("daemon serving", daemon=d.name, pid=d.pid, url=d.url)

    async def _start_daemons(self) -> None:
        await self._start(self._daemons["registry"])
        if self.topology.services:
            channel = dial(self.registry_url, self.security)
            try:
                client = RegistryClient(channel, timeout=5.0)
                for s in self.topology.services:
                    await client.register_ns(s.to_proto())
            finally:
                await channel.close()

        # Per node the manager, then its forwarder; the nodes concurrently; then the endpoints.
        async def node(name: str) -> None:
            await self._start(self._daemons[f"manager.{name}"])
            await self._start(self._daemons[f"forwarder.{name}"])

        await _gather_all([node(n.name) for n in self.topology.nodes])
        await _gather_all([self._start(self._daemons[k]) for k in self._tiers[3]])

    async def _wait_registered(self, timeout: float | None = None) -> None:
        """Wait until every forwarder and endpoint is in the registry."""
        want = {n.forwarder_name for n in self.nodes.values()} | set(self.endpoints)
        deadline = time.monotonic() + (timeout or self.start_timeout)
        channel = dial(self.registry_url, self.security)
        try:
            client = RegistryClient(channel, timeout=2.0)
            while True:
                have = {nse.name for nse in await client.find_nse()}
                if want <= have:
                    return
                if time.monotonic() > deadline:
                    raise Unavailable(f"lab {self.prefix}: not registered after "
                                      f"{timeout or self.start_timeout:.0f}s: "
                                      f"{', '.join(sorted(want - have))}")
                await asyncio.sleep(0.05)
        finally:
            await channel.close()

    async def forwarders(self) -> list[str]:
        """Names of the forwarders registered now (``Find`` service ``forwarder``)."""
        channel = dial(self.registry_url, self.security)
        try:
            found = await RegistryClient(channel, timeout=5.0).find_nse()
        finally:
            await channel.close()
        return sorted(n.name for n in found if FORWARDER_SERVICE in n.network_service_names)

    async def stop(self) -> None:
        """Tear everything down (idempotent): daemons (endpoints first), any process left in the
        lab's namespaces, the namespaces, the work directory and the state file."""
        if self._state in ("new", "stopped"):
            return
        self._state = "stopping"
        t0 = time.perf_counter()
        for tier in reversed(self._tiers):
            await asyncio.gather(*(self._stop_quietly(self._daemons[k]) for k in tier))
        for d in self._daemons.values():  # not in a tier (the build failed early)
            await self._stop_quietly(d)
        paths = [nsns.netns_path(n) for n in self._namespaces]
        ended = await asyncio.to_thread(end_processes_in, paths, self.stop_timeout)
        if ended:
            self._log.warning("ended stray processes in the lab's namespaces", pids=ended)
        # Pods first, then nodes, the fabric last (the reverse of creation).
        for name in reversed(self._namespaces):
            try:
                nsns.delete_netns(name)
            except NsmError as exc:
                self._log.error("cannot delete namespace", netns=name, error=exc.message)
        self._namespaces.clear()
        for held in self._identities.values():
            await held.close()
        self._identities.clear()
        self.security = Security.insecure()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
        if self.state_file is not None and self._wrote_state:
            with contextlib.suppress(FileNotFoundError):
                self.state_file.unlink()
        self.teardown_seconds = time.perf_counter() - t0
        self._state = "stopped"
        self._log.info("lab torn down", seconds=round(self.teardown_seconds, 2))

    async def _stop_quietly(self, d: Daemon) -> None:
        try:
            await d.stop(self.stop_timeout)
        except (OSError, ProcessLookupError) as exc:
            self._log.warning("cannot stop daemon", daemon=d.name, error=str(exc))

    # -------------------------------------------------------------- state file

    def describe(self) -> dict[str, Any]:
        """The lab as JSON-able data (what the state file holds)."""
        return {
            "prefix": self.prefix,
            "state": self._state,
            "ready": self._state == "running",
            "supervisor": identity(os.getpid()),
            "workdir": str(self.workdir) if self.workdir else None,
            "fabric": self.fabric_netns,
            "security": ({"ca_dir": str(self.ca_dir), "trust_domain": self.trust_domain,
                          "lab_id": self.lab_id}
                         if self.secure and self.workdir else None),
            "namespaces": [nsns.netns_path(n) for n in self._namespaces],
            "registry": ({"url": self.registry_url, "tcp_url": self.registry_tcp_url,
                          "node": self.registry_node} if self.workdir else None),
            "nodes": {n.name: {"netns": n.netns, "ip": n.ip, "manager_url": n.manager_url,
                               "manager_tcp_url": n.manager_tcp_url,
                               "manager_id": self.manager_id(n.name),
                               "forwarder_url": n.forwarder_url, "forwarder": n.forwarder_name}
                      for n in self.nodes.values()},
            "pods": {p.name: {"node": p.node, "netns": p.netns} for p in self.pods.values()},
            "endpoints": {e.name: {"node": e.node, "pod": e.pod, "url": e.url}
                          for e in self.endpoints.values()},
            "daemons": {k: {"pid": d.pid, "start_time": start_time(d.pid) if d.pid else None,
                            "netns": d.netns, "url": d.url, "log": str(d.log_path),
                            "args": d.args}
                        for k, d in self._daemons.items()},
        }

    def _write_state(self) -> None:
        if self.state_file is None or self._state in ("stopping", "stopped"):
            return
        write_json(self.state_file, self.describe())
        self._wrote_state = True

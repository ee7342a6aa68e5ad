"""The skeleton every serving role of the mesh shares (manager, forwarder, endpoint).

- **The chain**: the standard server prefix ``Measured → (callers) → Begin → Validate →
  UpdatePath(name) → PathTokens → Ownership → Timeout → Monitor`` is composed here, once; a
  role lists only who may call it (:meth:`Role.callers`, rules on the caller's identity) and
  what follows the prefix (:meth:`Role.elements`), top-down, in one place. The authorization
  policies (:class:`~nsm.security.policy.Policies`) apply when the role is secure.
- **What it serves**: ``networkservice.NetworkService`` (Request/Close down the chain) and
  ``connection.MonitorConnection`` (the Monitor element), plus the role's own services
  (:meth:`Role.grpc_services`, e.g. the manager's registry proxy), all through
  :meth:`nsm.transport.Server.add`, which also reports them by health and reflection.
- **Status**: :meth:`Role.status` counts what the hop holds (logged on SIGUSR1 by the daemons).
- **Metrics**: :attr:`Role.metrics` (:mod:`nsm.metrics`): the status as gauges, and every
  Request and Close by how it ended, counted by the chain's first element; the daemons serve
  them on ``--metrics-listen``.
- **Lifecycle**: ``async with Role(...)`` or ``await start()`` / ``await stop()``. :meth:`Role.setup`
  learns the facts the chain needs (a tunnel address, ...) *before* the chain is built, so nothing
  is patched afterwards; each step registers its own undo on an exit stack as it succeeds, so a
  start that fails half-way, or a stop, undoes exactly what was done, in reverse order
  (unregister → stop serving → close connections' timers → close channels and sockets).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from types import TracebackType
from typing import ClassVar, Self

from nsm.api import connection_pb2_grpc, networkservice_pb2_grpc
from nsm.chain import Chain, Element
from nsm.elements.begin import Begin
from nsm.elements.metrics import Measured
from nsm.elements.monitor import Monitor
from nsm.elements.owner import Ownership
from nsm.elements.timeout import Timeout
from nsm.elements.tokens import PathTokens
from nsm.elements.updatepath import DEFAULT_LIFETIME, UpdatePath
from nsm.elements.validate import Validate
from nsm.errors import FailedPrecondition, InvalidArgument
from nsm.log import Logger, get_logger
from nsm.metrics import Metrics
from nsm.names import check_name
from nsm.security.policy import Policies
from nsm.security.tls import Security
from nsm.servicer import SERVICE_NAME, NetworkServiceServicer
from nsm.transport import Server, Service, Url

MONITOR_SERVICE = "connection.MonitorConnection"


def network_service(chain: Chain, security: Security | None = None) -> Service:
    """``networkservice.NetworkService`` served by ``chain``."""
    return Service(SERVICE_NAME, networkservice_pb2_grpc.add_NetworkServiceServicer_to_server,
                   NetworkServiceServicer(chain, security))


def monitor_service(monitor: Monitor) -> Service:
    """``connection.MonitorConnection`` served by a Monitor element."""
    return Service(MONITOR_SERVICE, connection_pb2_grpc.add_MonitorConnectionServicer_to_server,
                   monitor)


class Role:
    """Base of the manager, the forwarder and the endpoint.

    Subclasses set :attr:`kind` and implement :meth:`elements`; they may override :meth:`setup`
    (before the chain is built), :meth:`serving` (after the server listens) and
    :meth:`grpc_services`. Both hooks get the exit stack and push the undo of whatever they start.
    """

    kind: ClassVar[str] = "role"
    #: Whether this role is the last hop of a path (it signs its own segment for its caller).
    last_hop: ClassVar[bool] = False

    def __init__(self, *, name: str, listen: Sequence[str],
                 lifetime: float = DEFAULT_LIFETIME, grace: float = 1.0,
                 security: Security | None = None, policies: Policies | None = None) -> None:
        self.name = check_name(name, f"{self.kind} name")
        #: This hop's identity and credentials (plaintext and no identity when insecure).
        self.security = security or Security.insecure()
        #: The authorization policies (applied only when secure).
        self.policies = policies or Policies()
        if not lifetime > 0:
            raise InvalidArgument(f"connection lifetime must be positive, not {lifetime}")
        self.lifetime = float(lifetime)
        self.grace = grace
        self.server = Server(listen, security=self.security)
        self.log: Logger = get_logger(f"nsm.{self.kind}").bind(name=self.name)
        self.begin = Begin()
        self.timeout = Timeout()
        self.monitor = Monitor(self.security, self.policies)
        self.ownership = Ownership(self.security, self.policies)
        #: This hop's metrics: its status, and its Requests and Closes (:class:`Measured`).
        self.metrics = Metrics(self.kind, self.name, status=self.status)
        self._chain: Chain | None = None
        self._stack: contextlib.AsyncExitStack | None = None

    # -- what a role defines --------------------------------------------------------------

    def prefix(self) -> list[Element]:
        """The standard server prefix, the same for every role: the metrics first (a refused
        caller is counted too), then its caller rules."""
        return [Measured(self.metrics), *self.callers(), self.begin, Validate(),
                UpdatePath(self.name, lifetime=self.lifetime),
                PathTokens(self.security, self.policies, last_hop=self.last_hop),
                self.ownership, self.timeout, self.monitor]

    def callers(self) -> list[Element]:
        """Rules on who may call this role (:mod:`nsm.elements.callers`), checked first."""
        return []

    def elements(self) -> list[Element]:
        """This role's own elements, after the prefix, in order."""
        raise NotImplementedError

    def grpc_services(self) -> list[Service]:
        """gRPC services this role serves besides NetworkService and MonitorConnection."""
        return []

    async def setup(self, stack: contextlib.AsyncExitStack) -> None:
        """Open what the chain needs (channels, sockets, facts) before it is built."""

    async def serving(self, stack: contextlib.AsyncExitStack) -> None:
        """Called once the server listens (register at the registry, start watchers)."""

    def status(self) -> dict[str, int]:
        """What this hop holds, counted (the daemon logs it on SIGUSR1, see
        :func:`nsm.daemon.status_on_signal`): connections (per-connection metadata), expiry
        timers, connections in the monitor and its watchers; roles add their own."""
        return {"connections": len(self.begin), "timers": self.timeout.pending(),
                "monitored": len(self.monitor.connections),
                "watchers": self.monitor.watcher_count()}

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def chain(self) -> Chain:
        if self._chain is None:
            raise RuntimeError(f"{self.kind} {self.name} is not started")
        return self._chain

    @property
    def bound(self) -> list[Url]:
        """The URLs the server listens on (tcp port 0 replaced by the real port)."""
        return self.server.urls

    @property
    def started(self) -> bool:
        return self._stack is not None

    async def start(self) -> None:
        """Set up, build the chain, serve, then :meth:`serving`. A failure (or a cancel, e.g.
        a signal while waiting for the registry) undoes every step that was done."""
        if self._stack is not None:
            return
        stack = contextlib.AsyncExitStack()
        self._stack = stack
        if not self.security.enabled:
            self.log.warning("insecure: no path tokens are signed or checked and no "
                             "authorization policy applies")
        elif self.policies.off():
            self.log.warning("authorization policies switched off", policies=",".join(self.policies.off()))
        try:
            await self.setup(stack)
            chain = Chain([*self.prefix(), *self.elements()], name=self.kind)
            self._chain = chain
            stack.push_async_callback(chain.shutdown)
            self.server.add(network_service(chain, self.security), monitor_service(self.monitor),
                            *self.grpc_services())
            try:
                await self.server.start()
            except RuntimeError as exc:  # grpc's bind failure (address in use, not local)
                raise FailedPrecondition(f"cannot listen: {exc}") from exc
            stack.push_async_callback(self.server.stop, self.grace)
            await self.serving(stack)
        except BaseException:
            self._stack = None
            await stack.aclose()
            raise

    async def stop(self) -> None:
        """Undo everything :meth:`start` did, in reverse order. Idempotent."""
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

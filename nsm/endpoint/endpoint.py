"""The network service endpoint (NSE): its chain, composed in one place, and its lifecycle.

Chain: Begin → Validate → UpdatePath(name) → Timeout → Monitor → KernelServer → IPAM
(→ extra elements of SDK users) → tail.

The endpoint programs nothing in the kernel: the forwarder puts one end of a veth pair into the
endpoint's namespace under the name the KernelServer chose, with the addresses the IPAM chose.

It serves ``networkservice.NetworkService`` and ``connection.MonitorConnection`` on its listen
URLs, registers the NetworkService records it offers (when missing, payload IP) and itself as an
NSE in the registry (``url`` = its first listen URL), keeps that registration fresh, and
unregisters when it stops.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Mapping, Sequence
from types import TracebackType

import grpc

from nsm.api import connection_pb2_grpc
from nsm.api.registry_pb2 import NetworkService, NetworkServiceEndpoint
from nsm.chain import Chain, Element
from nsm.elements.begin import Begin
from nsm.elements.monitor import Monitor
from nsm.elements.timeout import Timeout
from nsm.elements.updatepath import DEFAULT_LIFETIME, UpdatePath
from nsm.elements.validate import Validate
from nsm.endpoint.ipam import PointToPointIPAM, parse_cidr
from nsm.endpoint.kernel import KernelServer
from nsm.errors import FailedPrecondition, InvalidArgument, NsmError
from nsm.kernel.netns import netns_path, open_netns
from nsm.log import get_logger
from nsm.mechanisms import PAYLOAD_IP
from nsm.registry.client import NseRefresher, RegistryClient
from nsm.servicer import SERVICE_NAME, NetworkServiceServicer
from nsm.transport import Server, dial, parse_url

log = get_logger("nsm.endpoint")

MONITOR_SERVICE = "connection.MonitorConnection"
DEFAULT_EXPIRY = 60.0
MAX_NAME = 253
_PRINTABLE = re.compile(r"^[\x21-\x7e]+$")


def own_netns() -> str:
    """This process's network namespace, as a path the forwarder can open."""
    return f"/proc/{os.getpid()}/ns/net"


def check_netns(netns: str | None) -> str:
    """The path of an existing network namespace (a name means ``/var/run/netns/<name>``)."""
    path = netns_path(netns) if netns else own_netns()
    os.close(open_netns(path))
    return path


def check_name(value: str, what: str) -> str:
    if not value:
        raise InvalidArgument(f"{what} is empty")
    if len(value) > MAX_NAME:
        raise InvalidArgument(f"{what} is {len(value)} characters; at most {MAX_NAME} are allowed")
    if not _PRINTABLE.match(value):
        raise InvalidArgument(f"{what} {value!r} has spaces or control characters")
    return value


class Endpoint:
    """``async with Endpoint(name=..., services=[...], cidr=..., listen=[...], registry_url=...)``.

    - ``netns``: where the forwarder puts the endpoint's interfaces (a path or a name under
      /var/run/netns); default: this process's namespace.
    - ``labels``: this endpoint's labels, registered for every one of its services.
    - ``expiry``: lifetime of the registry registration (refreshed at a third of it).
    - ``lifetime``: the longest this hop keeps a connection without a refresh.
    - ``elements``: extra chain elements (SDK users), run after the IPAM, before the tail.
    - ``registry_url`` None: serve without registering (tests, static setups).
    - ``advertise``: the URL registered for this endpoint (default: its first bound listen URL;
      set it when listening on a wildcard address such as ``tcp://0.0.0.0:5003``).
    """

    def __init__(
        self,
        *,
        name: str,
        services: Sequence[str],
        cidr: str,
        listen: Sequence[str],
        registry_url: str | None = None,
        netns: str | None = None,
        labels: Mapping[str, str] | None = None,
        expiry: float = DEFAULT_EXPIRY,
        lifetime: float = DEFAULT_LIFETIME,
        elements: Sequence[Element] = (),
        advertise: str | None = None,
        grace: float = 1.0,
    ) -> None:
        self.name = check_name(name, "endpoint name")
        if not services:
            raise InvalidArgument("an endpoint needs at least one network service")
        self.services = [check_name(s, "network service name") for s in services]
        self.network = parse_cidr(cidr)
        if not listen:
            raise InvalidArgument("an endpoint needs at least one listen URL")
        self.listen = [str(parse_url(u)) for u in listen]
        self.registry_url = str(parse_url(registry_url)) if registry_url else None
        self.advertise = str(parse_url(advertise)) if advertise else None
        self.netns = check_netns(netns)
        self.labels = dict(labels or {})
        if not expiry > 0:
            raise InvalidArgument(f"registration expiry must be positive, not {expiry}")
        if not lifetime > 0:
            raise InvalidArgument(f"connection lifetime must be positive, not {lifetime}")
        self.expiry = float(expiry)
        self.grace = grace

        self.begin = Begin()
        self.timeout = Timeout()
        self.monitor = Monitor()
        self.kernel = KernelServer(self.netns)
        self.ipam = PointToPointIPAM(self.network)
        self.chain = Chain([
            self.begin,
            Validate(),
            UpdatePath(self.name, lifetime=lifetime),
            self.timeout,
            self.monitor,
            self.kernel,
            self.ipam,
            *elements,
        ], name="endpoint")

        self.server = Server(self.listen)
        NetworkServiceServicer(self.chain).add_to(self.server.grpc)
        connection_pb2_grpc.add_MonitorConnectionServicer_to_server(self.monitor, self.server.grpc)
        self.server.add_service_names([SERVICE_NAME, MONITOR_SERVICE])
        self.refresher: NseRefresher | None = None
        self._registry_channel: grpc.aio.Channel | None = None
        self._started = False

    @property
    def urls(self) -> list[str]:
        """The bound URLs (tcp port 0 replaced by the real port)."""
        return [str(u) for u in self.server.urls]

    @property
    def url(self) -> str:
        if not self.server.urls:
            raise RuntimeError("endpoint not started")
        return self.urls[0]

    def nse(self) -> NetworkServiceEndpoint:
        """The registry record of this endpoint."""
        nse = NetworkServiceEndpoint(name=self.name, url=self.advertise or self.url)
        nse.network_service_names.extend(self.services)
        for service in self.services:
            nse.network_service_labels[service].labels.update(self.labels)
        return nse

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Serve, then register (retrying while the registry is unreachable). Cancelling a
        start that waits for the registry stops everything it started."""
        if self._started:
            return
        self._started = True
        try:
            try:
                await self.server.start()
            except RuntimeError as exc:  # grpc's bind failure (address in use, not local)
                raise FailedPrecondition(f"cannot listen on {', '.join(self.listen)}: {exc}") from exc
            log.info("endpoint serving", name=self.name, urls=",".join(self.urls),
                     services=",".join(self.services), cidr=str(self.network), netns=self.netns)
            if self.registry_url is not None:
                self._registry_channel = dial(self.registry_url)
                self.refresher = NseRefresher(
                    RegistryClient(self._registry_channel), self.nse(), expiry=self.expiry,
                    services=[NetworkService(name=s, payload=PAYLOAD_IP) for s in self.services])
                await self.refresher.start()
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Unregister, stop serving, close every connection's timer. Idempotent."""
        if not self._started:
            return
        self._started = False
        refresher, self.refresher = self.refresher, None
        if refresher is not None:
            with contextlib.suppress(NsmError, RuntimeError):
                await refresher.stop()
        await self.server.stop(self.grace)
        await self.chain.shutdown()
        channel, self._registry_channel = self._registry_channel, None
        if channel is not None:
            await channel.close()
        log.info("endpoint stopped", name=self.name)

    async def __aenter__(self) -> Endpoint:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

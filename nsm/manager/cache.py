"""A live, in-memory view of the registry, fed by Find(watch=true) streams.

Discovery on the hot path of a Request reads this view instead of calling the registry, so
selecting an endpoint costs microseconds. Until the first snapshot has arrived (or while the
registry is unreachable after it), lookups fall back to direct Find calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import grpc

from nsm.api.registry_pb2 import (
    NetworkService,
    NetworkServiceEndpoint,
    NetworkServiceEndpointQuery,
    NetworkServiceQuery,
)
from nsm.api.registry_pb2_grpc import NetworkServiceEndpointRegistryStub, NetworkServiceRegistryStub
from nsm.errors import from_rpc_error
from nsm.log import get_logger
from nsm.registry.matching import is_expired

log = get_logger("nsm.manager.cache")


class RegistryCache:
    def __init__(self, channel: grpc.aio.Channel, *, find_timeout: float = 5.0) -> None:
        self._ns_stub = NetworkServiceRegistryStub(channel)
        self._nse_stub = NetworkServiceEndpointRegistryStub(channel)
        self._find_timeout = find_timeout
        self._ns: dict[str, NetworkService] = {}
        self._nse: dict[str, NetworkServiceEndpoint] = {}
        self._ns_live = False
        self._nse_live = False
        self._tasks: list[asyncio.Task[None]] = []
        self.changed = asyncio.Event()

    @property
    def live(self) -> bool:
        return self._ns_live and self._nse_live

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._watch_ns(), name="cache:ns"),
                       loop.create_task(self._watch_nse(), name="cache:nse")]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []

    async def _watch_ns(self) -> None:
        await self._watch(
            "services",
            lambda: self._ns_stub.Find(NetworkServiceQuery(network_service=NetworkService(),
                                                           watch=True)),
            lambda resp: resp.network_service, self._ns, "_ns_live")

    async def _watch_nse(self) -> None:
        await self._watch(
            "endpoints",
            lambda: self._nse_stub.Find(NetworkServiceEndpointQuery(
                network_service_endpoint=NetworkServiceEndpoint(), watch=True)),
            lambda resp: resp.network_service_endpoint, self._nse, "_nse_live")

    async def _watch(self, what: str, open_stream: Callable[[], Any],
                     record_of: Callable[[Any], Any], view: dict[str, Any], live_attr: str) -> None:
        """Keep ``view`` in step with a Find(watch=true) stream, reconnecting with backoff."""
        backoff = 0.1
        while True:
            try:
                setattr(self, live_attr, False)
                async for resp in open_stream():
                    record = record_of(resp)
                    if resp.deleted:
                        view.pop(record.name, None)
                    else:
                        view[record.name] = record
                    setattr(self, live_attr, True)
                    backoff = 0.1
                    self.changed.set()
                    self.changed.clear()
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                log.warning(f"registry watch ({what}) broke; retrying", code=exc.code().name)
            setattr(self, live_attr, False)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    # A watch on an empty registry yields nothing, so "live" is also reached by a direct Find.
    async def _find_ns(self, name: str) -> NetworkService | None:
        try:
            async for resp in self._ns_stub.Find(
                    NetworkServiceQuery(network_service=NetworkService(name=name)),
                    timeout=self._find_timeout):
                if resp.network_service.name == name and not resp.deleted:
                    return resp.network_service
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, "registry") from exc
        return None

    async def _find_nse(self, query: NetworkServiceEndpoint) -> list[NetworkServiceEndpoint]:
        out: list[NetworkServiceEndpoint] = []
        try:
            async for resp in self._nse_stub.Find(
                    NetworkServiceEndpointQuery(network_service_endpoint=query),
                    timeout=self._find_timeout):
                if not resp.deleted:
                    out.append(resp.network_service_endpoint)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, "registry") from exc
        return out

    async def network_service(self, name: str) -> NetworkService | None:
        ns = self._ns.get(name)
        if ns is not None:
            return ns
        # A miss is confirmed with the registry itself: the watch may still be catching up.
        return await self._find_ns(name)

    async def endpoints(self, service: str) -> list[NetworkServiceEndpoint]:
        """Unexpired NSEs offering ``service``, in a stable order (by name)."""
        now = time.time()
        found = [n for n in self._nse.values() if service in n.network_service_names]
        if not found or not self._nse_live:
            found = await self._find_nse(NetworkServiceEndpoint(network_service_names=[service]))
        return sorted((n for n in found if not is_expired(n, now)), key=lambda n: n.name)

    async def endpoint(self, name: str) -> NetworkServiceEndpoint | None:
        now = time.time()
        nse = self._nse.get(name)
        if nse is None or not self._nse_live:
            found = await self._find_nse(NetworkServiceEndpoint(name=name))
            nse = found[0] if found else None
        return nse if nse is not None and not is_expired(nse, now) else None

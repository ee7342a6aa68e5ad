"""A live, in-memory view of the registry, fed by Find(watch=true) streams.

Discovery on the hot path of a Request reads this view instead of calling the registry, so
selecting an endpoint costs microseconds. Until the first snapshot has arrived (or while the
registry is unreachable after it), lookups fall back to direct Find calls. Every call goes
through the one :class:`~nsm.registry.client.RegistryClient` (its deadline, its errors).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

from nsm.api.registry_pb2 import NetworkService, NetworkServiceEndpoint
from nsm.errors import RETRYABLE, NsmError
from nsm.log import get_logger
from nsm.registry.client import RegistryClient, Watch
from nsm.registry.matching import is_expired
from nsm.retry import Backoff

log = get_logger("nsm.manager.cache")

#: Longest wait between two attempts to watch the registry again.
MAX_WATCH_BACKOFF = 2.0


class RegistryCache:
    """``RegistryCache(RegistryClient(channel))``; ``await start()`` / ``await stop()``.
    ``on_endpoint(record)`` is called (on the event loop, must not block) for every endpoint or
    forwarder record the watch brings that is not a deletion."""

    def __init__(self, registry: RegistryClient, *,
                 on_endpoint: Callable[[NetworkServiceEndpoint], None] | None = None) -> None:
        self.registry = registry
        self.on_endpoint = on_endpoint
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
        await self._watch("services", self.registry.watch_ns, self._ns, "_ns_live")

    async def _watch_nse(self) -> None:
        await self._watch("endpoints", self.registry.watch_nse, self._nse, "_nse_live",
                          self.on_endpoint)

    async def _watch(self, what: str, open_watch: Callable[[], Watch[Any]],
                     view: dict[str, Any], live_attr: str,
                     on_record: Callable[[Any], None] | None = None) -> None:
        """Keep ``view`` in step with a Find(watch=true) stream, watching again with backoff."""
        backoff = Backoff(max_delay=MAX_WATCH_BACKOFF)
        while True:
            setattr(self, live_attr, False)
            try:
                async with open_watch() as watch:
                    async for record, deleted in watch:
                        if deleted:
                            view.pop(record.name, None)
                        else:
                            view[record.name] = record
                            if on_record is not None:
                                try:
                                    on_record(record)
                                except Exception as exc:  # a hook must not stop the watch
                                    log.warning("registry cache hook failed", error=repr(exc))
                        setattr(self, live_attr, True)
                        backoff.reset()
                        self.changed.set()
                        self.changed.clear()
            except NsmError as exc:
                log.warning(f"registry watch ({what}) broke; retrying", code=exc.code.name,
                            error=exc.message)
            setattr(self, live_attr, False)
            await backoff.sleep()

    async def network_service(self, name: str) -> NetworkService | None:
        ns = self._ns.get(name)
        if ns is not None:
            return ns
        # A miss is confirmed with the registry itself: the watch may still be catching up.
        # (A watch on an empty registry yields nothing, so it never turns "live" by itself.)
        return await self.registry.get_ns(name)

    async def endpoints(self, service: str) -> list[NetworkServiceEndpoint]:
        """Unexpired NSEs offering ``service``, in a stable order (by name)."""
        now = time.time()
        found = [n for n in self._nse.values() if service in n.network_service_names]
        if not found or not self._nse_live:
            try:
                found = await self.registry.find_nse(
                    NetworkServiceEndpoint(network_service_names=[service]))
            except RETRYABLE as exc:
                if not found:
                    raise
                # The registry is restarting: the last view beats no answer (a refresh of a
                # live connection must not fail for it).
                log.debug("registry cannot be asked: using the last view", service=service,
                          error=exc.message)
        return sorted((n for n in found if not is_expired(n, now)), key=lambda n: n.name)

    async def endpoint(self, name: str) -> NetworkServiceEndpoint | None:
        """The unexpired endpoint ``name``, None when there is none. A miss (or a record expired
        here: the watch may be behind its refreshes) is confirmed with the registry itself."""
        now = time.time()
        nse = self._nse.get(name)
        if nse is None or not self._nse_live or is_expired(nse, now):
            try:
                nse = await self.registry.get_nse(name)
            except RETRYABLE:
                if nse is None:
                    raise
        return nse if nse is not None and not is_expired(nse, now) else None

"""The manager watches the endpoints that registered through it, and unregisters one that died.

An endpoint killed without a chance to unregister (SIGKILL, OOM, its pod deleted) would stay in
the registry until its registration expires (up to the registration lifetime, 60 s by default),
and every manager would keep offering it to clients meanwhile. Its node's manager knows better:
the endpoint registered through it (:mod:`nsm.manager.proxy`), so it knows the endpoint's own
URL. :class:`EndpointLiveness` keeps one ``grpc.health.v1.Health/Watch`` stream to each such
endpoint (every daemon serves health, :mod:`nsm.transport`). When the stream breaks (or the
endpoint reports NOT_SERVING) and no new stream gets an answer within ``grace`` (1 s), the
endpoint is gone: ``on_gone(name)`` unregisters it on its behalf. A restarted endpoint registers
again by itself; that Register waits for a removal in flight (:meth:`settle`), so it is never
undone by it.

Only an endpoint seen alive once is ever removed: a manager that cannot reach an endpoint's URL
at all (the forwarder can, the manager cannot) leaves it to the registration's expiry. An
endpoint without a health service (not ours) is watched no further.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nsm.log import get_logger
from nsm.retry import Backoff
from nsm.security.tls import Security
from nsm.transport import dial

log = get_logger("nsm.manager.alive")

#: How long an endpoint may be unreachable before it is taken for dead.
DEFAULT_GRACE = 1.0

SERVING = health_pb2.HealthCheckResponse.SERVING


@dataclass(eq=False)
class _Watch:
    name: str
    url: str
    task: asyncio.Task[None] | None = None
    channel: grpc.aio.Channel | None = None
    #: Its health stream answers SERVING now.
    alive: bool = False
    #: It answered SERVING at least once.
    seen: bool = False
    #: Removing it from the registry now (a Register of the same name waits for it).
    removing: bool = False


class EndpointLiveness:
    """Health watches of the endpoints registered through this manager, by name (see the
    module). ``on_gone(name)`` removes a dead one; ``give_up``: seconds after which an endpoint
    never reached is watched no further."""

    def __init__(self, on_gone: Callable[[str], Awaitable[None]], *, grace: float = DEFAULT_GRACE,
                 give_up: float = 10.0, min_delay: float = 0.05, max_delay: float = 0.5,
                 security: Security | None = None) -> None:
        self.security = security
        if not grace > 0:
            raise ValueError(f"grace must be positive, not {grace}")
        Backoff(min_delay, max_delay)  # checks the bounds now
        self.on_gone = on_gone
        self.grace = grace
        self.give_up = give_up
        self.min_delay, self.max_delay = min_delay, max_delay
        self._watches: dict[str, _Watch] = {}

    def watched(self) -> list[str]:
        """Names of the endpoints watched now."""
        return sorted(self._watches)

    def watch(self, name: str, url: str) -> None:
        """The endpoint ``name`` registered (or refreshed) at ``url``: watch it, unless it is
        watched there already and alive."""
        old = self._watches.get(name)
        if old is not None and old.url == url and old.alive and not old.removing:
            return
        self._end(old)
        w = self._watches[name] = _Watch(name, url)
        w.task = asyncio.get_running_loop().create_task(self._run(w), name=f"nse-alive:{name}")

    async def settle(self, name: str) -> None:
        """Before ``name`` registers again: let a removal of it in flight finish first."""
        w = self._watches.get(name)
        if w is not None and w.removing and w.task is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.shield(w.task)

    def forget(self, name: str) -> None:
        """Stop watching ``name`` (it unregistered)."""
        self._end(self._watches.get(name))

    async def shutdown(self) -> None:
        watches, self._watches = list(self._watches.values()), {}
        tasks = [w.task for w in watches if w.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _end(self, w: _Watch | None) -> None:
        if w is None or w.removing:
            return
        if self._watches.get(w.name) is w:
            del self._watches[w.name]
        if w.task is not None:
            w.task.cancel()

    async def _run(self, w: _Watch) -> None:
        backoff = Backoff(self.min_delay, self.max_delay)
        started = lost_at = time.monotonic()
        try:
            while True:
                answered, reason = await self._stream(w)
                if reason is None:
                    return  # no health service there: nothing to tell
                now = time.monotonic()
                if answered:
                    lost_at = now
                    backoff.reset()
                    log.info("endpoint unreachable", nse=w.name, url=w.url, reason=reason)
                if not w.seen and now - started >= self.give_up:
                    log.info("endpoint never reached: leaving it to its registration's expiry",
                             nse=w.name, url=w.url, reason=reason)
                    return
                if w.seen and now - lost_at >= self.grace:
                    w.removing = True
                    log.warning("endpoint gone without unregistering: unregistering it",
                                nse=w.name, url=w.url, reason=reason,
                                unreachable_for=round(now - lost_at, 3))
                    await self.on_gone(w.name)
                    return
                await self._close_channel(w)  # a new channel connects at once
                await asyncio.sleep(backoff.next_delay())
        finally:
            if self._watches.get(w.name) is w:
                del self._watches[w.name]
            await self._close_channel(w)

    async def _stream(self, w: _Watch) -> tuple[bool, str | None]:
        """Watch until the stream ends: (whether it answered SERVING, why it ended; None when
        the endpoint has no health service)."""
        if w.channel is None:
            w.channel = dial(w.url, self.security)
        call = health_pb2_grpc.HealthStub(w.channel).Watch(health_pb2.HealthCheckRequest(service=""))
        answered = False
        try:
            while (response := await call.read()) is not grpc.aio.EOF:
                w.alive = response.status == SERVING
                if not w.alive:
                    name = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
                    return answered, f"it reports {name}"
                answered = w.seen = True
            return answered, "the health stream ended"
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                return answered, None
            return answered, f"{exc.code().name}: {exc.details()}"
        finally:
            w.alive = False
            call.cancel()

    @staticmethod
    async def _close_channel(w: _Watch) -> None:
        channel, w.channel = w.channel, None
        if channel is not None:
            with contextlib.suppress(Exception):
                await channel.close()

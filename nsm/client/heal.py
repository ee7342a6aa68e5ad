"""heal (client side): notices that a connection broke and heals it, from the control plane (the
manager's monitor stream) and from the data plane (a liveness probe from the client's namespace).

The client is the only hop that heals; every hop below only *reports* (a passthrough hop watches
its next hop and publishes its own view of a connection DOWN when that hop goes away or reports
it DOWN; Close and expiry publish DELETE). :class:`Heal` is a :class:`~nsm.client.hooks.Hook` of
the client chain (``client_chain(heal=...)``), used by the SDK's ``Client``, ``nsm nsc`` and
:class:`~nsm.client.chain.Connections` alike.

**Control-plane trigger.** ONE ``MonitorConnections`` stream to the manager per chain, however
many connections it holds, with one fixed selector: this client's path segment *name*. The
manager then streams exactly this client's connections (each carries our segment), keyed by its
own segment id, and each is picked locally by that id (the second segment of the path we got
back), so adding or removing a connection never reopens the stream. A connection is in trouble
when the stream breaks (any error but a watcher dropped for falling behind or a manager without
a monitor; the stream reconnects with backoff), when the manager does not know it in the
snapshot after a (re)connect (it restarted), or when it reports it DOWN or DELETEs it while we
did not close it.

**Data-plane trigger.** Every ``interval`` (200 ms) a :class:`Probe` checks each live connection
from inside the client's namespace, bounded by ``timeout`` (1 s); one failed check triggers a
heal, unless an event of the connection was in flight meanwhile (a hop rebuilding the interface
makes it missing for a moment): then it is checked again. The default probe
(:class:`KernelProbe`) checks the KERNEL interface (there, up, with
carrier) and pings the connection's IPv4 destination addresses from the namespace.

**Decision**, per connection, before every try (the probe is run again unless already failed):

============================================  ==================  ===============  ==============
trouble                                        data plane alive    data plane dead  no probe
============================================  ==================  ===============  ==============
stream broke / the manager does not know it    REFRESH             RESELECT         REFRESH
the manager reports it DOWN or DELETEs it      REFRESH, then       RESELECT         RESELECT
                                               RESELECT if that
                                               fails while the
                                               manager answers,
                                               unless only a hop
                                               on the way is out
the data-plane check failed                    —                   RESELECT         —
============================================  ==================  ===============  ==============

REFRESH re-requests the same path (every hop keeps what it built: no packet lost); RESELECT
closes the old path (best effort, for at most ``reselect_close_timeout``: a hop on a node cut
off answers nothing), clears the mechanism and requests afresh with
``state=RESELECT_REQUESTED`` and the old endpoint's name, which the manager tries last
(:class:`~nsm.client.begin.ClientBegin`). A manager that restarts
breaks the stream of every connection: each is re-requested on its own path (REFRESH) until the
manager answers, never reselected while its data plane is alive. A DOWN with a live data plane
is first taken for a hop that restarts (re-request); when the manager answers and the re-request
still fails because of the endpoint (the forwarder before it cannot reach it:
:class:`~nsm.errors.EndpointUnreachable`, as for an endpoint process that died while its
namespace still answers pings; or a hop refused the Request), it reselects. A re-request that
fails only because a manager or forwarder on the way cannot be reached or does not answer in
time (UNAVAILABLE, DEADLINE_EXCEEDED: it restarts) is tried again until that hop is back: the
kernel carries the traffic meanwhile, and a reselect would cut it.

**Tries**: one heal in flight per connection (a new trigger only updates what it knows), each
try bounded by ``try_timeout`` (a re-request also by the data plane: checked meanwhile and found
dead twice in a row, it is given up for a reselect at once), tries continuous with
:class:`nsm.retry.Backoff` (100 ms doubling up to 1 s) until healed or closed, and at most
``concurrency`` tries of all connections at once. Every heal is a
:class:`~nsm.client.notify.State` change: DOWN when it starts (the reason says what broke and
what the heal does), FAILED for each failed try, HEALED when it succeeds. Close stops everything
of the connection; :meth:`Heal.shutdown` every task.

**Adoption** (:func:`find_connection`): a client that restarts with a stable connection id asks
the manager's monitor for it and, when its interface is still in the namespace, re-requests that
connection on its own path instead of building a second one (:meth:`Connections.adopt`).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc

from nsm.api import connection_pb2
from nsm.api.connection_pb2 import (
    DELETE,
    DOWN,
    INITIAL_STATE_TRANSFER,
    UP,
    Connection,
    MonitorScopeSelector,
    PathSegment,
)
from nsm.api.connection_pb2_grpc import MonitorConnectionStub
from nsm.chain import Ctx, NextClose
from nsm.client.begin import EVENT, EVENTS, Events, Kind
from nsm.client.hooks import Hook
from nsm.errors import (
    DeadlineExceeded,
    EndpointUnreachable,
    InvalidArgument,
    NsmError,
    Unavailable,
    from_rpc_error,
)
from nsm.kernel.liveness import Liveness, target_of
from nsm.kernel.netns import interface_flags, run_in_netns
from nsm.log import Logger, get_logger
from nsm.retry import Backoff

#: The reference's defaults (cmd-nsc): a liveness check every 200 ms, 1 s for each.
DEFAULT_INTERVAL = 0.2
DEFAULT_TIMEOUT = 1.0
#: Heal tries: 100 ms after the first failure, doubling up to 1 s.
MIN_BACKOFF = 0.1
MAX_BACKOFF = 1.0
#: One try (a refresh, or a reselect's Close and Request) at most this long.
TRY_TIMEOUT = 5.0
#: A reselect's Close of the old path at most this long before the new Request goes out: a hop
#: on a node that was cut off answers nothing, and what it holds expires there.
RESELECT_CLOSE_TIMEOUT = 1.0
#: Dead data-plane checks in a row that give up a re-request in flight (the re-request itself
#: may be rebuilding the interface for a moment: one check says nothing then).
DIES_AFTER = 2
#: Tries of all connections of one chain in flight at once.
CONCURRENCY = 32
#: ICMP echoes spread over the timeout of one default check (any reply from each address: alive).
ECHOES = 4

#: Stream errors that say nothing about the connections: reconnect, and the snapshot tells.
NOT_A_FAULT = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNIMPLEMENTED})


# -- the data-plane check ---------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """What a probe found: ``alive`` True or False, or None when it cannot tell (nothing to check
    from here); ``reason`` says why it is dead or unknown."""

    alive: bool | None
    reason: str = ""


class Probe(Protocol):
    """A data-plane check of one client connection, bounded by ``timeout`` seconds. Never raises
    for a dead data plane (that is ``Verdict(False, reason)``). Owned by whoever made it (a
    :class:`Heal` does not close it)."""

    async def __call__(self, conn: Connection, timeout: float) -> Verdict: ...


def _if_flags(ifname: str) -> int | None:
    """The interface's flags in the calling thread's namespace; None when there is none."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        return interface_flags(s.fileno(), ifname)


class KernelProbe:
    """The built-in data-plane check, :class:`nsm.kernel.liveness.Liveness` (one per probe,
    hence one per client chain: one ICMP socket per namespace and family, driven by the event
    loop, no thread per check): the interface is there, up and has carrier, then every
    destination address of the families the client has answers an echo (up to ``echoes``
    spread over the timeout). A connection with no KERNEL interface cannot be checked
    (``Verdict(None)``)."""

    def __init__(self, *, echoes: int = ECHOES) -> None:
        if echoes < 1:
            raise InvalidArgument(f"echoes must be at least 1, not {echoes}")
        self.echoes = echoes
        self._liveness: Liveness | None = None

    async def __call__(self, conn: Connection, timeout: float) -> Verdict:
        target = target_of(conn)
        if target is None:
            return Verdict(None, "no kernel interface to check")
        if self._liveness is None:
            self._liveness = Liveness()
        try:
            result = await self._liveness.check(target.netns, target.addresses, ifname=target.ifname,
                                                timeout=timeout, echoes=self.echoes)
        except NsmError as exc:  # the namespace is not one, or checks cannot run here
            return Verdict(False, exc.message)
        return Verdict(result.alive, result.reason)

    async def close(self) -> None:
        liveness, self._liveness = self._liveness, None
        if liveness is not None:
            await liveness.close()


async def interface_present(netns: str, ifname: str) -> bool:
    """Whether ``ifname`` exists in the namespace at path ``netns``."""
    try:
        return await asyncio.to_thread(run_in_netns, netns, _if_flags, ifname) is not None
    except NsmError:
        return False


def passing_outage(exc: NsmError) -> bool:
    """Whether a failed re-request says only that a hop on the way could not be reached or did
    not answer in time (a manager or forwarder restarting: the kernel still carries the
    traffic, and the hop will be back), not that the endpoint is gone or refused."""
    return isinstance(exc, Unavailable | DeadlineExceeded) and not isinstance(exc, EndpointUnreachable)


class _DataPlaneDied(Exception):
    """A re-request was given up: the data plane died meanwhile (the message says how)."""


# -- options --------------------------------------------------------------------------------


@dataclass(frozen=True)
class HealOptions:
    """How a client chain heals (see the module). ``liveness``: check the data plane at all,
    every ``interval`` seconds, each check bounded by ``timeout``, with ``probe`` (default
    :class:`KernelProbe`). Tries: ``min_backoff``..``max_backoff`` apart, each bounded by
    ``try_timeout``, at most ``concurrency`` at once; a reselect's Close of the old path at
    most ``reselect_close_timeout``."""

    liveness: bool = True
    interval: float = DEFAULT_INTERVAL
    timeout: float = DEFAULT_TIMEOUT
    probe: Probe | None = None
    min_backoff: float = MIN_BACKOFF
    max_backoff: float = MAX_BACKOFF
    try_timeout: float = TRY_TIMEOUT
    concurrency: int = CONCURRENCY
    reselect_close_timeout: float = RESELECT_CLOSE_TIMEOUT

    def __post_init__(self) -> None:
        for what in ("interval", "timeout", "try_timeout", "reselect_close_timeout"):
            value = getattr(self, what)
            if not value > 0:
                raise InvalidArgument(f"heal {what.replace('_', ' ')} must be positive, not {value}")
        if not 0 < self.min_backoff <= self.max_backoff:
            raise InvalidArgument(f"heal backoff needs 0 < min <= max, not "
                                  f"{self.min_backoff}..{self.max_backoff}")
        if self.concurrency < 1:
            raise InvalidArgument(f"heal concurrency must be at least 1, not {self.concurrency}")


# -- the element ----------------------------------------------------------------------------


def _copy(conn: Connection) -> Connection:
    out = Connection()
    out.CopyFrom(conn)
    return out


def manager_id(conn: Connection) -> str:
    """The manager's segment id in a client's connection (its key in the manager's events)."""
    segments = conn.path.path_segments
    return segments[1].id if len(segments) > 1 else ""


@dataclass(eq=False)
class _Watch:
    """One live connection: what is known to be wrong with it, and its two tasks."""

    conn_id: str
    events: Events
    conn: Connection
    log: Logger
    manager_id: str = ""
    #: The stream attempt during which the last Request succeeded.
    seen: int = 0
    #: The control plane is lost: the stream broke, or the manager does not know the connection.
    lost: str = ""
    #: The manager reports the path DOWN, or closed it.
    down: str = ""
    #: The data-plane check failed (only a new path helps).
    dead: str = ""
    #: Re-requesting a path reported DOWN failed while the manager answered: reselect.
    escalated: str = ""
    probe: asyncio.Task[None] | None = None
    heal: asyncio.Task[None] | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def broken(self) -> bool:
        return bool(self.lost or self.down or self.dead or self.escalated)


class Heal(Hook):
    """The heal element (see the module): ``name`` is this client's path segment name,
    ``channel`` gives the channel to the manager (for its monitor)."""

    def __init__(self, *, name: str, channel: Callable[[], grpc.aio.Channel],
                 options: HealOptions | None = None) -> None:
        self.name = name
        self.options = options or HealOptions()
        self.probe: Probe | None = ((self.options.probe or KernelProbe()) if self.options.liveness
                                    else None)
        self.selector = MonitorScopeSelector(path_segments=[PathSegment(name=name)])
        self._channel = channel
        self._watches: dict[str, _Watch] = {}
        self._by_manager_id: dict[str, _Watch] = {}
        self._stream: asyncio.Task[None] | None = None
        self._attempt = 0
        self._stream_up = False
        self._slots = asyncio.Semaphore(self.options.concurrency)
        self._tasks: set[asyncio.Task[Any]] = set()
        self.log = get_logger("nsm.client.heal").bind(name=name)

    # -- diagnostics ----------------------------------------------------------------------

    def watched(self) -> int:
        """Connections watched now."""
        return len(self._watches)

    def healing(self) -> list[str]:
        """Ids of the connections with a heal in flight."""
        return [w.conn_id for w in self._watches.values() if w.heal is not None and not w.heal.done()]

    def streams(self) -> int:
        """Monitor streams to the manager open or reconnecting (0 or 1)."""
        return int(self._stream is not None and not self._stream.done())

    @property
    def stream_up(self) -> bool:
        """Whether the monitor stream has its snapshot and has not broken since."""
        return self._stream_up

    # -- the chain ------------------------------------------------------------------------

    async def on_update(self, ctx: Ctx, conn: Connection) -> None:
        events = ctx.meta.get(EVENTS)
        if events is None:
            return
        event = ctx.meta.get(EVENT)
        w = self._watches.get(ctx.conn_id)
        if w is None:
            w = self._watches[ctx.conn_id] = _Watch(ctx.conn_id, events, _copy(conn), ctx.log)
        w.conn, w.log = _copy(conn), ctx.log
        self._map(w, manager_id(conn))
        w.seen = self._attempt
        w.lost = w.down = w.escalated = ""
        if event is None or event.kind is not Kind.REFRESH:
            w.dead = ""  # a new path; a refresh of the same one does not mend the data plane
        self._ensure_stream()
        if w.broken():
            self._heal_now(w)
            return
        if w.heal is not None and w.heal is not asyncio.current_task():
            w.heal.cancel()  # another event mended it (a refresh, the caller's request)
            w.heal = None
        self._start_probe(w)

    async def close(self, ctx: Ctx, conn: Connection, next: NextClose) -> None:
        event = ctx.meta.get(EVENT)
        w = self._watches.get(ctx.conn_id)
        if w is not None:
            self._map(w, "")  # what the manager reports about this path now is our own doing
            if event is None or event.kind is not Kind.RESELECT:
                self._forget(w)
        try:
            await next(ctx, conn)
        finally:
            if not self._watches:
                await self._stop_stream()

    async def shutdown(self) -> None:
        watches = list(self._watches.values())
        self._watches.clear()
        self._by_manager_id.clear()
        for w in watches:
            w.probe = w.heal = None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._stream = None
        self._stream_up = False
        close = getattr(self.probe, "close", None)
        if close is not None:
            await close()

    # -- bookkeeping ----------------------------------------------------------------------

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _map(self, w: _Watch, mid: str) -> None:
        if w.manager_id and self._by_manager_id.get(w.manager_id) is w:
            del self._by_manager_id[w.manager_id]
        w.manager_id = mid
        if mid:
            self._by_manager_id[mid] = w

    def _forget(self, w: _Watch) -> None:
        if self._watches.get(w.conn_id) is w:
            del self._watches[w.conn_id]
        self._map(w, "")
        current = asyncio.current_task()
        for task in (w.probe, w.heal):
            if task is not None and task is not current:
                task.cancel()
        w.probe = w.heal = None

    def _active(self, w: _Watch) -> bool:
        return self._watches.get(w.conn_id) is w

    # -- triggers -------------------------------------------------------------------------

    def _trigger(self, w: _Watch, *, lost: str = "", down: str = "", dead: str = "",
                 now: bool = False) -> None:
        """Something is wrong with the connection: note it and heal (one heal in flight; ``now``:
        its next try without waiting for the backoff, e.g. when the manager is back)."""
        if not self._active(w):
            return
        new = False
        for attr, value in (("lost", lost), ("down", down), ("dead", dead)):
            if value and not getattr(w, attr):
                setattr(w, attr, value)
                new = True
        if new or now or w.heal is None or w.heal.done():
            if new:
                w.log.info("connection in trouble", trouble=lost or down or dead)
            self._heal_now(w)

    def _heal_now(self, w: _Watch) -> None:
        current = asyncio.current_task()
        if w.probe is not None and w.probe is not current:
            w.probe.cancel()  # the heal checks the data plane itself
        w.probe = None
        if w.heal is None or w.heal.done():
            w.heal = self._spawn(self._heal(w), f"nsc-heal:{w.conn_id}")
        else:
            w.wake.set()

    def _start_probe(self, w: _Watch) -> None:
        if self.probe is None or not self._active(w):
            return
        if w.probe is None or w.probe.done():
            w.probe = self._spawn(self._watch_data(w), f"nsc-liveness:{w.conn_id}")

    def _mended(self, w: _Watch) -> None:
        """The manager shows the connection UP: what the control plane said is over."""
        if not (w.lost or w.down or w.escalated):
            return
        w.lost = w.down = w.escalated = ""
        if w.heal is not None and not w.heal.done():
            w.wake.set()  # the heal ends unless the data plane is dead

    # -- the heal -------------------------------------------------------------------------

    async def _heal(self, w: _Watch) -> None:
        backoff = Backoff(self.options.min_backoff, self.options.max_backoff)
        try:
            while self._active(w) and w.broken():
                w.wake.clear()
                kind, reason = await self._decide(w)
                if not w.broken():
                    break  # mended while the data plane was checked
                error, result, endpoint_side = "", None, False
                async with self._slots:
                    try:
                        async with asyncio.timeout(self.options.try_timeout):
                            result = await self._try(w, kind, reason)
                    except NsmError as exc:
                        error = f"{exc.code.name}: {exc.message}"
                        endpoint_side = not passing_outage(exc)
                    except TimeoutError:
                        error = f"no answer within {self.options.try_timeout:g} s"
                    except _DataPlaneDied as exc:
                        w.log.info("the data plane died while re-requesting the same path",
                                   error=str(exc))
                        continue  # reselect at once
                if not error:
                    if result is None:
                        return  # closed meanwhile
                    backoff.reset()
                    continue  # healed: the update cleared what was wrong (unless still dead)
                if (kind is Kind.REFRESH and w.down and self._stream_up and endpoint_side
                        and not w.escalated):
                    w.escalated = f"{w.down}, and re-requesting the same path failed ({error})"
                delay = backoff.next_delay()
                w.log.debug("heal try failed", kind=kind.value, error=error, retry_in=round(delay, 3))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await w.wake.wait()
        finally:
            if w.heal is asyncio.current_task():
                w.heal = None
            if self._active(w) and not w.broken():
                self._start_probe(w)

    async def _try(self, w: _Watch, kind: Kind, reason: str) -> Connection | None:
        """One try. A re-request of the same path (which may hang on a hop that is gone: a
        lost node's address black-holes the connect) is given up as soon as the data plane is
        found dead meanwhile (``_DataPlaneDied``): only a new path helps then."""
        if kind is not Kind.REFRESH or self.probe is None:
            return await w.events.request(kind, reason=reason, heal=True,
                                          close_timeout=self.options.reselect_close_timeout)
        request = asyncio.ensure_future(w.events.request(kind, reason=reason, heal=True))
        dies = asyncio.ensure_future(self._dies(w.conn))
        try:
            await asyncio.wait({request, dies}, return_when=asyncio.FIRST_COMPLETED)
            if request.done():
                return request.result()
            w.dead = dies.result()
            raise _DataPlaneDied(w.dead)
        finally:
            for task in (dies, request):
                if not task.done():
                    task.cancel()
            await asyncio.gather(dies, request, return_exceptions=True)

    async def _dies(self, conn: Connection) -> str:
        """Check the data plane every ``interval`` until it is found dead :data:`DIES_AFTER`
        times in a row (the re-request in flight may rebuild the interface: a hop that differs
        from what an earlier run of it built); why."""
        dead = 0
        while True:
            await asyncio.sleep(self.options.interval)
            verdict = await self._check(conn)
            dead = dead + 1 if verdict.alive is False else 0
            if dead >= DIES_AFTER:
                return verdict.reason

    async def _decide(self, w: _Watch) -> tuple[Kind, str]:
        if w.escalated:
            return Kind.RESELECT, f"{w.escalated}: reselecting"
        if w.dead:
            return Kind.RESELECT, f"data plane: {w.dead}: reselecting"
        trouble = w.down or w.lost
        if self.probe is None:
            if w.down:
                return Kind.RESELECT, f"{trouble}; no data-plane check: reselecting"
            return Kind.REFRESH, f"{trouble}: re-requesting the same path"
        verdict = await self._settled_check(w)
        if verdict.alive is False:
            w.dead = verdict.reason
            return Kind.RESELECT, f"{trouble}; data plane: {verdict.reason}: reselecting"
        if verdict.alive is None and w.down:
            return Kind.RESELECT, f"{trouble}; data plane: {verdict.reason}: reselecting"
        return Kind.REFRESH, f"{trouble}; data plane alive: re-requesting the same path"

    async def _check(self, conn: Connection) -> Verdict:
        assert self.probe is not None
        timeout = self.options.timeout
        try:
            async with asyncio.timeout(timeout * 2 + 1):
                return await self.probe(conn, timeout)
        except TimeoutError:
            return Verdict(False, f"the liveness check did not end within {timeout * 2 + 1:g} s")
        except Exception as exc:  # a broken probe must not stop the heal
            self.log.warning("liveness probe failed", error=repr(exc))
            return Verdict(None, f"the liveness probe failed: {exc!r}")

    async def _settled_check(self, w: _Watch) -> Verdict:
        """A data-plane check of the connection; one that found it dead counts only when no
        event of the connection was in flight meanwhile (:meth:`Events.quiet`: a Request may be
        rebuilding its interface — a restarted forwarder finding it changed — and a check in
        that moment finds it missing); else it is checked again, after ``interval``."""
        while True:
            before = w.events.quiet()
            verdict = await self._check(w.conn)
            if verdict.alive is not False or (before is not None and w.events.quiet() == before):
                return verdict
            w.log.debug("data plane looked dead while an event was in flight: checking again",
                        reason=verdict.reason)
            await asyncio.sleep(self.options.interval)

    async def _watch_data(self, w: _Watch) -> None:
        while True:
            await asyncio.sleep(self.options.interval)
            conn = w.conn
            verdict = await self._settled_check(w)
            if verdict.alive is False and self._active(w) and w.conn is conn:
                if w.probe is asyncio.current_task():
                    w.probe = None
                self._trigger(w, dead=verdict.reason)
                return

    # -- the monitor stream ---------------------------------------------------------------

    def _ensure_stream(self) -> None:
        if self._stream is None or self._stream.done():
            self._stream = self._spawn(self._monitor(), f"nsc-monitor:{self.name}")

    async def _stop_stream(self) -> None:
        task, self._stream = self._stream, None
        if task is None or task is asyncio.current_task():
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _monitor(self) -> None:
        backoff = Backoff(self.options.min_backoff, self.options.max_backoff)
        lost = told = False
        while self._watches:
            self._attempt += 1
            attempt = self._attempt
            call = MonitorConnectionStub(self._channel()).MonitorConnections(self.selector)
            reason, fault = "the stream ended", True
            try:
                while (event := await call.read()) is not grpc.aio.EOF:
                    assert isinstance(event, connection_pb2.ConnectionEvent)
                    if event.type == INITIAL_STATE_TRANSFER:
                        self._stream_up = True
                        backoff.reset()
                        if lost:
                            self.log.info("monitor stream to the manager is back")
                        lost = False
                        self._snapshot(event, attempt)
                    else:
                        self._changed(event)
            except grpc.aio.AioRpcError as exc:
                reason = f"{exc.code().name}: {exc.details()}"
                fault = exc.code() not in NOT_A_FAULT
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED and not told:
                    told = True
                    self.log.info("the manager has no monitor: healing on the data plane only")
            finally:
                call.cancel()
                self._stream_up = False
            if fault:
                if not lost:
                    self.log.warning("lost the monitor stream to the manager", reason=reason,
                                     connections=len(self._watches))
                lost = True
                for w in list(self._watches.values()):
                    self._trigger(w, lost=f"control plane: the manager's monitor stream broke ({reason})")
            await backoff.sleep()

    def _ours(self, w: _Watch, conn: Connection) -> bool:
        segments = conn.path.path_segments
        return not segments or segments[0].id == w.conn_id

    def _snapshot(self, event: connection_pb2.ConnectionEvent, attempt: int) -> None:
        for w in list(self._watches.values()):
            if not w.manager_id:
                continue
            conn = event.connections.get(w.manager_id)
            if conn is None or not self._ours(w, conn):
                # Only if our last Request was before this stream began (else the snapshot may
                # predate it, and its UPDATE follows).
                if w.seen < attempt:
                    self._trigger(w, lost="control plane: the manager does not know the connection",
                                  now=True)
            elif conn.state == DOWN:
                self._trigger(w, down="the manager reports the connection DOWN")
            else:
                self._mended(w)

    def _changed(self, event: connection_pb2.ConnectionEvent) -> None:
        for key, conn in event.connections.items():
            w = self._by_manager_id.get(key)
            if w is None or not self._ours(w, conn):
                continue
            if event.type == DELETE:
                self._trigger(w, down="the manager closed the connection")
            elif conn.state == DOWN:
                self._trigger(w, down="the manager reports the connection DOWN")
            elif conn.state == UP:
                self._mended(w)


# -- adoption -------------------------------------------------------------------------------


async def find_connection(channel: grpc.aio.Channel, *, name: str, conn_id: str,
                          timeout: float = 5.0) -> Connection | None:
    """The manager's connection whose first path segment is this client's ``{name, conn_id}``
    (from its monitor's snapshot), as the client sees it (path index 0, id ``conn_id``); None
    when the manager does not know it or has no monitor."""
    selector = MonitorScopeSelector(path_segments=[PathSegment(name=name, id=conn_id)])
    call = MonitorConnectionStub(channel).MonitorConnections(selector, timeout=timeout)
    try:
        event = await call.read()
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
            return None
        raise from_rpc_error(exc, "the manager's monitor") from exc
    finally:
        call.cancel()
    if event is grpc.aio.EOF:
        return None
    assert isinstance(event, connection_pb2.ConnectionEvent)
    for conn in event.connections.values():
        segments = conn.path.path_segments
        if segments and segments[0].id == conn_id and segments[0].name == name:
            view = _copy(conn)
            view.path.index = 0
            view.id = conn_id
            return view
    return None

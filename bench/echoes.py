"""Steady ICMP echo traffic through many connections at once, for the heal benchmark and the chaos
soak: one thread drives every :class:`Flow` (one raw socket per flow, made inside the flow's pod
namespace), each flow sending ``rate`` echoes a second to its connection's destination, which the
caller may change at any time (a healed connection may have new addresses). Every echo keeps when
it was sent, where to, and when its reply came, so that what a fault cost is read afterwards:
echoes lost, when traffic came back, the longest time without replies.

Times are ``time.monotonic()`` seconds. A reply counts for the echo it answers (identifier,
sequence number, source address = that echo's destination), whenever it comes before
:meth:`Echoes.stop`.
"""

from __future__ import annotations

import bisect
import os
import random
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from nsm.kernel.netns import run_in_netns
from nsm.kernel.ping import echo_request, readable

#: Bytes of each echo's payload.
PAYLOAD = b"nsm-bench-heal!!"


@dataclass
class Echo:
    sent: float
    dst: str
    answered: float | None = None


@dataclass(eq=False)
class Flow:
    """The echoes of one connection. ``dst`` is where the next echo goes."""

    name: str
    netns: str
    dst: str
    rate: float
    echoes: list[Echo] = field(default_factory=list)
    errors: list[tuple[float, str]] = field(default_factory=list)
    ident: int = 0
    sock: socket.socket | None = None
    next_at: float = 0.0
    #: Set by :meth:`pause`: no more echoes (replies to earlier ones still count).
    paused: float | None = None
    _by_seq: dict[int, Echo] = field(default_factory=dict)
    _sent_times: list[float] = field(default_factory=list)

    # -- what it saw (call while it runs or after stop) -----------------------------------

    def between(self, t0: float, t1: float | None = None) -> Iterator[Echo]:
        """Echoes sent in ``[t0, t1)`` (to now when ``t1`` is None), oldest first."""
        times = self._sent_times
        lo = bisect.bisect_left(times, t0)
        hi = len(times) if t1 is None else bisect.bisect_left(times, t1)
        return iter(self.echoes[lo:hi])

    def lost(self, t0: float, t1: float | None = None) -> int:
        """Echoes sent in ``[t0, t1)`` that have no reply (yet)."""
        return sum(1 for e in self.between(t0, t1) if e.answered is None)

    def replies(self, t0: float, t1: float | None = None, dst: str | None = None) -> int:
        return sum(1 for e in self.between(t0, t1)
                   if e.answered is not None and (dst is None or e.dst == dst))

    def first_reply(self, t0: float, dst: str | None = None) -> float | None:
        """When the first reply came to an echo sent at ``t0`` or later (to ``dst``, if given)."""
        found = [e.answered for e in self.between(t0)
                 if e.answered is not None and (dst is None or e.dst == dst)]
        return min(found) if found else None

    def last_loss(self, t0: float, t1: float | None = None) -> float | None:
        """When the last echo sent in ``[t0, t1)`` that got no reply was sent."""
        last = None
        for e in self.between(t0, t1):
            if e.answered is None:
                last = e.sent
        return last

    def restored(self, t0: float, t1: float | None = None) -> float | None:
        """When traffic was back for good after ``t0``: ``t0`` when nothing sent in ``[t0, t1)``
        was lost, else the first reply to an echo sent after the last lost one (None: not
        yet)."""
        last = self.last_loss(t0, t1)
        if last is None:
            return t0
        return self.first_reply(last + 1e-9)

    def longest_gap(self, t0: float, t1: float | None = None) -> float:
        """The longest time between two answered echoes sent in ``[t0, t1)`` (by send time),
        also from ``t0`` to the first one; the whole span when none was answered."""
        end = t1 if t1 is not None else (self.echoes[-1].sent if self.echoes else t0)
        previous, gap = t0, 0.0
        for e in self.between(t0, t1):
            if e.answered is not None:
                gap = max(gap, e.sent - previous)
                previous = e.sent
        return max(gap, end - previous)

    def healthy(self, window: float = 0.5) -> bool:
        """Whether every echo of the last ``window`` seconds that had time to be answered
        (sent ``3 / rate`` s ago or earlier) was, and there was at least one."""
        now = time.monotonic()
        recent = list(self.between(now - window - 3 / self.rate, now - 3 / self.rate))
        return bool(recent) and all(e.answered is not None and e.dst == self.dst for e in recent)

    def pause(self) -> float:
        """Send no more echoes from now on (replies still count); returns when it stopped."""
        if self.paused is None:
            self.paused = time.monotonic()
        return self.paused

    # -- driven by Echoes' thread ---------------------------------------------------------

    def _send(self, now: float) -> None:
        echo = Echo(now, self.dst)
        seq = len(self.echoes) % 0xFFFF + 1
        self.echoes.append(echo)
        self._sent_times.append(now)
        self._by_seq[seq] = echo
        assert self.sock is not None
        try:
            self.sock.sendto(echo_request(self.ident, seq, PAYLOAD), (echo.dst, 0))
        except OSError as exc:
            self.errors.append((now, exc.strerror or str(exc)))

    def _receive(self) -> None:
        while self.sock is not None:
            try:
                data, addr = self.sock.recvfrom(2048)
            except OSError:  # nothing more queued (or the socket was closed meanwhile)
                return
            ihl = (data[0] & 0x0F) * 4
            if len(data) < ihl + 8:
                continue
            kind, _, _, ident, seq = struct.unpack("!BBHHH", data[ihl:ihl + 8])
            echo = self._by_seq.get(seq)
            if kind == 0 and ident == self.ident and echo is not None and addr[0] == echo.dst \
                    and echo.answered is None:
                echo.answered = time.monotonic()


def _raw_icmp() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    sock.setblocking(False)
    return sock


class Echoes:
    """One thread sending and receiving the echoes of every flow (``add`` them before or while
    it runs); :meth:`stop` ends it and closes the sockets (they pin the pods' namespaces)."""

    def __init__(self) -> None:
        self.flows: list[Flow] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._idents = random.Random(os.getpid() ^ id(self))
        self.error: BaseException | None = None

    def add(self, name: str, netns: str, dst: str, rate: float) -> Flow:
        """A new flow from the namespace ``netns`` (a path), starting now."""
        if not rate > 0:
            raise ValueError(f"rate must be positive, not {rate}")
        flow = Flow(name, netns, dst, rate, ident=self._idents.randrange(1, 0xFFFF))
        flow.sock = run_in_netns(netns, _raw_icmp)
        flow.next_at = time.monotonic()
        with self._lock:
            self.flows.append(flow)
        return flow

    def remove(self, flow: Flow) -> None:
        """Stop a flow (its echoes stay readable) and close its socket."""
        with self._lock:
            if flow in self.flows:
                self.flows.remove(flow)
        if flow.sock is not None:
            flow.sock.close()
            flow.sock = None

    def start(self) -> Echoes:
        self._thread = threading.Thread(target=self._loop, name="bench-echoes", daemon=True)
        self._thread.start()
        return self

    def stop(self, linger: float = 1.0) -> None:
        """Stop sending, wait ``linger`` s for the last replies, close every socket."""
        if self._thread is not None and self._thread.is_alive():
            with self._lock:
                for flow in self.flows:
                    flow.pause()
            time.sleep(linger)
            self._stop.set()
            self._thread.join(5)
        for flow in list(self.flows):
            self.remove(flow)

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                with self._lock:
                    flows = list(self.flows)
                now = time.monotonic()
                for flow in flows:
                    if now >= flow.next_at and flow.paused is None:
                        flow._send(now)
                        # Late (a busy machine): catch up by at most one echo, never a burst.
                        flow.next_at = max(flow.next_at + 1 / flow.rate, now - 1 / flow.rate)
                wake = min((f.next_at for f in flows if f.paused is None), default=now + 0.05)
                socks = {f.sock: f for f in flows if f.sock is not None}
                timeout = min(max(0.0, wake - time.monotonic()), 0.05)
                try:
                    ready = readable(list(socks), timeout)
                except (OSError, ValueError):  # a socket closed by remove() meanwhile
                    continue
                for sock in ready:
                    socks[sock]._receive()
        except BaseException as exc:  # reported by the caller
            self.error = exc

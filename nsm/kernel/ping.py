"""A small ICMP echo client that runs inside a network namespace (raw socket, root), for the
demo and the tests: round-trip times, and the don't-fragment behaviour needed to check MTU;
:class:`EchoStream`, a steady stream of echoes counting the lost ones while a path is broken
and healed."""

from __future__ import annotations

import os
import select
import socket
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from nsm.kernel.netns import run_in_netns

IP_MTU_DISCOVER = 10
IP_PMTUDISC_DO = 2


@dataclass
class PingResult:
    dst: str
    sent: int = 0
    rtts_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    #: Sequence numbers (from 1) that got no reply in time.
    lost: list[int] = field(default_factory=list)

    @property
    def received(self) -> int:
        return len(self.rtts_ms)

    @property
    def loss(self) -> float:
        return 1.0 - self.received / self.sent if self.sent else 1.0


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def echo_request(ident: int, seq: int, payload: bytes) -> bytes:
    """An ICMP (IPv4) echo request with its checksum, for a raw socket."""
    header = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    return struct.pack("!BBHHH", 8, 0, checksum(header + payload), ident, seq) + payload


def readable(socks: Sequence[socket.socket], timeout: float) -> list[socket.socket]:
    """Those of ``socks`` with something to read, waiting at most ``timeout`` s: poll(2), not
    select(2), which fails for descriptors past FD_SETSIZE (1024) that a busy process has."""
    poller = select.poll()
    by_fd: dict[int, socket.socket] = {}
    for sock in socks:
        by_fd[sock.fileno()] = sock
        poller.register(sock, select.POLLIN)
    return [by_fd[fd] for fd, _ in poller.poll(max(timeout, 0.0) * 1000) if fd in by_fd]


def ping_here(dst: str, *, count: int = 3, size: int = 56, timeout: float = 1.0,
              interval: float = 0.05, dont_fragment: bool = False) -> PingResult:
    """Ping ``dst`` from the calling thread's namespace (IPv4). ``size`` is the ICMP payload."""
    result = PingResult(dst)
    ident = (os.getpid() ^ id(result)) & 0xFFFF
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    try:
        if dont_fragment:
            sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
        payload = bytes(i & 0xFF for i in range(size))
        for seq in range(1, count + 1):
            if seq > 1:
                time.sleep(interval)
            result.sent += 1
            start = time.perf_counter()
            try:
                sock.sendto(echo_request(ident, seq, payload), (dst, 0))
            except OSError as exc:
                result.errors.append(f"send: {exc.strerror or exc}")
                continue
            deadline = start + timeout
            answered = False
            late = 0
            while late < 64:
                # Past the deadline still read what is queued (boundedly): a reply that came in
                # time counts even if this thread was not scheduled until later.
                left = deadline - time.perf_counter()
                late += left <= 0
                if not readable([sock], max(left, 0.0)):
                    break
                data, addr = sock.recvfrom(65535)
                ihl = (data[0] & 0x0F) * 4
                kind, _, _, rid, rseq = struct.unpack("!BBHHH", data[ihl:ihl + 8])
                if kind == 0 and rid == ident and rseq == seq and addr[0] == dst:
                    result.rtts_ms.append((time.perf_counter() - start) * 1000)
                    answered = True
                    break
                if kind == 3 and data[ihl + 1] == 4:  # fragmentation needed
                    result.errors.append("fragmentation needed")
                    break
            if not answered:
                result.lost.append(seq)
    finally:
        sock.close()
    return result


def ping(netns: str, dst: str, **kwargs: object) -> PingResult:
    """Ping ``dst`` from inside the namespace at path ``netns``."""
    return run_in_netns(netns, ping_here, dst, **kwargs)  # type: ignore[arg-type]


@dataclass
class StreamResult:
    """What an :class:`EchoStream` saw: echoes sent, the sequence numbers never answered, and
    send errors (e.g. no route while an interface is gone); per echo (by index, seq - 1) when it
    was sent, where to, and when its reply came (monotonic clock)."""

    dst: str
    rate: float
    sent: int = 0
    lost: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    sent_at: list[float] = field(default_factory=list)
    dsts: list[str] = field(default_factory=list)
    answered_at: dict[int, float] = field(default_factory=dict)

    @property
    def received(self) -> int:
        return self.sent - len(self.lost)

    @property
    def longest_outage(self) -> float:
        """Seconds of the longest run of consecutive unanswered echoes."""
        longest = run = 0
        previous = None
        for seq in self.lost:
            run = run + 1 if previous is not None and seq == previous + 1 else 1
            longest = max(longest, run)
            previous = seq
        return longest / self.rate

    def lost_since(self, t: float) -> int:
        """Echoes sent at or after ``t`` that got no reply."""
        return sum(1 for i, at in enumerate(self.sent_at) if at >= t and i not in self.answered_at)

    def first_reply_after(self, t: float, dst: str | None = None) -> float | None:
        """When the first reply came to an echo sent at or after ``t`` (to ``dst``, if given)."""
        return first_reply(self.sent_at, self.dsts, self.answered_at, t, dst)

    def restored_after(self, t: float) -> float | None:
        """When replies came back after the first echo sent since ``t`` that got none (None:
        nothing was lost since ``t``, or nothing came back)."""
        lost = next((at for i, at in enumerate(self.sent_at) if at >= t and i not in self.answered_at),
                    None)
        return None if lost is None else self.first_reply_after(lost)


def first_reply(sent_at: list[float], dsts: list[str], answered_at: dict[int, float], t: float,
                dst: str | None = None) -> float | None:
    times = [answered_at[i] for i in list(answered_at)
             if sent_at[i] >= t and (dst is None or dsts[i] == dst)]
    return min(times) if times else None


class EchoStream:
    """A steady ICMP echo stream from inside a namespace (IPv4): ``rate`` echoes a second to
    ``dst`` from :meth:`start` until :meth:`stop`, replies matched by sequence number and
    source; an echo counts as lost if no reply came by the end (``linger`` seconds after the
    last one). :meth:`retarget` sends the next echoes elsewhere (a connection that moved to an
    endpoint with other addresses); :meth:`first_reply_after` looks at the replies while it
    runs. One raw socket in one thread that entered the namespace; a late scheduler does not
    make losses.
    """

    def __init__(self, netns: str, dst: str, *, rate: float = 50.0, linger: float = 1.0) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be positive, not {rate}")
        self.netns, self.dst, self.rate, self.linger = netns, dst, rate, linger
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._result: StreamResult | None = None
        self._error: BaseException | None = None
        # Appended by the stream's thread only (read while it runs).
        self._sent_at: list[float] = []
        self._dsts: list[str] = []
        self._answered_at: dict[int, float] = {}

    def start(self) -> EchoStream:
        def run() -> None:
            try:
                self._result = run_in_netns(self.netns, self._run)
            except BaseException as exc:  # handed to stop()
                self._error = exc

        self._thread = threading.Thread(target=run, name=f"echo-stream:{self.dst}", daemon=True)
        self._thread.start()
        return self

    def retarget(self, dst: str) -> None:
        """Send the next echoes to ``dst`` (replies to earlier ones still count)."""
        self.dst = dst

    def first_reply_after(self, t: float, dst: str | None = None) -> float | None:
        """While it runs: when the first reply came to an echo sent at or after ``t`` (to
        ``dst``, if given); None when none came yet."""
        return first_reply(self._sent_at, self._dsts, self._answered_at, t, dst)

    def seen(self, *, grace: float = 1.0) -> StreamResult:
        """While it runs: what it saw so far, as a result, without the echoes of the last
        ``grace`` seconds (their replies may still come)."""
        until = time.monotonic() - grace
        sent_at = [at for at in list(self._sent_at) if at <= until]
        answered = {i: at for i, at in list(self._answered_at.items()) if i < len(sent_at)}
        return StreamResult(self.dst, self.rate, sent=len(sent_at),
                            lost=[i + 1 for i in range(len(sent_at)) if i not in answered],
                            sent_at=sent_at, dsts=list(self._dsts[:len(sent_at)]),
                            answered_at=answered)

    def stop(self) -> StreamResult:
        """Stop sending, wait ``linger`` for the last replies; the result."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.linger + 10)
        if self._error is not None:
            raise self._error
        if self._result is None:
            raise RuntimeError(f"echo stream to {self.dst} did not finish")
        return self._result

    def _run(self) -> StreamResult:
        result = StreamResult(self.dst, self.rate, sent_at=self._sent_at, dsts=self._dsts,
                              answered_at=self._answered_at)
        ident = (os.getpid() ^ id(self)) & 0xFFFF
        index_of: dict[int, int] = {}  # seq -> index of the last echo sent with it
        interval = 1.0 / self.rate
        payload = bytes(range(56))
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        try:
            next_send = time.monotonic()
            end: float | None = None
            while True:
                now = time.monotonic()
                if end is None and self._stop.is_set():
                    end = now + self.linger
                if end is not None and now >= end:
                    break
                if end is None and now >= next_send:
                    seq = result.sent % 0xFFFF + 1
                    dst = self.dst
                    index_of[seq] = result.sent
                    result.sent += 1
                    self._sent_at.append(now)
                    self._dsts.append(dst)
                    try:
                        sock.sendto(echo_request(ident, seq, payload), (dst, 0))
                    except OSError as exc:
                        result.errors.append(f"send {result.sent}: {exc.strerror or exc}")
                    next_send += interval
                    continue
                wake = end if end is not None else next_send
                ready = readable([sock], max(0.0, min(wake - now, 0.05)))
                while ready:
                    data, addr = sock.recvfrom(65535)
                    ihl = (data[0] & 0x0F) * 4
                    kind, _, _, rid, rseq = struct.unpack("!BBHHH", data[ihl:ihl + 8])
                    index = index_of.get(rseq)
                    if (kind == 0 and rid == ident and index is not None
                            and addr[0] == self._dsts[index]):
                        self._answered_at.setdefault(index, time.monotonic())
                    ready = readable([sock], 0)
        finally:
            sock.close()
        result.lost = [i + 1 for i in range(result.sent) if i not in self._answered_at]
        return result

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
                ready, _, _ = select.select([sock], [], [], max(left, 0.0))
                if not ready:
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
    send errors (e.g. no route while an interface is gone)."""

    dst: str
    rate: float
    sent: int = 0
    lost: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

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


class EchoStream:
    """A steady ICMP echo stream from inside a namespace (IPv4): ``rate`` echoes a second to
    ``dst`` from :meth:`start` until :meth:`stop`, replies matched by sequence number; an echo
    counts as lost if no reply came by the end (``linger`` seconds after the last one). One raw
    socket in one thread that entered the namespace; a late scheduler does not make losses.
    """

    def __init__(self, netns: str, dst: str, *, rate: float = 50.0, linger: float = 1.0) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be positive, not {rate}")
        self.netns, self.dst, self.rate, self.linger = netns, dst, rate, linger
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._result: StreamResult | None = None
        self._error: BaseException | None = None

    def start(self) -> EchoStream:
        def run() -> None:
            try:
                self._result = run_in_netns(self.netns, self._run)
            except BaseException as exc:  # handed to stop()
                self._error = exc

        self._thread = threading.Thread(target=run, name=f"echo-stream:{self.dst}", daemon=True)
        self._thread.start()
        return self

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
        result = StreamResult(self.dst, self.rate)
        ident = (os.getpid() ^ id(self)) & 0xFFFF
        answered: set[int] = set()
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
                    result.sent += 1
                    try:
                        sock.sendto(echo_request(ident, seq, payload), (self.dst, 0))
                    except OSError as exc:
                        result.errors.append(f"send {result.sent}: {exc.strerror or exc}")
                    next_send += interval
                    continue
                wake = end if end is not None else next_send
                ready, _, _ = select.select([sock], [], [], max(0.0, min(wake - now, 0.05)))
                while ready:
                    data, addr = sock.recvfrom(65535)
                    ihl = (data[0] & 0x0F) * 4
                    kind, _, _, rid, rseq = struct.unpack("!BBHHH", data[ihl:ihl + 8])
                    if kind == 0 and rid == ident and addr[0] == self.dst:
                        answered.add(rseq)
                    ready, _, _ = select.select([sock], [], [], 0)
        finally:
            sock.close()
        result.lost = [n for n in range(1, result.sent + 1) if (n - 1) % 0xFFFF + 1 not in answered]
        return result

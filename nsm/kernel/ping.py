"""A small ICMP echo client that runs inside a network namespace (raw socket, root), for the
demo and the tests: round-trip times, and the don't-fragment behaviour needed to check MTU."""

from __future__ import annotations

import os
import select
import socket
import struct
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

"""Traffic between pods for tests and benchmarks: scapy ICMP echoes and ARP, raw Ethernet frames,
and a TCP echo — each synchronous, run in a thread that entered a pod's namespace
(:func:`nsm.kernel.netns.run_in_netns`; sockets belong to the namespace of the thread that made
them). Pings with round-trip times are :func:`nsm.kernel.ping.ping`.

scapy's configuration (interfaces, routes) is global to the process and is reloaded for the
calling thread's namespace on every use, so every scapy use here holds one lock: concurrent
callers take turns. scapy is imported on first use (it is a test dependency only).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from nsm.kernel.netns import run_in_netns

T = TypeVar("T")

#: scapy's configuration is process-global: so is the lock that serialises its users.
_SCAPY_LOCK = threading.Lock()


def _scapy() -> Any:
    """scapy, with its view of interfaces and routes refreshed for the calling thread's
    namespace (hold _SCAPY_LOCK)."""
    logging.getLogger("scapy.runtime").setLevel(logging.ERROR)
    import scapy.all as scapy

    scapy.conf.ifaces.reload()
    scapy.conf.route.resync()
    return scapy


def _locked(fn: Callable[..., T]) -> Callable[..., T]:
    def run(*args: Any) -> T:
        with _SCAPY_LOCK:
            return fn(*args)
    return run


def _icmp_echo(src: str, dst: str, ident: int, payload: bytes) -> dict[str, Any] | None:
    s = _scapy()
    # Through the kernel (raw IP socket): on a routed (IP payload) link the peer is a static
    # neighbour and nothing answers ARP/ND, so scapy's own L2 resolution would fall back to
    # broadcast, which a router drops. The mesh's routes are on-link /32s (/128s) without a
    # preferred source: give it explicitly.
    if ":" in dst:
        s.conf.route6.resync()
        iface = s.conf.route6.route(dst)[0]
        sock = s.L3RawSocket6(iface=iface)
        probe = s.IPv6(src=src, dst=dst) / s.ICMPv6EchoRequest(id=ident, seq=1, data=payload)
        ip, reply = s.IPv6, s.ICMPv6EchoReply
    else:
        iface = s.conf.route.route(dst)[0]
        sock = s.L3RawSocket(iface=iface)
        probe = s.IP(src=src, dst=dst) / s.ICMP(id=ident, seq=1) / s.Raw(payload)
        ip, reply = s.IP, s.ICMP
    try:
        answer = sock.sr1(probe, timeout=3, verbose=0)
    finally:
        sock.close()
    if answer is None or reply not in answer:
        return None
    if ip is s.IP:
        kind, data = answer[s.ICMP].type, bytes(answer[s.Raw].load) if s.Raw in answer else b""
    else:
        kind, data = 0, bytes(answer[reply].data)  # an echo reply: type 0 like ICMPv4's
    return {"src": answer[ip].src, "dst": answer[ip].dst, "type": kind, "id": answer[reply].id,
            "iface": iface, "payload": data}


#: ``icmp_echo(src, dst, ident, payload)``, in a thread inside the sender's namespace: one scapy
#: ICMP (or ICMPv6) echo from ``src`` to ``dst``; the reply's fields (src, dst, type, id, iface,
#: payload), or None without a reply in 3 s.
icmp_echo = _locked(_icmp_echo)


def _arp_who_has(iface: str, src: str, dst: str) -> dict[str, str] | None:
    s = _scapy()
    mac = s.get_if_hwaddr(iface)
    ans, _ = s.srp(s.Ether(dst="ff:ff:ff:ff:ff:ff", src=mac)
                   / s.ARP(op=1, hwsrc=mac, psrc=src, pdst=dst),
                   iface=iface, timeout=3, verbose=0)
    for _, reply in ans:
        if s.ARP in reply and reply[s.ARP].op == 2:
            return {"hwsrc": reply[s.ARP].hwsrc, "psrc": reply[s.ARP].psrc,
                    "pdst": reply[s.ARP].pdst, "ether_src": reply[s.Ether].src,
                    "ether_dst": reply[s.Ether].dst}
    return None


#: ``arp_who_has(iface, src, dst)``, in a thread inside the asker's namespace: an ARP who-has
#: ``dst`` on ``iface``; the reply's fields, or None.
arp_who_has = _locked(_arp_who_has)


def _l2_listener(iface: str, ethertype: int) -> Any:
    s = _scapy()
    return s.conf.L2listen(iface=iface, type=ethertype, promisc=False)


def _l2_send(iface: str, frames: Sequence[tuple[str, int, bytes]]) -> str:
    s = _scapy()
    mac = s.get_if_hwaddr(iface)
    for dst, ethertype, payload in frames:
        s.sendp(s.Ether(src=mac, dst=dst, type=ethertype) / s.Raw(payload), iface=iface, verbose=0)
    return str(mac)


def l2_frames_across(client_ns: str, client_if: str, server_ns: str, server_if: str,
                     frames: Sequence[tuple[str, int, bytes]], ethertype: int,
                     timeout: float = 3.0) -> tuple[str, list[dict[str, Any]]]:
    """Send raw Ethernet frames (dst MAC, EtherType, payload) with scapy's ``sendp`` from
    ``client_if`` and sniff EtherType ``ethertype`` on ``server_if``; returns the sender's MAC
    and what arrived."""
    with _SCAPY_LOCK:
        listener = run_in_netns(server_ns, _l2_listener, server_if, ethertype)
        try:
            mac = run_in_netns(client_ns, _l2_send, client_if, frames)
            import scapy.all as s

            got = s.sniff(opened_socket=listener, timeout=timeout, count=len(frames),
                          lfilter=lambda p: s.Ether in p and p[s.Ether].type == ethertype)
            return mac, [{"src": p[s.Ether].src, "dst": p[s.Ether].dst, "type": p[s.Ether].type,
                          "payload": bytes(p[s.Raw].load) if s.Raw in p else b""} for p in got]
        finally:
            listener.close()


def _family(addr: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def _listening(addr: str) -> socket.socket:
    srv = socket.create_server((addr, 0), family=_family(addr))
    srv.settimeout(10)
    return srv


def _echo_once(srv: socket.socket, errors: list[BaseException]) -> None:
    try:
        conn, _ = srv.accept()
        with conn:
            conn.settimeout(10)
            while data := conn.recv(65536):
                conn.sendall(data)
    except BaseException as exc:  # reported by the caller
        errors.append(exc)


def tcp_exchange(client_ns: str, server_ns: str, server_addr: str, size: int) -> bytes:
    """Echo ``size`` random bytes from a socket in ``client_ns`` off a server in ``server_ns``
    listening on ``server_addr``; returns what came back (AssertionError unless all of it)."""
    srv = run_in_netns(server_ns, _listening, server_addr)
    errors: list[BaseException] = []
    thread = threading.Thread(target=_echo_once, args=(srv, errors), daemon=True)
    thread.start()
    try:
        cli = run_in_netns(client_ns, socket.socket, _family(server_addr), socket.SOCK_STREAM)
        with cli:
            cli.settimeout(10)
            cli.connect((server_addr, srv.getsockname()[1]))
            payload = os.urandom(size)
            cli.sendall(payload)
            cli.shutdown(socket.SHUT_WR)
            received = bytearray()
            while chunk := cli.recv(65536):
                received += chunk
        thread.join(10)
        if thread.is_alive():
            raise AssertionError("TCP echo server did not finish")
        if errors:
            raise AssertionError(f"TCP echo server failed: {errors}")
        if bytes(received) != payload:
            raise AssertionError(f"echoed {len(received)} of {size} bytes, or different ones")
        return bytes(received)
    finally:
        srv.close()
        thread.join(5)

"""The client heals, with real daemons and traffic: a steady ICMP stream from the client pod
(50 echoes a second) counts what is lost while a fault is healed, and each test prints the time
from the fault to traffic restored.

Faults: the endpoint's pod gone (its process killed, its namespace deleted) with another endpoint
for the service (reselected) and without one (DOWN, retried until an endpoint appears); the
endpoint's process killed with its namespace kept (reselected once the hops report the path
DOWN); ``nsm-1`` set down in the client pod (the data-plane check finds it, a reselect rebuilds
the link); the manager killed and restarted (re-requested, never reselected: nothing lost, same
interface); ``nsm nsc`` killed and restarted with the same name (it adopts its connection: the
same interface, nothing lost)."""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import signal
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

import grpc
import pytest

from nsm.api import connection_pb2_grpc
from nsm.api.connection_pb2 import DOWN, Connection, ConnectionEvent, MonitorScopeSelector
from nsm.client.notify import State, StateChange
from nsm.client.sdk import Client
from nsm.kernel import netns as nsns
from nsm.kernel.netns import run_in_netns
from nsm.kernel.ping import readable

pytestmark = [pytest.mark.kernel, pytest.mark.asyncio(loop_scope="session")]

RATE = 50.0


def dst_of(conn: Connection) -> str:
    return conn.context.ip_context.dst_ip_addrs[0].split("/")[0]


@dataclass
class Echo:
    seq: int
    sent: float
    dst: str
    answered: float | None = None


@dataclass
class Traffic:
    """ICMP echoes at ``RATE``/s from inside ``netns`` to ``dst`` (which the test may change
    when the connection moves), each reply matched by sequence number, in a thread."""

    netns: str
    dst: str
    echoes: list[Echo] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Traffic:
        self._thread = threading.Thread(target=run_in_netns, args=(self.netns, self._run), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    @staticmethod
    def _packet(ident: int, seq: int) -> bytes:
        body = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + b"nsm-heal-traffic"
        total = sum(struct.unpack(f"!{len(body) // 2}H", body))
        while total >> 16:
            total = (total & 0xFFFF) + (total >> 16)
        return body[:2] + struct.pack("!H", ~total & 0xFFFF) + body[4:]

    def _run(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        sock.setblocking(False)
        ident = (os.getpid() ^ id(self)) & 0xFFFF
        by_seq: dict[int, Echo] = {}
        next_at = time.monotonic()
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_at:
                    echo = Echo(len(self.echoes) + 1, now, self.dst)
                    self.echoes.append(echo)
                    by_seq[echo.seq & 0xFFFF] = echo
                    try:
                        sock.sendto(self._packet(ident, echo.seq & 0xFFFF), (echo.dst, 0))
                    except OSError as exc:
                        self.errors.append(exc.strerror or str(exc))
                    next_at += 1 / RATE
                ready = readable([sock], max(0.0, next_at - time.monotonic()))
                while ready:
                    try:
                        data, addr = sock.recvfrom(2048)
                    except BlockingIOError:
                        break
                    ihl = (data[0] & 0x0F) * 4
                    kind, _, _, rid, rseq = struct.unpack("!BBHHH", data[ihl:ihl + 8])
                    hit = by_seq.get(rseq)
                    if kind == 0 and rid == ident and hit is not None and addr[0] == hit.dst:
                        hit.answered = hit.answered or time.monotonic()
        finally:
            sock.close()

    # -- what it saw ------------------------------------------------------------------------

    def lost(self, until: float | None = None) -> int:
        """Echoes sent (up to 1 s before ``until``/now) that got no reply."""
        end = (until or time.monotonic()) - 1.0
        return sum(1 for e in self.echoes if e.sent <= end and e.answered is None)

    def first_reply_after(self, t: float, dst: str | None = None) -> float | None:
        times = [e.answered for e in self.echoes
                 if e.answered is not None and e.sent >= t and (dst is None or e.dst == dst)]
        return min(times) if times else None

    def restored_after(self, t: float) -> float | None:
        """When the first reply came after the first echo sent since ``t`` that got none."""
        lost = next((e.sent for e in self.echoes if e.sent >= t and e.answered is None), None)
        return None if lost is None else self.first_reply_after(lost)

    def longest_gap(self, since: float) -> float:
        """The longest time between two replies (by send time) to echoes sent since ``since``."""
        sent = [e.sent for e in self.echoes if e.sent >= since and e.answered is not None]
        return max((b - a for a, b in itertools.pairwise(sent)), default=0.0)

    def replies_since(self, t: float) -> int:
        return sum(1 for e in self.echoes if e.sent >= t and e.answered is not None)


async def traffic_through(mesh, netns: str, conn: Connection) -> Traffic:  # type: ignore[no-untyped-def]
    """A running :class:`Traffic` (stopped at the end of the test), once replies come."""
    traffic = Traffic(netns, dst_of(conn)).start()
    mesh.stack.callback(traffic.stop)
    started = time.monotonic()
    await mesh.eventually(lambda: _true(traffic.replies_since(started) >= 10), timeout=10,
                          what="traffic flows before the fault")
    return traffic


async def _true(value: bool) -> bool:
    return value


@dataclass
class Healing:
    """A client with a connection carrying traffic, and every state change it reported; the
    traffic follows the connection to a new endpoint address."""

    client: Client
    conn: Connection
    traffic: Traffic
    changes: list[StateChange]

    def states(self) -> list[State]:
        return [c.state for c in self.changes]

    def first(self, state: State) -> StateChange:
        return next(c for c in self.changes if c.state is state)

    async def until(self, mesh, state: State, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
        await mesh.eventually(lambda: _true(state in self.states()), timeout=timeout,
                              what=f"the connection {state.value}")

    async def through(self, mesh, since: float, new_path: bool = True) -> float:  # type: ignore[no-untyped-def]
        """When traffic came back after ``since``: through the current connection's address, or
        (``new_path`` False) after the first echo lost since."""
        conn = self.client.connection
        assert conn is not None

        def back() -> float | None:
            return (self.traffic.first_reply_after(since, dst_of(conn)) if new_path
                    else self.traffic.restored_after(since))

        await mesh.eventually(lambda: _true(back() is not None), timeout=5, what="replies again")
        restored = back()
        assert restored is not None
        return restored


async def healing(mesh, netns: str, service: str | None = None) -> Healing:  # type: ignore[no-untyped-def]
    changes: list[StateChange] = []
    box: list[Traffic] = []

    def on_change(change: StateChange) -> None:
        changes.append(change)
        if change.connection is not None and change.state in (State.HEALED, State.REFRESHED) and box:
            box[0].dst = dst_of(change.connection)

    client = mesh.client(netns, service=service or mesh.service, on_change=on_change)
    conn = await client.request()
    box.append(await traffic_through(mesh, netns, conn))
    return Healing(client, conn, box[0], changes)


async def report(what: str, fault_at: float, restored: float | None, traffic: Traffic) -> float:
    """Print the heal time and what was lost (once the last echoes had their chance)."""
    assert restored is not None, f"{what}: traffic not restored"
    took = restored - fault_at
    await asyncio.sleep(1.2)
    print(f"\nHEAL {what}: traffic through the new path {took * 1000:.0f} ms after the fault; "
          f"{traffic.lost()} of {len(traffic.echoes)} echoes lost at {RATE:.0f}/s, longest gap "
          f"{traffic.longest_gap(fault_at - 1) * 1000:.0f} ms")
    return took


async def index_of(mesh, netns: str, name: str = "nsm-1") -> int | None:  # type: ignore[no-untyped-def]
    return await mesh.netlink.index(netns, name)


async def watch_manager_for_down(mesh, conn_id: str, timeout: float) -> bool:  # type: ignore[no-untyped-def]
    """Whether the manager's monitor shows this client's connection DOWN within ``timeout``."""
    stub = connection_pb2_grpc.MonitorConnectionStub(mesh.channel(mesh.manager_url))
    call = stub.MonitorConnections(MonitorScopeSelector(), timeout=timeout)
    try:
        while True:
            event = await call.read()
            if event is grpc.aio.EOF:
                return False
            assert isinstance(event, ConnectionEvent)
            for conn in event.connections.values():
                segs = conn.path.path_segments
                if segs and segs[0].id == conn_id and conn.state == DOWN:
                    return True
    except grpc.aio.AioRpcError:
        return False
    finally:
        call.cancel()


async def one_endpoint(mesh, service: str, label: str, cidr: str):  # type: ignore[no-untyped-def]
    """One endpoint for ``service`` and a client's connection to it with traffic: (endpoint,
    client namespace, healing)."""
    nse = await mesh.start_nse(label, services=[service], cidr=cidr, expiry=60)
    ns = await mesh.netns()
    return nse, ns, await healing(mesh, ns, service)


async def other_endpoint(mesh, service: str, label: str, net: str):  # type: ignore[no-untyped-def]
    """Two endpoints for ``service`` (CIDRs ``<net>.1.0/24`` and ``<net>.2.0/24``) and a
    client's connection with traffic: (healing, the endpoint it got, the other one)."""
    a = await mesh.start_nse(f"{label}a", services=[service], cidr=f"{net}.1.0/24", expiry=60)
    b = await mesh.start_nse(f"{label}b", services=[service], cidr=f"{net}.2.0/24", expiry=60)
    ns = await mesh.netns()
    h = await healing(mesh, ns, service)
    victim = a if h.conn.network_service_endpoint_name == a.name else b
    return h, ns, victim, (b if victim is a else a)


# -- the endpoint goes away -------------------------------------------------------------------


@pytest.mark.timeout(90)
async def test_endpoint_pod_gone_reselects_onto_the_other_endpoint(mesh) -> None:
    h, ns, victim, other = await other_endpoint(mesh, "e2e-heal-two", "hl", "10.61")
    fault_at = time.monotonic()
    await victim.daemon.kill()
    nsns.delete_netns(os.path.basename(victim.netns))  # the pod is gone, and its veth end with it
    await h.until(mesh, State.HEALED)
    assert h.client.connection is not None
    assert h.client.connection.network_service_endpoint_name == other.name
    took = await report("endpoint pod gone, another endpoint", fault_at, await h.through(mesh, fault_at),
                        h.traffic)
    assert took < 5.0
    # The data-plane check (the veth went with the namespace) or the hops' DOWN (its process),
    # whichever came first, and a reselect either way.
    downs = [c for c in h.changes if c.state is State.DOWN]
    assert len(downs) == 1 and ("data plane" in downs[0].reason or "DOWN" in downs[0].reason), downs
    assert any(c.state is State.HEALED and "reselecting" in c.reason for c in h.changes), h.changes
    assert await mesh.link_names(ns) == ["nsm-1"]
    assert len(await mesh.link_names(other.netns)) == 1
    await h.client.close(raise_errors=True)
    assert await mesh.link_names(ns) == [] and await mesh.link_names(other.netns) == []


@pytest.mark.timeout(90)
async def test_endpoint_process_killed_reselects_onto_the_other_endpoint(mesh) -> None:
    """Only the process dies: its namespace (and the veth end in it) stays and still answers
    pings, so only the control plane can tell — the hops report the path DOWN, the same path
    cannot be requested again, and the client reselects."""
    h, ns, victim, other = await other_endpoint(mesh, "e2e-heal-kill", "hk", "10.62")
    watching = asyncio.create_task(watch_manager_for_down(mesh, h.client.conn_id, 3.0))
    await asyncio.sleep(0.2)
    fault_at = time.monotonic()
    await victim.daemon.kill()
    if not await watching and State.DOWN not in h.states():
        pytest.skip("the hops do not report a connection DOWN when its endpoint dies "
                    "(issue 7 item 1: monitoring on every hop)")
    await h.until(mesh, State.HEALED)
    assert h.client.connection is not None
    assert h.client.connection.network_service_endpoint_name == other.name
    took = await report("endpoint process killed, another endpoint", fault_at,
                        await h.through(mesh, fault_at), h.traffic)
    assert took < 5.0
    assert await mesh.link_names(ns) == ["nsm-1"]
    assert await mesh.link_names(victim.netns) == []  # the old path was closed
    await h.client.close(raise_errors=True)


@pytest.mark.timeout(90)
async def test_endpoint_gone_without_another_is_down_until_one_appears(mesh) -> None:
    service = "e2e-heal-solo"
    first, ns, h = await one_endpoint(mesh, service, "hso", "10.63.1.0/24")
    fault_at = time.monotonic()
    await first.daemon.kill()
    nsns.delete_netns(os.path.basename(first.netns))
    await h.until(mesh, State.DOWN, timeout=5)
    await asyncio.sleep(2.0)  # no endpoint: it keeps trying
    assert State.HEALED not in h.states()
    failed = h.states().count(State.FAILED)
    assert failed >= 2, h.states()
    assert h.client.connection is not None  # not given up

    starting_at = time.monotonic()
    second = await mesh.start_nse("hsn", services=[service], cidr="10.63.2.0/24", expiry=60)
    registered_at = time.monotonic()
    await h.until(mesh, State.HEALED)
    assert h.client.connection is not None
    assert h.client.connection.network_service_endpoint_name == second.name
    restored = await h.through(mesh, fault_at)
    print(f"\nHEAL endpoint gone, none other: DOWN reported with {h.first(State.DOWN).reason!r}; "
          f"{failed} failed tries; traffic back {(restored - starting_at) * 1000:.0f} ms after "
          f"the new endpoint's process was started (its start and registration took "
          f"{(registered_at - starting_at) * 1000:.0f} ms)")
    assert await mesh.link_names(ns) == ["nsm-1"]
    await h.client.close(raise_errors=True)


# -- the client's interface -------------------------------------------------------------------


@pytest.mark.timeout(90)
async def test_nsm1_set_down_in_the_pod_is_detected_and_healed(mesh) -> None:
    nse, ns, h = await one_endpoint(mesh, "e2e-heal-down", "hdn", "10.64.1.0/24")
    fault_at = time.monotonic()
    await mesh.netlink.set_down(ns, "nsm-1")
    await h.until(mesh, State.HEALED, timeout=10)
    took = await report("nsm-1 set down in the client pod", fault_at,
                        await h.through(mesh, fault_at, new_path=False), h.traffic)
    assert took < 5.0
    assert re.search(r"interface nsm-1 (in \S+ )?is down", h.first(State.DOWN).reason), h.changes
    link = await mesh.netlink.link(ns, "nsm-1")
    assert link is not None and await mesh.link_names(ns) == ["nsm-1"]
    assert len(await mesh.link_names(nse.netns)) == 1
    await h.client.close(raise_errors=True)


# -- the manager restarts -------------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_manager_restart_re_requests_without_a_reselect_and_loses_nothing(mesh) -> None:
    ns = await mesh.netns()
    h = await healing(mesh, ns)
    index = await index_of(mesh, ns)
    fault_at = time.monotonic()
    await mesh.manager.kill()
    await h.until(mesh, State.DOWN, timeout=5)  # the lost control plane is reported
    await asyncio.sleep(1.0)
    await mesh.manager.start()
    back_at = time.monotonic()
    await h.until(mesh, State.HEALED, timeout=20)  # re-requested once the manager is back
    healed_at = time.monotonic()
    await asyncio.sleep(1.5)  # the last echoes have had their chance
    lost = h.traffic.lost()
    print(f"\nHEAL manager killed and restarted: re-requested {(healed_at - back_at) * 1000:.0f} ms "
          f"after it was back ({(healed_at - fault_at):.1f} s after the kill), {lost} of "
          f"{len(h.traffic.echoes)} echoes lost at {RATE:.0f}/s")
    assert lost == 0
    assert await index_of(mesh, ns) == index and await mesh.link_names(ns) == ["nsm-1"]
    heals = [c.reason for c in h.changes if c.state in (State.DOWN, State.HEALED)]
    assert all("reselect" not in r and "re-requesting the same path" in r for r in heals), heals
    healed = h.client.connection
    assert healed is not None
    assert healed.network_service_endpoint_name == h.conn.network_service_endpoint_name
    # The restarted manager knows the connection again, and Close still removes everything.
    assert len(await mesh.connections(mesh.manager_url)) == 1
    await h.client.close(raise_errors=True)
    assert await mesh.link_names(ns) == []


# -- nsm nsc restarts -------------------------------------------------------------------------


@pytest.mark.timeout(90)
async def test_restarted_nsc_adopts_its_live_connection(mesh) -> None:
    ns = await mesh.netns()
    name = mesh.name("nscr")
    args = ("nsc", "--manager", mesh.manager_url, "--service", mesh.service, "--netns", ns,
            "--name", name)
    first = await mesh.spawn_cli(*args)
    line = await mesh.nsc_connected(first)
    assert f"id={name}-0 " in line, line
    index = await index_of(mesh, ns)
    conn = next(iter((await mesh.connections(mesh.manager_url)).values()))
    traffic = await traffic_through(mesh, ns, conn)

    os.killpg(first.pid, signal.SIGKILL)  # no Close: the connection lives on in every hop
    await first.wait()
    killed_at = time.monotonic()
    second = await mesh.spawn_cli(*args)
    again = await mesh.nsc_connected(second)
    print(f"\nADOPT nsm nsc restarted: connected again {(time.monotonic() - killed_at) * 1000:.0f} ms "
          f"after the kill")
    assert again.split()[1:] == line.split()[1:], (line, again)  # same id, addresses, endpoint
    assert await index_of(mesh, ns) == index and await mesh.link_names(ns) == ["nsm-1"]
    assert len(await mesh.link_names(mesh.main.netns)) == 1  # no second link anywhere
    snaps = await mesh.all_connections()
    assert all(len(snaps[k]) == 1 for k in ("manager", "forwarder", mesh.main.name)), snaps
    await asyncio.sleep(1.5)
    print(f"ADOPT {traffic.lost()} of {len(traffic.echoes)} echoes lost at {RATE:.0f}/s")
    assert traffic.lost() == 0

    # The adopted connection is healed like any other, and nsm nsc says so on stderr.
    broken_at = time.monotonic()
    await mesh.netlink.set_down(ns, "nsm-1")
    await mesh.eventually(lambda: _true(traffic.restored_after(broken_at) is not None), timeout=10,
                          what="healed after nsm-1 was set down")
    second.send_signal(signal.SIGTERM)
    assert second.stderr is not None
    _, err = await asyncio.wait_for(second.communicate(), 15)
    assert second.returncode == 0, err.decode()
    lines = err.decode().splitlines()
    down = [x for x in lines if "connection down" in x]
    assert len(down) == 1 and re.search(r"interface nsm-1 (in \S+ )?is down", down[0]), lines
    assert any("connection healed" in x for x in lines), lines
    assert await mesh.link_names(ns) == []

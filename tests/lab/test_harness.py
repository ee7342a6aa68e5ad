"""The harness the suites and benchmarks share (nsm.lab.harness): waiting, leak checks, and a
lab harness's scopes — what a scope makes goes at its end, and what it cannot remove (a
connection still open, a process in a pod, a namespace file descriptor, a stopped daemon) fails
the scope once, naming it."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest

from nsm.client.sdk import Client
from nsm.kernel import netns as nsns
from nsm.lab import NodeSpec, Topology, pids_in_netns
from nsm.lab.harness import LabHarness, eventually, failure_logs, find_leftovers, no_leaked_tasks

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")


async def test_eventually_takes_sync_and_async_checks_and_names_what_timed_out() -> None:
    calls: list[int] = []

    def sync() -> int:
        calls.append(1)
        return len(calls) if len(calls) >= 3 else 0

    async def never() -> bool:
        return False

    assert await eventually(sync, timeout=5, interval=0.001) == 3
    with pytest.raises(AssertionError, match=r"the thing: not reached within 0.05s"):
        await eventually(never, timeout=0.05, what="the thing", interval=0.01)


async def test_no_leaked_tasks_names_a_task_left_running() -> None:
    with pytest.raises(AssertionError, match="leaked tasks"):
        async with no_leaked_tasks(grace=0.1):
            task = asyncio.create_task(asyncio.sleep(30))
    task.cancel()
    async with no_leaked_tasks(grace=1.0):  # one that ends in time is fine
        short = asyncio.create_task(asyncio.sleep(0.05))
    assert short.done()


@needs_root
@pytest.mark.timeout(30)
async def test_find_leftovers_finds_namespaces_and_processes_by_marker(prefix: str) -> None:
    nsns.create_netns(f"{prefix}-left")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import time; time.sleep(30)", prefix)
    try:
        found = find_leftovers([prefix])
        assert found.namespaces == [f"{prefix}-left"]
        assert [pid for pid, _ in found.processes] == [proc.pid]
        assert any(prefix in line for line in found.lines())
        found.remove()
        assert await proc.wait() == -9
        assert not find_leftovers([prefix])
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        nsns.delete_netns(f"{prefix}-left")


@needs_root
@pytest.mark.timeout(90)
async def test_a_scope_removes_what_it_made_and_blames_what_it_could_not(prefix: str) -> None:
    async with LabHarness.running(Topology(nodes=(NodeSpec("node1"),)), prefix=prefix) as h:
        manager_url = h.lab.node("node1").manager_url
        # What a scope makes goes at its end: pods, endpoints (stopped, forgotten), clients.
        async with h.scope(grace=1.0):
            pod = await h.pod("c")
            nse = await h.start_nse("e", services=["harness"], cidr="10.77.0.0/24")
            assert nse.name in h.lab.daemons and h.monitor_urls()[nse.name] == nse.url
            conn = await h.open_client("node1", "harness", pod, ifname="nsm-1").request()
            assert conn.network_service_endpoint_name == nse.name
            assert await h.link_names(pod) == ["nsm-1"]
            assert len(await h.connections(manager_url)) == 1
            assert h.daemon_log(nse.daemon)  # what it logged since the scope began
            assert nse.name in dict(failure_logs(h))
        assert not nsns.netns_exists(os.path.basename(pod))
        assert nse.name not in h.lab.daemons and not nse.daemon.running
        assert failure_logs(object()) == []

        # A connection left open (by a client the scope does not know) fails the scope, once:
        # the next scope is blamed only for what it leaves itself.
        await h.start_nse("keep", services=["harness"], cidr="10.78.0.0/24")  # the harness's
        lost_ns = await h.pod("o")
        lost = Client(manager_url=manager_url, service="harness", netns=lost_ns,
                      security=h.pod_identity(lost_ns))
        with pytest.raises(AssertionError, match=r"manager.node1: connection"):
            async with h.scope(grace=0.5):
                await lost.request()
        async with h.scope(grace=0.5):
            pass
        await lost.close()

        # A process left in a pod of the scope is ended and named.
        with pytest.raises(AssertionError, match=r"process .* left in a pod"):
            async with h.scope(grace=0.5):
                pod = await h.pod("p")
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "nsm.lab.netns_exec", pod, "--", "sleep", "30")
                await eventually(lambda p=pod: pids_in_netns([p]), timeout=10)
        assert await proc.wait() != 0

        # A namespace file descriptor left open (it keeps a deleted pod alive) is named.
        fd = -1
        with pytest.raises(AssertionError, match="namespace file descriptors"):
            async with h.scope(grace=0.5):
                fd = nsns.open_netns(await h.pod("f"))
        os.close(fd)

        # A daemon of the lab that a scope stopped fails it.
        with pytest.raises(AssertionError, match=r"daemon manager.node1 is not running"):
            async with h.scope(grace=0.2):
                await h.lab.stop_daemon("manager.node1")
        await h.lab.start_daemon("manager.node1")
        async with h.scope(grace=0.5):
            pass
    assert not find_leftovers([prefix])

"""An endpoint, and a client (``nsm nsc``), that run as pods without hostPID: each in its own
PID namespace (PID 1 there), with its own ``/proc`` and a network namespace that has no name.
Each names that namespace by identity (``inode://<dev>/<ino>``), since a path like
``/proc/1/ns/net`` means another namespace (the host's) to the forwarder; the forwarder finds
it among the node's processes, checks it and has the workload prove it as any other, and the
traffic flows.

Before, they named ``file:///proc/1/ns/net`` and the forwarder refused PID 1's namespace: on
Kubernetes every endpoint pod (and client pod running ``nsm nsc``) needed ``hostPID: true``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys

import pytest

from nsm.mechanisms import KERNEL, NETNS_INODE_URL, netns_inode

pytestmark = [pytest.mark.kernel, pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(60)]

NODE = "node1"
#: A pod's own PID, mount (its own /proc) and network namespace (no name), as a runtime makes it.
AS_A_POD = ("unshare", "--net", "--pid", "--fork", "--mount-proc")


def only_child(pid: int) -> int:
    """The one child of process ``pid`` (``unshare --fork``'s: the workload)."""
    (child,) = open(f"/proc/{pid}/task/{pid}/children").read().split()
    return int(child)


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")
async def test_an_endpoint_in_its_own_pid_namespace_gets_its_link(mesh) -> None:
    name, service = mesh.name("pidns"), mesh.name("pidns-svc")
    url = f"unix://{mesh.work}/{name}.sock"
    proc = await mesh.spawn_python(
        "-m", "nsm.lab.netns_exec", mesh.lab.node(NODE).netns, "--",
        *AS_A_POD, sys.executable, "-m", "nsm.cli", "nse", "--name", name, "--service", service,
        "--cidr", "172.29.77.0/24", "--listen", url, "--registry", mesh.registry_url,
        "--node", NODE, "--expiry", "30s", stdin=False)
    try:
        await mesh.wait_registered(name, timeout=20)
    except AssertionError:
        proc.kill()
        _, err = await proc.communicate()
        raise AssertionError(f"the endpoint did not register: {err.decode()[-2000:]}") from None
    try:
        pod = await mesh.netns("pidnsc")
        client = mesh.client(pod, service=service)
        conn = await client.request()
        dst = conn.context.ip_context.dst_ip_addrs[0].split("/")[0]
        assert (await mesh.ping(pod, dst, count=3, timeout=1.0)).received == 3
        # The endpoint named its namespace by identity, not by a path of its own PIDs.
        (held,) = (await mesh.connections(url)).values()
        assert held.mechanism.type == KERNEL
        ident = netns_inode(held.mechanism.parameters[NETNS_INODE_URL])
        assert ident is not None, held.mechanism.parameters[NETNS_INODE_URL]
        # ... which is no namespace with a name on this node, nor this process's.
        st = os.stat("/proc/self/ns/net")
        assert ident != (st.st_dev, st.st_ino)
        assert ident not in {(s.st_dev, s.st_ino) for s in
                             (os.stat(e.path) for e in os.scandir("/var/run/netns"))}
        await client.close()
        assert not (await mesh.connections(url))
    finally:
        # Stopped as a pod is (SIGTERM): it unregisters itself.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 10)
    await mesh.wait_registered(name, present=False)


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")
async def test_a_client_in_its_own_pid_namespace_gets_its_link(mesh) -> None:
    proc = await mesh.spawn_python(
        "-m", "nsm.lab.netns_exec", mesh.lab.node(NODE).netns, "--",
        *AS_A_POD, sys.executable, "-m", "nsm.cli", "nsc", "--manager", mesh.manager_url,
        "--service", mesh.service, "--name", mesh.name("pidnsc"), stdin=False)
    line = await mesh.nsc_connected(proc)
    dst = line.split("dst=")[1].split()[0].split(",")[0].split("/")[0]
    pod = f"/proc/{only_child(proc.pid)}/ns/net"  # its namespace, as the node sees it
    assert await mesh.link_names(pod) == ["nsm-1"]
    assert (await mesh.ping(pod, dst, count=3, timeout=1.0)).received == 3
    await asyncio.sleep(1.0)  # its data-plane checks run from inside, every 200 ms
    os.killpg(proc.pid, signal.SIGTERM)  # stopped as a pod is: it closes its connection
    assert await asyncio.wait_for(proc.wait(), 10) == 0
    assert proc.stderr is not None
    err = (await proc.stderr.read()).decode()
    assert "connection down" not in err and "close failed" not in err, err  # its checks found it
    assert not any((await mesh.all_connections()).values())

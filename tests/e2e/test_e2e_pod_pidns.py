"""An endpoint that runs as a pod without hostPID: its own PID namespace (it is PID 1 there),
its own ``/proc`` and a network namespace that has no name. It names that namespace by identity
(``inode://<dev>/<ino>``), since a path like ``/proc/1/ns/net`` means another namespace (the
host's) to the forwarder; the forwarder finds it among the node's processes, checks it and has
the endpoint prove it as any other, and the client's traffic reaches the endpoint.

Before, the endpoint answered ``file:///proc/1/ns/net`` and the forwarder refused PID 1's
namespace: on Kubernetes every endpoint pod needed ``hostPID: true``."""

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


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")
async def test_an_endpoint_in_its_own_pid_namespace_gets_its_link(mesh) -> None:
    name, service = mesh.name("pidns"), mesh.name("pidns-svc")
    url = f"unix://{mesh.work}/{name}.sock"
    proc = await mesh.spawn_python(
        "-m", "nsm.lab.netns_exec", mesh.lab.node(NODE).netns, "--",
        "unshare", "--net", "--pid", "--fork", "--mount-proc",
        sys.executable, "-m", "nsm.cli", "nse", "--name", name, "--service", service,
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

"""Every CNI command when things go wrong, as a runtime calls it: the pod's namespace already
gone, an NSM interface deleted by hand, the agent stopped or restarted, stale attachments, bad
input; and a burst of pods."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest

from nsm.cni import spec
from nsm.cni.spec import VERSIONS
from nsm.kernel.netns import delete_netns

pytestmark = [pytest.mark.kernel, pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(90)]


@pytest.mark.parametrize("version", VERSIONS)
async def test_del_with_the_namespace_gone(cni, version: str) -> None:
    rt = cni.runtime(version)
    c, ns = await cni.container()
    (await rt.add(c, ns)).ok()
    delete_netns(os.path.basename(ns))
    (await rt.delete(c, None)).ok()                 # no CNI_NETNS, prevResult from the cache
    (await rt.delete(c, None, prev=False)).ok()     # again, without prevResult
    assert await cni.attachments() == 0


async def test_namespace_gone_without_del(cni) -> None:
    """The agent removes an attachment whose namespace disappeared (its sweep)."""
    rt = cni.runtime("1.0.0", primary=False)
    c, ns = await cni.container()
    (await rt.add(c, ns, ifname="net1")).ok()
    delete_netns(os.path.basename(ns))
    await cni.eventually(lambda: cni.attachments_zero(), timeout=10, what="attachment swept")


@pytest.mark.parametrize("version", VERSIONS)
async def test_check_after_the_interface_was_deleted(cni, version: str) -> None:
    rt = cni.runtime(version)
    c, ns = await cni.container()
    (await rt.add(c, ns)).ok()
    assert (await rt.check(c, ns, only=["nsm-cni"])).ok() is None
    await cni.netlink.delete_link(ns, "nsm-1")
    run = await rt.check(c, ns, only=["nsm-cni"])
    assert run.code == spec.IFACE_CHANGED, run.runs
    assert "nsm-1" in run.failed.output["msg"]
    # The agent's connection heals (a new interface); it is still not the one ADD reported.
    await cni.eventually(lambda: cni.netlink.index(ns, "nsm-1"), timeout=10, what="healed")
    run = await rt.check(c, ns, only=["nsm-cni"])
    assert run.code == spec.IFACE_CHANGED, run.runs
    (await rt.delete(c, ns)).ok()
    assert await cni.link_names(ns) == []


async def test_agent_stopped(cni) -> None:
    """STATUS says 50, ADD "try again" (11) after waiting agentWait, DEL succeeds."""
    rt = cni.runtime("1.1.0", agentWait=0.3)
    c, ns = await cni.container()
    await cni.lab.stop_daemon(cni.agent)
    try:
        status = await rt.status()
        assert status.code == spec.NOT_AVAILABLE, status.runs
        add = await rt.add(c, ns)
        assert add.code == spec.TRY_AGAIN, add.runs
        assert [r.plugin for r in add.runs] == ["bridge", "nsm-cni"]
        (await rt.delete(c, ns)).ok()  # never wedges pod deletion
    finally:
        await cni.lab.start_daemon(cni.agent)
    assert (await rt.status()).ok() is None


async def test_status_when_the_manager_is_down(cni) -> None:
    rt = cni.runtime("1.1.0")
    await cni.lab.stop_daemon("manager.node1")
    try:
        status = await rt.status()
        assert status.code == spec.NOT_AVAILABLE, status.runs
    finally:
        await cni.lab.start_daemon("manager.node1")
    # Until its endpoint registers again, the restarted manager cannot name it to its
    # forwarder: wait for that before the next test (the lab is shared).
    await cni.eventually(cni.manager_knows_its_endpoint, timeout=10,
                         what="the endpoint registered again through the restarted manager")
    await cni.eventually(lambda: cni.ready(rt), timeout=10, what="STATUS ok again")
    await cni.eventually(lambda: cni.add_works(rt), timeout=10, what="ADD works again")


@pytest.mark.parametrize("key", spec.GC_KEYS)
async def test_gc_removes_stale_attachments(cni, key: str) -> None:
    rt = cni.runtime("1.1.0")
    (c1, ns1), (c2, ns2) = await cni.container(), await cni.container()
    (await rt.add(c1, ns1)).ok()
    (await rt.add(c2, ns2)).ok()
    (await rt.gc([(c1, "eth0")], keys=[key])).ok()
    assert "nsm-1" in await cni.link_names(ns1)
    assert "nsm-1" not in await cni.link_names(ns2)
    assert await cni.attachments() == 1
    (await rt.delete(c1, ns1)).ok()
    (await rt.delete(c2, ns2)).ok()


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("kill", [False, True], ids=["restart", "kill"])
async def test_agent_restart_changes_nothing_in_the_pod(cni, version: str, kill: bool) -> None:
    rt = cni.runtime(version, [f"kernel://{cni.local}/nsm-1", f"kernel://{cni.remote}/nsm-2"])
    c, ns = await cni.container()
    result = (await rt.add(c, ns)).ok()
    before = {n: (await cni.netlink.link(ns, n)).index for n in ("nsm-1", "nsm-2")}
    conns_before = sorted(await cni.connections(cni.lab.node("node1").manager_url))

    async def restart() -> None:
        if kill:
            await cni.lab.kill(cni.agent)
        await cni.lab.restart(cni.agent)
        await cni.eventually(lambda: cni.adopted(2), timeout=15, what="connections adopted")

    # Echoes across nodes all through the restart and the adoption: no flap.
    pings, _ = await asyncio.gather(
        cni.ping(ns, cni.route_into(result, cni.remote_cidr), count=60, interval=0.02), restart())
    assert pings.lost == [] and pings.received == 60, pings
    after = {n: (await cni.netlink.link(ns, n)).index for n in ("nsm-1", "nsm-2")}
    assert after == before
    assert sorted(await cni.connections(cni.lab.node("node1").manager_url)) == conns_before
    await cni.assert_ping(ns, cni.route_into(result, cni.local_cidr))
    await cni.assert_ping(ns, cni.route_into(result, cni.remote_cidr))
    assert (await rt.check(c, ns, only=["nsm-cni"])).ok() is None
    (await rt.delete(c, ns)).ok()
    assert await cni.link_names(ns) == []


async def test_bad_input_codes(cni) -> None:
    rt = cni.runtime("1.0.0", primary=False)
    c, ns = await cni.container()
    env = {"CNI_CONTAINERID": c, "CNI_NETNS": ns, "CNI_IFNAME": "net1"}
    plugin = rt.conflist["plugins"][0]
    good = {"cniVersion": "1.0.0", "name": "podnet", **plugin}

    async def code(config: Any, env: dict[str, str] = env, command: str = "ADD") -> int | None:
        run = await rt.exec("nsm-cni", command, config, env)
        assert run.status == (0 if run.code is None else 1), run
        if run.code is not None:
            assert run.output["msg"] and run.output["cniVersion"], run.output
        return run.code

    assert await code(b"{not json") == spec.DECODE_ERROR
    assert await code(b"[1, 2]") == spec.DECODE_ERROR
    assert await code({"name": "x"}) == spec.INVALID_CONFIG
    assert await code({**good, "cniVersion": "0.2.0"}) == spec.INCOMPATIBLE_VERSION
    assert await code({**good, "services": ["http://x/y"]}) == spec.INVALID_CONFIG
    too_long = f"kernel://{cni.local}/much-too-long-name"
    assert await code({**good, "services": [too_long]}) == spec.INVALID_CONFIG
    assert await code({**good, "services": []}) == spec.INVALID_CONFIG
    assert await code({**good, "socket": "relative.sock"}) == spec.INVALID_CONFIG
    assert await code(good, {"CNI_CONTAINERID": c, "CNI_IFNAME": "net1"}) == spec.INVALID_ENV
    assert await code(good, {}) == spec.INVALID_ENV
    assert await code(good, {**env, "CNI_NETNS": "/nonexistent/ns"}) == spec.INVALID_ENV
    assert await code(good, {**env, "CNI_COMMAND": "NOPE"}, command="NOPE") == spec.INVALID_ENV
    assert await code(good, {}, command="STATUS") == spec.INCOMPATIBLE_VERSION  # needs 1.1.0
    assert await code({**good, "services": ["kernel://no-such-service/nsm-1"]}) == spec.SERVICE_NOT_FOUND
    # A failed ADD undoes what it made (the first interface), then the runtime's DEL is clean.
    failing = {**good, "services": [f"kernel://{cni.local}/nsm-1", "kernel://no-such-service/nsm-2"]}
    assert await code(failing) == spec.SERVICE_NOT_FOUND
    assert await cni.link_names(ns) == []
    assert await code(failing, {k: v for k, v in env.items() if k != "CNI_NETNS"}, "DEL") is None
    # An interface name already in the pod is refused.
    chained = cni.runtime("1.0.0", [f"kernel://{cni.local}/eth0"])
    run = await chained.add(c, ns)
    assert run.code == spec.IFACE_EXISTS, run.runs
    (await chained.delete(c, ns)).ok()
    assert await cni.attachments() == 0


async def test_many_pods_at_once(cni) -> None:
    rt = cni.runtime("1.0.0")
    pods = [await cni.container() for _ in range(50)]
    adds = await asyncio.gather(*(rt.add(c, ns) for c, ns in pods))
    for run in adds:
        run.ok()
    assert (await cni.daemon_status(cni.agent.name))["connections"] == 50
    for _, ns in pods[:: 10]:
        assert {"eth0", "nsm-1"} <= set(await cni.link_names(ns))
    dels = await asyncio.gather(*(rt.delete(c, ns) for c, ns in pods))
    for run in dels:
        run.ok()
    assert await cni.attachments() == 0
    for _, ns in pods[:: 10]:
        assert await cni.link_names(ns) == []

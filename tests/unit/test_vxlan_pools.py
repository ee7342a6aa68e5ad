"""The forwarder's per-node pools of VNIs and routing tables."""

from __future__ import annotations

import random

import grpc
import pytest

from nsm.errors import ResourceExhausted, VniConflict
from nsm.forwarder.vxlan import VNI_MAX, VNI_MIN, TablePool, VniPool, mac_for, names_for


def test_table_pool_reuses_and_never_hands_out_a_table_twice() -> None:
    pool = TablePool(first=100, size=3)
    a, b = pool.allocate(), pool.allocate()
    assert (a, b) == (100, 101) and len(pool) == 2
    pool.release(a)
    pool.release(a)  # a second release (undo after a failed build, then close) is harmless
    assert len(pool) == 1
    c, d = pool.allocate(), pool.allocate()
    assert len({b, c, d}) == 3, "a table was handed out twice"
    with pytest.raises(ResourceExhausted):
        pool.allocate()
    pool.release(999)  # not ours: ignored
    assert len(pool) == 3
    assert pool.owns(100) and pool.owns(102) and not pool.owns(103) and not pool.owns(99)


def test_vni_pool_reserve_conflict_release() -> None:
    pool = VniPool(random.Random(1))
    vni = pool.allocate("c1")
    assert VNI_MIN <= vni <= VNI_MAX
    pool.reserve(vni, "c1")  # the same owner again: fine
    with pytest.raises(VniConflict) as raised:
        pool.reserve(vni, "c2")
    assert raised.value.code == grpc.StatusCode.ALREADY_EXISTS and raised.value.reason == "VNI_CONFLICT"
    pool.release(vni, "c2")  # not the owner: ignored
    assert len(pool) == 1
    pool.release(vni, "c1")
    assert len(pool) == 0
    pool.reserve(vni, "c2")
    assert len(pool) == 1


def test_names_and_macs_are_stable_and_valid() -> None:
    veth, vx, br = names_for("conn-1")
    assert (veth[:3], vx[:3], br[:3]) == ("nsv", "nsx", "nsb")
    assert len({veth[3:], vx[3:], br[3:]}) == 1 and all(len(n) <= 15 for n in (veth, vx, br))
    assert names_for("conn-1") == (veth, vx, br) != names_for("conn-2")
    mac = mac_for("vxlan", "conn-1")
    first = int(mac.split(":")[0], 16)
    assert first & 0x02 and not first & 0x01  # locally administered unicast
    assert mac == mac_for("vxlan", "conn-1") != mac_for("pod", "conn-1")

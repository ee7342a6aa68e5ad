"""What a restarted forwarder needs to adopt the datapath an earlier run left: routing tables
reserved for it, the parameter digest of a half, and the ``--adopt-grace`` flag."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from nsm.forwarder import main as fwd_main
from nsm.forwarder.vxlan import DEFAULT_ADOPT_GRACE, HALF_ALIAS_PREFIX, TablePool, _Half, half_alias


def test_a_reserved_table_is_never_handed_out() -> None:
    pool = TablePool(first=100, size=4)
    assert pool.reserve(101) and pool.reserve(103)
    assert not pool.reserve(101), "reserved twice"
    assert not pool.reserve(99) and not pool.reserve(104), "outside the pool"
    assert {pool.allocate(), pool.allocate()} == {100, 102}
    with pytest.raises(Exception, match="no free routing table"):
        pool.allocate()
    pool.release(103)
    assert pool.allocate() == 103 and len(pool) == 4


def test_the_half_alias_digests_every_parameter_but_the_table() -> None:
    half = _Half(pod_ns="/var/run/netns/p", pod_if="nsm-1", veth="nsv0", vxlan="nsx0",
                 bridge=None, table=7, vni=5000, remote="10.0.0.2", remote_mac="02:00:00:00:00:01",
                 payload="IP", mtu=1450, pod_addrs=("172.16.0.2/32",),
                 pod_routes=(("172.16.0.1/32", None),), peer_addrs=("172.16.0.1/32",))
    alias = half_alias("fwd-1", half)
    assert alias.startswith(HALF_ALIAS_PREFIX) and len(alias) < 64
    assert half_alias("fwd-1", dataclasses.replace(half, table=8)) == alias
    assert half_alias("fwd-2", half) != alias
    for change in ({"vni": 5001}, {"remote": "10.0.0.3"}, {"remote_mac": "02:00:00:00:00:02"},
                   {"mtu": 1400}, {"pod_addrs": ("172.16.0.3/32",)}, {"pod_routes": ()},
                   {"peer_addrs": ()}, {"pod_ns": "/var/run/netns/q"}):
        assert half_alias("fwd-1", dataclasses.replace(half, **change)) != alias, change


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    fwd_main.add_arguments(parser)
    return parser.parse_args(["--name", "f", "--listen", "unix:///x", "--manager", "unix:///m",
                              "--registry", "unix:///m", *argv])


def test_adopt_grace_flag_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NSM_ADOPT_GRACE", raising=False)
    assert _parse([]).adopt_grace == DEFAULT_ADOPT_GRACE == 60.0
    assert _parse(["--adopt-grace", "5s"]).adopt_grace == 5.0
    monkeypatch.setenv("NSM_ADOPT_GRACE", "2m")
    assert _parse([]).adopt_grace == 120.0
    with pytest.raises(SystemExit):
        _parse(["--adopt-grace", "0"])

"""The benchmarks run as a user runs them (``python -m bench.run``), at tiny sizes, so that they
keep working: one JSON document on stdout, zero failures, bars computed, nothing left behind.
Figures are not judged here (see docs/performance.md); a smoke run is too small for that."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nsm.kernel import netns as nsns

pytestmark = [pytest.mark.kernel, pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, links)")]

ROOT = Path(__file__).resolve().parents[2]


def _namespaces(pid: int) -> list[str]:
    return [n for n in nsns.list_netns() if n.startswith((f"nsmb{pid}-", f"nsmb{pid}_"))]


def _run(*args: str, timeout: float = 150) -> tuple[dict, str]:
    proc = subprocess.Popen([sys.executable, "-m", "bench.run", "--quick", "--settle", "0.2", *args],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    deadline = time.monotonic() + 10
    while _namespaces(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _namespaces(proc.pid) == [], "the benchmark left namespaces behind"
    assert proc.returncode == 0, err[-4000:]
    return json.loads(out), err


@pytest.mark.timeout(180)
def test_remote_scale_smoke() -> None:
    doc, err = _run("--only", "remote_scale", "--n", "8", "--concurrency", "4",
                    "--set", "sample=3")
    (result,) = doc["results"]["remote_scale"]
    assert result["failures"] == 0, result["failure_examples"]
    assert result["verified"] == 8
    peak = result["peak"]
    assert peak["open"] == 8 and peak["ping"]["ok"] == 3
    assert peak["monitored"] == {"node1": 8, "node2": 8}
    assert all(node["nsx"] == 8 for node in peak["nodes"].values())
    assert all(v == 0 for node in result["leftovers"].values() for v in node.values())
    assert set(result["memory_before_kb"]) >= {"registry", "manager.node1", "forwarder.node2"}
    assert "remote_scale: 8 cross-node connections" in err


@pytest.mark.timeout(180)
def test_local_setup_smoke() -> None:
    """The default mesh (secure): every phase measured, the floor beside it, the four bars,
    and the timeline's legs taken from the daemons' own stamps (its instrumentation imports
    the nsm this benchmark runs, whatever copy is installed)."""
    doc, err = _run("--only", "local_setup", "--n", "6", "--concurrency", "2")
    (result,) = doc["results"]["local_setup"]
    assert result["failures"] == 0, result["failure_examples"]
    assert result["sequential"]["request_ms"]["n"] == 6
    assert result["concurrent"]["request_ms"]["n"] == 6
    timeline = result["timeline"]
    assert "error" not in timeline, timeline
    assert timeline["n"] >= 1 and len(timeline["legs_p50_ms"]) == 11
    assert all(v >= 0 for v in timeline["legs_p50_ms"].values())
    assert {b["name"] for b in result["bars"]} == {
        "sequential request p50 / floor p50", "concurrent request p50 / floor p50",
        "first request of a fresh single node (slowest) / floor p50",
        "sequential request max (of 6) / floor p50"}
    assert "timeline of one Request" in err
    # The main mesh's namespaces go only after the fresh nodes and the timeline: the kernel
    # destroys namespaces in the background, which a fresh node's first Request would pay.
    deleted = re.search(r"the main mesh's \d+ namespaces deleted", err)
    assert deleted is not None, err
    assert err.index("freshly started single nodes") < err.index("timeline: ") < deleted.start(), err


@pytest.mark.timeout(180)
def test_remote_setup_smoke() -> None:
    doc, err = _run("--only", "remote_setup", "--n", "5", "--concurrency", "2")
    (result,) = doc["results"]["remote_setup"]
    assert result["failures"] == 0, result["failure_examples"]
    assert result["sequential"]["request_ms"]["n"] == 5
    assert result["floor_concurrent"]["setup_ms"]["n"] == 5
    assert {b["name"] for b in result["bars"]} == {
        "remote sequential request p50 / floor p50", "remote concurrent request p50 / floor p50"}
    assert "bar remote_setup: remote sequential request p50 / floor p50 <= 3" in err


@pytest.mark.timeout(180)
def test_cni_smoke() -> None:
    if not os.access("/usr/lib/cni/bridge", os.X_OK):
        pytest.skip("needs containernetworking-plugins (./dev setup)")
    doc, err = _run("--only", "cni", "--n", "3", "--concurrency", "4")
    (result,) = doc["results"]["cni"]
    assert result["failures"] == 0, result["failure_examples"]
    assert result["sequential"]["ok"] == 3 and result["concurrent"]["ok"] == 4
    for phase in ("sequential", "concurrent"):
        for figure in ("bridge_add_ms", "nsm_cni_add_ms", "setup_ms", "overhead_ms"):
            assert result[phase][figure]["n"] == result[phase]["pods"], (phase, figure)
    assert [b["name"] for b in result["bars"]] == ["nsm-cni overhead p50 / bridge ADD p50 (sequential)"]
    assert "bar cni: nsm-cni overhead p50 / bridge ADD p50 (sequential) <= 1" in err


@pytest.mark.timeout(180)
def test_security_smoke() -> None:
    """Secure and --insecure meshes side by side, interleaved: both sides measured (new pods,
    and one long-lived client as the CNI agent is), the ratio and the bar computed, nothing left
    behind (namespaces, the labs' links)."""
    doc, err = _run("--only", "security", "--n", "3")
    (result,) = doc["results"]["security"]
    assert result["failures"] == 0, result["failure_examples"]
    for key in ("local", "agent", "remote"):
        part = result[key]
        assert part["n"] == 3
        for side in ("secure", "insecure"):
            assert part[side]["request_ms"]["n"] == 3 and part[side]["close_ms"]["n"] == 3, (key, side)
            assert part[side]["request_ms"]["p50"] <= part[side]["request_ms"]["p90"] <= \
                part[side]["request_ms"]["max"]
        assert part["ratio"]["request p50"] == round(
            part["secure"]["request_ms"]["p50"] / part["insecure"]["request_ms"]["p50"], 2)
    assert all(v == 0 for side in ("secure", "insecure")
               for node in result["remote"][side]["leftovers"].values() for v in node.values())
    assert [b["name"] for b in result["bars"]] == ["local request p50 secure / insecure"]
    assert "bar security: local request p50 secure / insecure <= 1.25" in err
    assert "local   ratio" in err and "agent   ratio" in err and "remote  ratio" in err


@pytest.mark.timeout(60)
def test_security_floor_smoke() -> None:
    """``python -m bench.security_floor``: one JSON document; the floor is the handshake's
    overhead plus the path's mints and verifications, and the least ratio follows from it."""
    proc = subprocess.run([sys.executable, "-m", "bench.security_floor", "--n", "50", "--insecure-ms", "10"],
                          cwd=ROOT, capture_output=True, text=True, timeout=50)
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc = json.loads(proc.stdout)
    first = doc["new_channel_first_call_ms"]
    assert doc["n"] == 50 and first["secure_p50"] > first["insecure_p50"] > 0
    assert doc["handshake_overhead_ms"] == pytest.approx(first["secure_p50"] - first["insecure_p50"],
                                                         abs=0.002)
    assert doc["floor_ms"] == pytest.approx(doc["handshake_overhead_ms"] + 4 * doc["es256_mint_ms_p50"]
                                            + 6 * doc["es256_verify_ms_p50"], abs=0.003)
    assert doc["least_ratio"] == pytest.approx((10 + doc["floor_ms"]) / 10, abs=0.001)
    assert "least ratio over an insecure request of 10.0 ms" in proc.stderr


@pytest.mark.timeout(90)
def test_registry_watch_smoke() -> None:
    """Both sides measured (the registry's throttle and none), every watcher got its snapshot,
    the ratio is the Finds' p50 among watches over alone and the bar is computed from it."""
    doc, err = _run("--only", "registry_watch", "--set", "records=20", "--set", "watches=40")
    (result,) = doc["results"]["registry_watch"]
    assert result["failures"] == 0, result["failure_examples"]
    assert result["records"] == 20 and result["watches"] == 40
    assert result["throttled"]["snapshots_in_flight"] == 4
    assert result["unthrottled"]["snapshots_in_flight"] > 40
    for side in ("throttled", "unthrottled"):
        part = result[side]
        assert part["alone_ms"]["n"] == 5 and 1 <= part["among_ms"]["n"] <= 5, side
        assert part["ratio_p50"] == round(part["among_ms"]["p50"] / part["alone_ms"]["p50"], 2), side
        assert part["all_snapshots_s"] > 0
    (bar,) = result["bars"]
    assert bar["value"] == result["throttled"]["ratio_p50"] and bar["limit"] == 10
    assert "bar registry_watch: Find p50 among watches / alone (throttled) <= 10" in err

"""The heal benchmark and the chaos soak run as a user runs them (``python -m bench.heal``,
``python -m bench.chaos``), at the smallest sizes: one JSON document on stdout, the fault healed
and measured, nothing left behind. Figures are not judged here (see docs/performance.md).

The soak here kills endpoints and the registry only: that is what heals without loss or leak
today (forwarder and manager restarts are measured by the full runs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from nsm.kernel import netns as nsns

pytestmark = [pytest.mark.kernel, pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, links)")]

ROOT = Path(__file__).resolve().parents[2]


def bench(module: str, *args: str, timeout: float = 90) -> tuple[dict[str, Any], str]:
    """``python -m <module> ARGS``: its JSON result and its stderr, once the namespaces it made
    (``nsmb<pid>-*``) are gone; AssertionError when it exits non-zero."""
    with subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(f"{module} did not finish in {timeout} s: {err[-3000:]}") from None
    mine = f"nsmb{proc.pid}-"
    deadline = time.monotonic() + 10
    while any(n.startswith(mine) for n in nsns.list_netns()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [n for n in nsns.list_netns() if n.startswith(mine)], "namespaces left behind"
    assert proc.returncode == 0, err[-4000:]
    return json.loads(out), err


@pytest.mark.timeout(120)
def test_heal_benchmark_smoke() -> None:
    result, err = bench("bench.heal", "--quick", "--runs", "1", "--faults", "endpoint-kill")
    assert result["failures"] == 0, result["failure_examples"]
    (name,) = result["faults"]
    fault = result["faults"][name]
    assert name == "endpoint-kill" and fault["healed"] == "1/1"
    (run,) = fault["runs"]
    assert run["heal_s"] is not None and 0 < run["heal_s"] < 30
    assert run["endpoint_after"] != "" and run["refresh_after"] is True
    assert run["sent"] > 0 and run["gap_s"] >= 0.0
    assert [b["name"] for b in result["bars"]] == ["endpoint-kill: heal p50 (s)"]
    assert "endpoint-kill" in err and "ref 60 s" in err


@pytest.mark.timeout(120)
def test_chaos_soak_smoke() -> None:
    result, err = bench("bench.chaos", "--duration", "12s", "--connections", "5",
                        "--targets", "endpoint", "registry")
    assert result["failures"] == 0, result["failure_examples"]
    assert result["connected"] == 5 and result["final_not_carrying"] == []
    assert result["faults"] and all(f["recovered"] for f in result["faults"])
    assert {f["target"].split(".")[0] for f in result["faults"]} <= {"nse", "registry"}
    assert all(items == [] for items in result["leaks"].values()), result["leaks"]
    assert set(result["leaks"]) == {"kernel and monitors", "client pods", "registrations",
                                    "processes"}
    assert result["summary"]["leaked"] == 0
    assert "#1 " in err and "things left" in err

"""e2e/kind: the default test run leaves it out, it skips cleanly and fast (with its reason)
where kind is missing, and the objects it creates are valid against the API's schemas."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from e2e.kind.kube import client, endpoint, tools_pod

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[2]


def test_default_run_leaves_the_kind_suite_out() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert config["testpaths"] == ["tests"]


def test_skips_with_its_reason_without_the_tools(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(tmp_path), "PYTHONPATH": str(ROOT)}
    start = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-p", "no:xdist", "e2e/kind"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "the kind suite needs docker, kind, kubectl on PATH" in run.stdout
    assert " passed" not in run.stdout and "skipped" in run.stdout
    assert time.monotonic() - start < 60


def test_the_suites_objects_are_valid() -> None:
    docs = [
        endpoint("nse", "svc", "172.16.1.0/24", node="w1"),
        client("c", ["kernel://svc/nsm-1"], away_from="nse"),
        client("c2", ["kernel://a/nsm-1", "kernel://b/nsm-2"], node="w2"),
        tools_pod(),
    ]
    for doc in docs:
        kubernetes_validate.validate(doc, "1.32", strict=True)


def test_kind_config_and_ci() -> None:
    kind = yaml.safe_load((ROOT / "e2e" / "kind" / "kind-config.yaml").read_text())
    assert [n["role"] for n in kind["nodes"]] == ["control-plane", "worker", "worker"]
    assert os.access(ROOT / "e2e" / "kind" / "run.sh", os.X_OK)
    subprocess.run(["bash", "-n", str(ROOT / "e2e" / "kind" / "run.sh")], check=True, timeout=10)
    ci = yaml.safe_load((ROOT / ".github" / "workflows" / "ci.yml").read_text())
    steps = [s.get("run", "") for job in ci["jobs"].values() for s in job["steps"]]
    assert any("./dev test" in s for s in steps) and any("e2e/kind/run.sh" in s for s in steps)

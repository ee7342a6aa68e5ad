"""The kind suite's fixtures. The suite needs docker, kind and kubectl on PATH and a kind
cluster with the mesh deployed (e2e/kind/run.sh makes one); without them every test skips, with
the reason, at once."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest

from e2e.kind.kube import Kube, missing_tools


@pytest.fixture(scope="session")
def kube() -> Kube:
    missing = missing_tools()
    if missing:
        pytest.skip(
            f"the kind suite needs {', '.join(missing)} on PATH (run e2e/kind/run.sh where "
            f"docker, kind and kubectl are installed)"
        )
    k = Kube(os.environ.get("NSM_KIND_CONTEXT"))
    try:
        k.run("-n", "nsm-system", "get", "daemonset/nsm-node", "deployment/registry", timeout=15)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        pytest.skip(f"no cluster with the mesh deployed ({detail.strip()[:200]}): run e2e/kind/run.sh")
    if len(k.workers()) < 2:
        pytest.skip("the kind suite needs two worker nodes (e2e/kind/kind-config.yaml)")
    return k


@pytest.fixture
def ns(kube: Kube) -> Iterator[str]:
    """A namespace for one test, deleted afterwards (with everything in it)."""
    name = kube.namespace()
    try:
        yield name
    finally:
        kube.run("delete", "namespace", name, "--wait=true", "--timeout=120s", check=False, timeout=180)

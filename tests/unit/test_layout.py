"""The layout shows the architecture, and stays that way:

- product code (everything in ``nsm/`` but the emulated cluster ``nsm/lab/``) never imports the
  lab, the benchmarks or test code, and imports without any test tooling installed;
- only ``nsm/kernel/netlink`` talks to pyroute2;
- the lab, the benchmarks and the tests reach the kernel through ``nsm.kernel``, never through a
  role's modules.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NSM = ROOT / "nsm"
TOOLING = ("nsm.lab", "bench", "tests", "conftest", "pytest", "scapy", "hypothesis")

pytestmark = pytest.mark.timeout(60)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _product_files() -> list[Path]:
    return [p for p in sorted(NSM.rglob("*.py"))
            if "lab" not in p.relative_to(NSM).parts[:1] and not p.name.endswith(("_pb2.py", "_pb2_grpc.py"))]


def _is(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_product_modules_import_no_lab_bench_or_test_code() -> None:
    bad = {_module(p): sorted(i for i in _imports(p) if any(_is(i, t) for t in TOOLING))
           for p in _product_files()}
    assert not {m: i for m, i in bad.items() if i}


def test_only_the_netlink_package_imports_pyroute2() -> None:
    users = sorted(_module(p) for p in NSM.rglob("*.py") if any(_is(i, "pyroute2") for i in _imports(p)))
    assert users and all(_is(u, "nsm.kernel.netlink") for u in users), users


def test_lab_bench_and_tests_reach_the_kernel_through_nsm_kernel() -> None:
    files = [*sorted((NSM / "lab").rglob("*.py")), *sorted((ROOT / "bench").rglob("*.py")),
             *sorted((ROOT / "tests").rglob("*.py"))]
    bad = {str(p.relative_to(ROOT)): sorted(i for i in _imports(p) if _is(i, "nsm.forwarder.netlink"))
           for p in files}
    assert not {f: i for f, i in bad.items() if i}


def test_product_imports_without_test_tooling() -> None:
    """Every product module imports in a fresh interpreter where pytest, scapy and hypothesis
    cannot be imported (as on a node that has only the package installed)."""
    modules = [_module(p) for p in _product_files()]
    script = (
        "import sys\n"
        "for blocked in ('pytest', 'scapy', 'hypothesis', '_pytest', 'xdist'):\n"
        "    sys.modules[blocked] = None\n"
        "import importlib\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        "leaked = sorted(m for m in sys.modules if m == 'nsm.lab' or m.startswith('nsm.lab.'))\n"
        "assert not leaked, leaked\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                            timeout=50, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]

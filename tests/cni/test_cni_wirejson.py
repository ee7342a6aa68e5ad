"""The plugin's JSON (``nsm.cni.wirejson``, on ``_json`` alone so that a start does not import
``re``): the same documents as ``json``, the same errors as ValueError, and a plugin start
that imports neither ``json`` nor ``re``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nsm.cni import wirejson

pytestmark = pytest.mark.timeout(20)

ROOT = Path(__file__).resolve().parents[2]


def _start(code: str) -> subprocess.CompletedProcess[str]:
    """``code`` run as a plugin start is: a fresh interpreter, no ``site``, the package's root."""
    return subprocess.run([sys.executable, "-S", "-P", "-c", code], capture_output=True, text=True,
                          timeout=20, env={**os.environ, "PYTHONPATH": str(ROOT)})


DOCUMENTS = [
    {"cniVersion": "1.1.0", "name": "podnet", "plugins": [{"type": "bridge", "mtu": 1500}]},
    {"interfaces": [{"name": "nsm-1", "sandbox": "/var/run/netns/p"}], "ips": [], "x": None},
    [1, -2, 3.5, 1e100, -0.0, True, False, None, "é\n\t\"\\ \u2028"],
    {}, [], "", 0, "text",
    {"nested": {"deep": [{"k": [[], {}]}]}},
]


@pytest.mark.parametrize("doc", DOCUMENTS)
def test_same_documents_as_json(doc: object) -> None:
    assert wirejson.dumps(doc) == json.dumps(doc)
    assert wirejson.dumps(doc, compact=True) == json.dumps(doc, separators=(",", ":"))
    assert wirejson.loads(json.dumps(doc)) == doc
    assert wirejson.loads(json.dumps(doc, indent=2).encode()) == doc


@pytest.mark.parametrize("bad", ["", " ", "{not json", "[1, 2", "1 2", "{'a': 1}", "nul", "[1,]"])
def test_what_json_refuses_is_a_value_error(bad: str) -> None:
    with pytest.raises(ValueError):
        json.loads(bad)
    with pytest.raises(ValueError):
        wirejson.loads(bad)


def test_not_utf8_and_not_serializable() -> None:
    with pytest.raises(UnicodeDecodeError):
        wirejson.loads(b'"\xff"')
    with pytest.raises(TypeError, match="set is not JSON serializable"):
        wirejson.dumps({"x": {1, 2}})


def test_malformed_input_in_a_fresh_process_is_a_value_error() -> None:
    """Before json.decoder is imported the C scanner fails without its error (SystemError)."""
    code = ("from nsm.cni import wirejson\n"
            "try:\n    wirejson.loads('{not json')\nexcept ValueError as e:\n    print('ValueError', e)")
    out = _start(code)
    assert out.returncode == 0 and out.stdout.startswith("ValueError Expecting property name"), out


def test_a_plugin_start_imports_neither_json_nor_re() -> None:
    code = ("import sys; from nsm.cni import plugin; "
            "print(sorted(m for m in ('json', 're', 'enum', 'typing') if m in sys.modules))")
    out = _start(code)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out


def test_plugin_modules_are_what_a_start_imports() -> None:
    """A wrapper compiles and an image's bundle carries ``PLUGIN_MODULES``: exactly the
    package's modules a start of the plugin imports."""
    from nsm.cni.plugin import PLUGIN_MODULES

    code = ("import json, sys; from nsm.cni import plugin; "
            "print(json.dumps(sorted(getattr(m, '__file__', '') for n, m in sys.modules.items() "
            "if n == 'nsm' or n.startswith('nsm.'))))")
    out = _start(code)
    assert out.returncode == 0, out
    imported = sorted(str(Path(f).relative_to(ROOT)) for f in json.loads(out.stdout))
    assert imported == sorted(PLUGIN_MODULES)

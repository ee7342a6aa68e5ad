"""deploy/base's RBAC is exactly what the code calls.

The calls are derived from the code, not listed by hand: every module of ``nsm/`` that imports
lightkube is read (AST) for the resources it imports from ``lightkube.resources`` and the client
methods it calls on them (directly, ``client.get(Pod, ...)``, or through a helper taking the
method's name, ``self._call(what, "patch", ...)``); lightkube's own resource metadata gives
the API group and plural, and the method gives the RBAC verb. A second test runs the pod API
(:class:`nsm.cni.k8s.PodApi`) against a recording HTTP server and checks that the requests it
makes are those verbs on those resources.
"""

from __future__ import annotations

import ast
import importlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from nsm.cni.attachments import Link
from tests.deploy.render import containers, find, pod_specs, render

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
#: lightkube client method → RBAC verb.
VERBS = {"get": "get", "list": "list", "watch": "watch", "patch": "patch", "apply": "patch",
         "create": "create", "delete": "delete", "deletecollection": "deletecollection",
         "replace": "update"}
#: HTTP method (with a name in the path or not) → RBAC verb.
HTTP_VERBS = {("GET", True): "get", ("GET", False): "list", ("PATCH", True): "patch",
              ("POST", False): "create", ("PUT", True): "update", ("DELETE", True): "delete"}

Rule = tuple[str, str, str]  # (API group, resource, verb)


def lightkube_modules() -> list[Path]:
    out = []
    for path in sorted((ROOT / "nsm").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "lightkube" or n.startswith("lightkube.") for n in names):
                out.append(path)
                break
    return out


def calls_in(path: Path) -> set[Rule]:
    tree = ast.parse(path.read_text())
    resources: dict[str, Any] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lightkube.resources."):
            module = importlib.import_module(node.module or "")
            for alias in node.names:
                resources[alias.asname or alias.name] = getattr(module, alias.name)
    methods: set[str] = set()
    used: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        # client.<verb>(Resource, ...)
        if isinstance(func, ast.Attribute) and func.attr in VERBS and node.args \
                and isinstance(node.args[0], ast.Name) and node.args[0].id in resources:
            methods.add(func.attr)
            used.add(node.args[0].id)
        # getattr(client, method)(Resource, ...): the method names come from the helper's callers
        if isinstance(func, ast.Call) and isinstance(func.func, ast.Name) and func.func.id == "getattr" \
                and node.args and isinstance(node.args[0], ast.Name) and node.args[0].id in resources:
            used.add(node.args[0].id)
        # self._call(what, "<verb>", ...)
        if isinstance(func, ast.Attribute) and func.attr == "_call":
            literal = [a.value for a in node.args if isinstance(a, ast.Constant) and a.value in VERBS]
            assert literal, f"{path}:{node.lineno}: a _call without a literal method name"
            methods.update(literal)
    assert used, f"{path} imports lightkube but no resource is called"
    return {(resources[r]._api_info.resource.group, resources[r]._api_info.plural, VERBS[m])
            for r in used for m in methods}


def code_calls() -> set[Rule]:
    return {rule for path in lightkube_modules() for rule in calls_in(path)}


def granted(docs: list[dict[str, Any]], service_account: str) -> set[Rule]:
    roles = {(d["kind"], d["metadata"]["name"]): d for d in docs if d["kind"] in ("Role", "ClusterRole")}
    out: set[Rule] = set()
    for b in docs:
        if b["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        if not any(s["kind"] == "ServiceAccount" and s["name"] == service_account for s in b["subjects"]):
            continue
        role = roles[(b["roleRef"]["kind"], b["roleRef"]["name"])]
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] and "*" not in rule["resources"], rule
            out |= {(g, r, v) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    return out


def test_only_the_cni_agent_talks_to_the_api() -> None:
    """If another module starts calling the API, its calls join the derivation (and the node's
    or another account's role must follow)."""
    assert [p.relative_to(ROOT).as_posix() for p in lightkube_modules()] == ["nsm/cni/k8s.py"]


def test_rbac_equals_what_the_code_calls() -> None:
    calls = code_calls()
    assert calls == {("", "pods", "get"), ("", "pods", "patch")}  # what nsm/cni/k8s.py does today
    docs = render("base")
    ds = find(docs, "DaemonSet", "nsm-node")
    pod = pod_specs(ds)[0]
    assert granted(docs, pod["serviceAccountName"]) == calls
    # and only the container that uses it is told to use it
    users = [c["name"] for c in containers(ds)
             if any(e["name"] == "NSM_KUBERNETES" and e["value"] == "true" for e in c.get("env", []))]
    assert users == ["cni-agent"]


def test_accounts_that_call_nothing_have_nothing() -> None:
    docs = render("base")
    reg = find(docs, "Deployment", "registry")
    pod = pod_specs(reg)[0]
    assert granted(docs, pod["serviceAccountName"]) == set()
    assert pod["automountServiceAccountToken"] is False
    for k in ("examples/kernel2kernel", "uninstall"):
        for d in render(k):
            assert d["kind"] not in ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding")
            for p in pod_specs(d):
                assert p.get("automountServiceAccountToken") is False, (k, d["metadata"]["name"])


class _Recorder(BaseHTTPRequestHandler):
    seen: list[tuple[str, str]]

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.server.seen.append((self.command, self.path))  # type: ignore[attr-defined]
        body = json.dumps({"apiVersion": "v1", "kind": "Pod",
                           "metadata": {"name": "p", "namespace": "ns",
                                        "annotations": {"networkservicemesh.io": "kernel://s/nsm-1"}}})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    do_GET = do_PATCH = do_POST = do_PUT = do_DELETE = _answer

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def api_server(tmp_path: Path) -> Iterator[tuple[str, list[tuple[str, str]]]]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    server.seen = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "t",
        "clusters": [{"name": "t", "cluster": {"server": f"http://127.0.0.1:{server.server_port}"}}],
        "contexts": [{"name": "t", "context": {"cluster": "t", "user": "t"}}],
        "users": [{"name": "t", "user": {"token": "x"}}]}))
    try:
        yield str(kubeconfig), server.seen  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


async def test_the_requests_made_are_the_derived_verbs(api_server: tuple[str, list[tuple[str, str]]]) -> None:
    from nsm.cni.k8s import PodApi

    kubeconfig, seen = api_server
    api = PodApi(kubeconfig=kubeconfig)
    try:
        assert await api.requested("ns", "p") == "kernel://s/nsm-1"
        link = Link(service="s", ifname="nsm-1", conn_id="c")
        await api.report("ns", "p", [link])
        await api.report("ns", "p", None)
    finally:
        await api.close()
    rules = set()
    for method, path in seen:
        parts = path.split("?")[0].strip("/").split("/")  # api/v1/namespaces/ns/pods/p
        assert parts[:3] == ["api", "v1", "namespaces"], path
        rules.add(("", parts[4], HTTP_VERBS[(method, len(parts) > 5)]))
    assert rules == code_calls()

"""Rendering ``deploy/``'s kustomizations for the tests: ``kubectl kustomize`` (kustomize built
into kubectl) or a ``kustomize`` binary when either is on PATH; otherwise a small renderer in
Python that merges the ``resources`` a kustomization lists (recursively) and applies
``namespace``, ``images`` and ``labels`` — enough for the base, the example and the uninstall
set; a kustomization with ``patches`` needs the real tool (the tests that need it skip)."""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
#: Every kustomization a user applies.
KUSTOMIZATIONS = ["base", "overlays/kind", "overlays/spire", "examples/kernel2kernel",
                  "overlays/spire/kernel2kernel", "uninstall"]
#: Kinds without a namespace (kustomize's namespace transformer leaves them alone).
CLUSTER_KINDS = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                 "ClusterSPIFFEID"}


def tool() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def render(path: str | Path, *, python: bool = False) -> list[dict[str, Any]]:
    """The documents ``kustomize build path`` gives."""
    directory = Path(path) if Path(path).is_absolute() else DEPLOY / path
    cmd = None if python else tool()
    if cmd is not None:
        out = subprocess.run([*cmd, str(directory)], capture_output=True, text=True, timeout=60,
                             check=True).stdout
        return [d for d in yaml.safe_load_all(out) if d]
    return _render_python(directory)


class NeedsKustomize(Exception):
    pass


def _render_python(directory: Path) -> list[dict[str, Any]]:
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    if k.get("patches") or k.get("patchesStrategicMerge") or k.get("patchesJson6902"):
        raise NeedsKustomize(f"{directory} has patches: needs kustomize (or kubectl) on PATH")
    docs: list[dict[str, Any]] = []
    for res in k.get("resources", []):
        target = directory / res
        if target.is_dir():
            docs.extend(_render_python(target))
        else:
            docs.extend(d for d in yaml.safe_load_all(target.read_text()) if d)
    docs = copy.deepcopy(docs)
    for doc in docs:
        if k.get("namespace") and doc["kind"] not in CLUSTER_KINDS:
            doc.setdefault("metadata", {})["namespace"] = k["namespace"]
        if k.get("namespace"):
            for subject in doc.get("subjects", []) or []:
                if subject.get("kind") == "ServiceAccount":
                    subject["namespace"] = k["namespace"]
        for group in k.get("labels", []):
            doc["metadata"].setdefault("labels", {}).update(group.get("pairs", {}))
        for pod in pod_specs(doc):
            for c in pod.get("containers", []) + pod.get("initContainers", []):
                for image in k.get("images", []):
                    name, _, _ = c["image"].partition(":")
                    if name == image["name"]:
                        c["image"] = f"{image.get('newName', name)}:{image.get('newTag', 'latest')}"
    return docs


def pod_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The pod spec(s) in a document (a Pod, or a workload's template)."""
    if doc.get("kind") == "Pod":
        return [doc["spec"]]
    template = (doc.get("spec") or {}).get("template")
    return [template["spec"]] if template and "spec" in template else []


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for pod in pod_specs(doc) for c in pod.get("initContainers", []) + pod.get("containers", [])]


def env_of(container: dict[str, Any], values: dict[str, str]) -> dict[str, str]:
    """The container's environment, ``$(VAR)`` expanded as the kubelet does; ``valueFrom``
    entries take ``values[name]``."""
    env: dict[str, str] = {}
    for e in container.get("env", []):
        if "valueFrom" in e:
            env[e["name"]] = values[e["name"]]
            continue
        value = e.get("value", "")
        for k, v in env.items():
            value = value.replace(f"$({k})", v)
        env[e["name"]] = value
    return env


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    for d in docs:
        if d["kind"] == kind and d["metadata"]["name"] == name:
            return d
    raise KeyError(f"{kind}/{name}")


def have_tool() -> bool:
    return tool() is not None


__all__ = ["DEPLOY", "KUSTOMIZATIONS", "NeedsKustomize", "containers", "env_of", "find", "have_tool",
           "pod_specs", "render"]

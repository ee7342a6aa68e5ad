"""kubectl for the kind suite: a context, JSON answers, waiting, exec, and the suite's objects
(an endpoint Deployment and a client pod like deploy/examples/kernel2kernel's, per test).

Identities as in deploy/base: the cluster's CA is the Secret ``nsm-ca`` in nsm-system (made by
run.sh with ``nsm ca-init``); each test namespace gets a copy, mounted read-only by the pods of
the nsm image (the endpoints, the tools pod) at CA_DIR."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("NSM_KIND_IMAGE", "nsm:dev")
CLIENT_IMAGE = os.environ.get("NSM_KIND_CLIENT_IMAGE", "nsm-e2e:dev")
TOOLS = ("docker", "kind", "kubectl")
#: deploy/base's identity settings (tests/deploy checks they agree).
TRUST_DOMAIN = "k8s.nsm"
CA_SECRET = "nsm-ca"
CA_DIR = "/etc/nsm/ca"


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


def retry(check: Callable[[], T], *, timeout: float = 60.0, interval: float = 0.5, what: str = "") -> T:
    """``check()``'s first result that is true and raises nothing (the reference's suites retry
    every step for up to a minute); the last error after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
            if value:
                return value
            error: Exception = AssertionError(f"{what or check}: {value!r}")
        except (AssertionError, subprocess.CalledProcessError, ValueError, KeyError, IndexError) as exc:
            error = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"{what or check} not reached within {timeout:.0f}s: {error}") from error
        time.sleep(interval)


class Kube:
    def __init__(self, context: str | None = None) -> None:
        self.context = context

    def run(
        self,
        *args: str,
        input: str | None = None,
        timeout: float = 120,
        check: bool = True,
        namespace: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        cmd = [
            "kubectl",
            *(["--context", self.context] if self.context else []),
            *(["-n", namespace] if namespace else []),
            *args,
        ]
        proc = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, cmd, proc.stdout, proc.stderr)
        return proc

    def json(self, *args: str, namespace: str | None = None) -> Any:
        return json.loads(self.run(*args, "-o", "json", namespace=namespace).stdout)

    def apply(self, *docs: dict[str, Any]) -> None:
        self.run(
            "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(docs)})
        )

    def exec(
        self,
        namespace: str,
        pod: str,
        *cmd: str,
        container: str | None = None,
        input: str | None = None,
        timeout: float = 60,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        return self.run(
            "exec",
            *(["-i"] if input is not None else []),
            pod,
            *(["-c", container] if container else []),
            "--",
            *cmd,
            input=input,
            timeout=timeout,
            check=check,
            namespace=namespace,
        )

    def wait_ready(self, namespace: str, selector: str, timeout: float = 120) -> list[dict[str, Any]]:
        """The pods of ``selector`` once they all exist and are Ready."""

        def ready() -> list[dict[str, Any]]:
            pods = self.json("get", "pods", "-l", selector, namespace=namespace)["items"]
            ok = pods and all(
                any(
                    c["type"] == "Ready" and c["status"] == "True"
                    for c in p.get("status", {}).get("conditions", [])
                )
                and p["metadata"].get("deletionTimestamp") is None
                for p in pods
            )
            return pods if ok else []

        return retry(ready, timeout=timeout, what=f"pods {selector} in {namespace} ready")

    def workers(self) -> list[str]:
        nodes = self.json("get", "nodes", "-l", "!node-role.kubernetes.io/control-plane")["items"]
        return sorted(n["metadata"]["name"] for n in nodes)

    def node_pod(self, node: str) -> str:
        """The nsm-node DaemonSet's pod on ``node``."""
        pods = self.json(
            "get",
            "pods",
            "-l",
            "app=nsm-node",
            "--field-selector",
            f"spec.nodeName={node}",
            namespace="nsm-system",
        )["items"]
        live = [p for p in pods if p["metadata"].get("deletionTimestamp") is None]
        assert len(live) == 1, [p["metadata"]["name"] for p in pods]
        return live[0]["metadata"]["name"]

    def namespace(self, prefix: str = "nsm-e2e") -> str:
        name = f"{prefix}-{secrets.token_hex(3)}"
        self.apply(
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": name, "labels": {"pod-security.kubernetes.io/enforce": "privileged"}},
            }
        )
        self.copy_ca(name)
        return name

    def copy_ca(self, namespace: str) -> None:
        """The cluster's CA Secret (nsm-system's ``nsm-ca``) into ``namespace``, for its NSM pods."""
        secret = self.json("get", "secret", CA_SECRET, namespace="nsm-system")
        self.apply(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": CA_SECRET, "namespace": namespace},
                "type": secret.get("type", "Opaque"),
                "data": secret["data"],
            }
        )


def ca_identity(env: list[dict[str, Any]], spec: dict[str, Any]) -> None:
    """Give a pod of the nsm image its identity from the CA Secret (as deploy/base does): the
    settings appended to ``env``, the Secret mounted read-only (group-readable by the image's
    user) into ``spec``'s first container."""
    env += [
        {"name": "NSM_TRUST_DOMAIN", "value": TRUST_DOMAIN},
        {"name": "NSM_CA_DIR", "value": CA_DIR},
    ]
    spec["securityContext"] = {"fsGroup": 10001}
    spec["volumes"] = [{"name": CA_SECRET, "secret": {"secretName": CA_SECRET, "defaultMode": 0o440}}]
    spec["containers"][0]["volumeMounts"] = [{"name": CA_SECRET, "mountPath": CA_DIR, "readOnly": True}]


def node_links(node: str) -> set[str]:
    """The mesh's links in a kind node's own namespace (node veth ends nsv…, VXLAN nsx…, bridges
    nsb…), read with docker exec (a kind node is a container)."""
    out = subprocess.run(
        ["docker", "exec", node, "ip", "-o", "link", "show"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    names = {line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line}
    return {n for n in names if n.startswith(("nsv", "nsx", "nsb"))}


def endpoint(
    name: str, service: str, cidr: str, *, node: str | None = None, replicas: int = 1
) -> dict[str, Any]:
    """deploy/examples/kernel2kernel/endpoint.yaml's Deployment for ``service``."""
    env = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "NODE_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
        {"name": "NSM_NAME", "value": "$(POD_NAME)"},
        {"name": "NSM_SERVICE", "value": service},
        {"name": "NSM_CIDR", "value": cidr},
        {"name": "NSM_LISTEN", "value": "tcp://$(POD_IP):5003"},
        {"name": "NSM_REGISTRY", "value": "tcp://$(NODE_IP):5001"},
        {"name": "NSM_LOG_LEVEL", "value": "debug"},
    ]
    spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "containers": [
            {
                "name": "nse",
                "image": IMAGE,
                "imagePullPolicy": "Never",
                "args": ["nse"],
                "env": env,
                # mutual TLS only: no grpc: probe (the kubelet dials plaintext)
                "readinessProbe": {
                    "exec": {"command": ["nsm", "health"]},
                    "periodSeconds": 2,
                    "timeoutSeconds": 5,
                },
            }
        ],
    }
    ca_identity(env, spec)
    env.append(
        {"name": "NSM_SPIFFE_ID", "value": "spiffe://$(NSM_TRUST_DOMAIN)/ns/$(POD_NAMESPACE)/pod/$(POD_NAME)"}
    )
    if node:
        spec["nodeSelector"] = {"kubernetes.io/hostname": node}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name, "nsm-role": "endpoint"}}, "spec": spec},
        },
    }


def client(
    name: str, requests: Sequence[str], *, node: str | None = None, away_from: str | None = None
) -> dict[str, Any]:
    """A client pod asking for ``requests`` by annotation, on ``node`` or on another node than
    the pods labelled ``app=<away_from>`` (pod anti-affinity)."""
    spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": 1,
        "containers": [
            {
                "name": "client",
                "image": CLIENT_IMAGE,
                "imagePullPolicy": "Never",
                "command": ["sleep", "infinity"],
                "securityContext": {"runAsUser": 0},
            }
        ],
    }
    if node:
        spec["nodeSelector"] = {"kubernetes.io/hostname": node}
    if away_from:
        spec["affinity"] = {
            "podAntiAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "labelSelector": {"matchLabels": {"app": away_from}},
                        "topologyKey": "kubernetes.io/hostname",
                    }
                ]
            }
        }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": {"app": name},
            "annotations": {"networkservicemesh.io": ",".join(requests)},
        },
        "spec": spec,
    }


def tools_pod(name: str = "tools") -> dict[str, Any]:
    """A pod of the client image to talk to the registry from inside the cluster (with an
    identity from the CA Secret: the registry takes mutual TLS only)."""
    env: list[dict[str, Any]] = []
    spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": 1,
        "containers": [
            {
                "name": "tools",
                "image": CLIENT_IMAGE,
                "imagePullPolicy": "Never",
                "command": ["sleep", "infinity"],
                "env": env,
            }
        ],
    }
    ca_identity(env, spec)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": spec,
    }


#: Registers a NetworkService with a payload at the cluster's registry (argv: name, payload).
REGISTER_SERVICE = """
import asyncio, sys
from nsm.api.registry_pb2 import NetworkService
from nsm.registry.client import RegistryClient
from nsm.security.options import security_from_environment
from nsm.transport import dial

async def main():
    security = security_from_environment("spiffe://k8s.nsm/ns/default/pod/tools")
    await security.start()
    channel = dial("tcp://registry.nsm-system.svc.cluster.local:5002", security)
    try:
        await RegistryClient(channel).register_ns(NetworkService(name=sys.argv[1], payload=sys.argv[2]))
    finally:
        await channel.close()
        await security.close()

asyncio.run(main())
"""

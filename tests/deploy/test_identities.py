"""Identities in deploy/: every NSM daemon runs secure with an identity every other trusts.

- base (and the kind overlay, the example): every NSM container issues its SVID from the
  cluster's one CA, the Secret ``nsm-ca`` mounted read-only, ``NSM_CA_DIR`` pointing at it,
  one ``NSM_TRUST_DOMAIN``; its probes are exec probes (the kubelet's ``grpc:`` probes cannot do
  mutual TLS);
- the SPIRE overlay: the Workload API socket instead (``NSM_SPIFFE_SOCKET``, the agent's socket
  directory from the host), no CA Secret; its ClusterSPIFFEIDs (a custom resource: no schema
  to validate against, so its shape is checked here) give each daemon exactly the ID the code
  gives it with the built-in CA, and the trust domain as DNS name;
- ``nsm ca-init`` makes a CA that a daemon uses from a read-only directory (as a Secret
  volume is), and refuses bad input clearly; e2e/kind/run.sh makes it before deploying.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from nsm.lab.processes import daemon_env
from nsm.security.ca import CertificateAuthority
from nsm.security.ids import CNI_AGENT, FORWARDER, MANAGER, identity_name, node_id, parse_id, registry_id
from nsm.security.svid import verify_chain
from tests.deploy.render import NeedsKustomize, containers, env_of, pod_specs, render

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
DAEMONS = {"registry", "manager", "forwarder", "cni-agent", "nse"}
FIELDS = {"NODE_NAME": "node1", "NODE_IP": "10.0.0.1", "POD_NAME": "pod-1", "POD_IP": "10.1.0.5",
          "POD_NAMESPACE": "nsm-examples"}
CA_MODE = ["base", "overlays/kind", "examples/kernel2kernel"]
SPIRE_MODE = ["overlays/spire", "overlays/spire/kernel2kernel"]
SOCKET = "unix:///run/spire/sockets/agent.sock"
Doc = dict[str, Any]


def rendered(kustomization: str) -> list[Doc]:
    try:
        return render(kustomization)
    except NeedsKustomize as exc:
        pytest.skip(str(exc))


def daemons(docs: list[Doc]) -> list[tuple[Doc, Doc, Doc]]:
    """(document, pod spec, container) of every NSM daemon container."""
    return [(d, pod, c) for d in docs for pod in pod_specs(d) for c in pod.get("containers", [])
            if c["image"].split(":")[0].endswith("nsm") and (c.get("args") or [""])[0] in DAEMONS]


def trust_domain() -> str:
    domains = {env_of(c, FIELDS).get("NSM_TRUST_DOMAIN") for k in CA_MODE + SPIRE_MODE
               for _, _, c in daemons(rendered(k))}
    assert len(domains) == 1 and None not in domains, domains
    return str(domains.pop())


def volume(pod: Doc, container: Doc, path: str) -> tuple[Doc, Doc]:
    """The mount at ``path`` and its volume."""
    mounts = [m for m in container.get("volumeMounts", []) if m["mountPath"] == path]
    assert len(mounts) == 1, f"{container['name']}: nothing mounted at {path}"
    return mounts[0], next(v for v in pod["volumes"] if v["name"] == mounts[0]["name"])


def each_daemon(kustomization: str) -> list[tuple[str, Doc, Doc, dict[str, str]]]:
    """(where, pod spec, container, environment) of every daemon of ``kustomization``, all of
    the one trust domain; the mesh's four daemons (or the example's endpoint) among them."""
    out = []
    for doc, pod, c in daemons(rendered(kustomization)):
        where = f"{kustomization}: {doc['metadata']['name']}/{c['name']}"
        env = env_of(c, FIELDS)
        assert env.get("NSM_TRUST_DOMAIN") == trust_domain(), where
        out.append((where, pod, c, env))
    roles = {"nse"} if "kernel2kernel" in kustomization else {"registry", "manager", "forwarder", "cni-agent"}
    assert {c["args"][0] for _, _, c, _ in out} >= roles, kustomization
    return out


@pytest.mark.parametrize("kustomization", CA_MODE)
def test_every_daemon_has_the_cluster_ca(kustomization: str) -> None:
    for where, pod, c, env in each_daemon(kustomization):
        assert "NSM_SPIFFE_SOCKET" not in env and "NSM_SVID_DIR" not in env, where
        assert env.get("NSM_INSECURE", "false") == "false", where
        mount, vol = volume(pod, c, env["NSM_CA_DIR"])
        assert mount.get("readOnly") is True, where
        assert vol.get("secret", {}).get("secretName") == "nsm-ca", where
        mode = vol["secret"]["defaultMode"]
        assert mode & 0o007 == 0, f"{where}: the CA key is readable by every user ({mode:o})"
        user = c.get("securityContext", {}).get("runAsUser", pod.get("securityContext", {}).get("runAsUser"))
        if user != 0:  # the image's user reads it through the pod's group
            assert pod.get("securityContext", {}).get("fsGroup") == user and mode & 0o040, where


@pytest.mark.parametrize("kustomization", SPIRE_MODE)
def test_spire_overlay_uses_the_agent_socket(kustomization: str) -> None:
    for where, pod, c, env in each_daemon(kustomization):
        assert env.get("NSM_SPIFFE_SOCKET") == SOCKET, where
        assert "NSM_CA_DIR" not in env and "NSM_SPIFFE_ID" not in env, where
        mount, vol = volume(pod, c, "/run/spire/sockets")
        assert mount.get("readOnly") is True and vol["hostPath"]["path"] == "/run/spire/sockets", where
        assert not [v for v in pod["volumes"] if "secret" in v], f"{where}: a Secret is still mounted"
        assert not [m for m in c["volumeMounts"] if m["mountPath"] == "/etc/nsm/ca"], where


@pytest.mark.parametrize("kustomization", CA_MODE + SPIRE_MODE)
def test_probes_are_exec_probes(kustomization: str) -> None:
    """Servers take mutual TLS only; the kubelet's grpc: probe dials plaintext."""
    for doc, _, c in daemons(rendered(kustomization)):
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            if kind in c:
                assert c[kind].get("exec", {}).get("command") == ["nsm", "health"], (doc["metadata"]["name"],
                                                                                     c["name"], kind)


# -- ClusterSPIFFEID ------------------------------------------------------------------------

SPEC_FIELDS = {"spiffeIDTemplate", "dnsNameTemplates", "namespaceSelector", "podSelector",
               "workloadSelectorTemplates", "className", "ttl", "jwtTtl", "federatesWith", "admin",
               "downstream", "autoPopulateDNSNames", "fallback", "hint"}
OPERATORS = {"In", "NotIn", "Exists", "DoesNotExist"}


def check_selector(selector: Doc, where: str) -> None:
    assert set(selector) <= {"matchLabels", "matchExpressions"}, where
    assert all(isinstance(v, str) for v in selector.get("matchLabels", {}).values()), where
    for e in selector.get("matchExpressions", []):
        assert set(e) <= {"key", "operator", "values"} and e["operator"] in OPERATORS, where


def selects(selector: Doc | None, labels: dict[str, str]) -> bool:
    if not selector:
        return True
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        value, values = labels.get(e["key"]), e.get("values", [])
        ok = {"In": value in values, "NotIn": value not in values, "Exists": value is not None,
              "DoesNotExist": value is None}[e["operator"]]
        if not ok:
            return False
    return True


def execute(template: str, values: dict[str, str]) -> str:
    """A Go template of the controller manager's context (only ``{{ .A.B }}`` fields)."""
    def field(m: re.Match[str]) -> str:
        assert m.group(1) in values, f"unknown template field {m.group(1)} in {template}"
        return values[m.group(1)]

    out = re.sub(r"\{\{\s*\.([A-Za-z.]+)\s*\}\}", field, template)
    assert "{{" not in out, out
    return out


def expected_id(container: Doc, td: str) -> str:
    """The SPIFFE ID the code gives this daemon with the built-in CA (its role's default, or
    NSM_SPIFFE_ID): what SPIRE must give it too."""
    env = env_of(container, FIELDS)
    command = container["args"][0]
    if "NSM_SPIFFE_ID" in env:
        return env["NSM_SPIFFE_ID"]
    return {"registry": lambda: registry_id(td),
            "manager": lambda: node_id(td, env["NSM_NAME"], MANAGER),
            "forwarder": lambda: node_id(td, env.get("NSM_NODE") or env["NSM_NAME"], FORWARDER),
            "cni-agent": lambda: node_id(td, env["NSM_NODE"], CNI_AGENT)}[command]()


def test_cluster_spiffe_ids_give_each_daemon_its_id() -> None:
    td = trust_domain()
    spire = rendered("overlays/spire")
    ids = [d for d in spire if d["kind"] == "ClusterSPIFFEID"]
    assert ids
    for d in ids:
        where = d["metadata"]["name"]
        assert d["apiVersion"] == "spire.spiffe.io/v1alpha1" and set(d) == {"apiVersion", "kind", "metadata",
                                                                          "spec"}, where
        assert set(d["spec"]) <= SPEC_FIELDS and isinstance(d["spec"]["spiffeIDTemplate"], str), where
        for sel in ("namespaceSelector", "podSelector"):
            check_selector(d["spec"].get(sel, {}), where)
        for w in d["spec"].get("workloadSelectorTemplates", []):
            assert re.fullmatch(r"k8s:[a-z-]+:.+", w), where
    # In the CA mode's manifests, with the identities the code derives from their settings.
    docs = render("base") + render("examples/kernel2kernel")
    for doc, _, c in daemons(docs):
        namespace = doc["metadata"]["namespace"]
        labels = doc["spec"]["template"]["metadata"]["labels"] if "template" in doc["spec"] else \
            doc["metadata"].get("labels", {})
        names = {"kubernetes.io/metadata.name": namespace}
        matching = [d for d in ids
                    if selects(d["spec"].get("namespaceSelector"), names)
                    and selects(d["spec"].get("podSelector"), labels)
                    and all(w == f"k8s:container-name:{c['name']}"
                            for w in d["spec"].get("workloadSelectorTemplates", [])
                            if w.startswith("k8s:container-name:"))]
        where = f"{doc['metadata']['name']}/{c['name']}"
        assert len(matching) == 1, f"{where}: {[d['metadata']['name'] for d in matching]}"
        spec = matching[0]["spec"]
        values = {"TrustDomain": td, "PodSpec.NodeName": FIELDS["NODE_NAME"], "PodMeta.Namespace": namespace,
                  "PodMeta.Name": FIELDS["POD_NAME"]}
        got = execute(spec["spiffeIDTemplate"], values)
        assert got == expected_id(c, td), where
        role = parse_id(got).role
        assert role == (None if c["args"][0] == "nse" else c["args"][0]), where
        # The TLS server name, and a node daemon's own identity name (what the code derives).
        names = [td, identity_name(got, td)] if role is not None and parse_id(got).node else [td]
        assert [execute(t, values) for t in spec.get("dnsNameTemplates", [])] == names, where


# -- nsm ca-init ----------------------------------------------------------------------------


def nsm(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nsm.cli", *args], env=daemon_env(env or {}),
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_ca_init_makes_a_ca_the_daemons_use(tmp_path: Path) -> None:
    td = trust_domain()
    ca_dir = tmp_path / "ca"
    run = nsm("ca-init", "--dir", str(ca_dir), "--trust-domain", td)
    assert run.returncode == 0, run.stderr
    assert f"created a CA for trust domain {td}" in run.stdout
    assert "create secret generic nsm-ca" in run.stdout
    assert sorted(os.listdir(ca_dir)) == ["ca.key", "ca.pem"]
    assert (ca_dir / "ca.key").stat().st_mode & 0o077 == 0 and ca_dir.stat().st_mode & 0o077 == 0
    pem = (ca_dir / "ca.pem").read_bytes()
    # Two daemons given the directory issue SVIDs that chain to one bundle.
    manager = node_id(td, "node1", MANAGER)
    a = CertificateAuthority.open(ca_dir, td).issue(manager, dns_names=(td,))
    b = CertificateAuthority.open(ca_dir, td).issue(registry_id(td), dns_names=(td,))
    assert str(verify_chain(a.chain, b.bundle, td)) == manager
    assert str(verify_chain(b.chain, a.bundle, td)) == registry_id(td)
    again = nsm("ca-init", "--dir", str(ca_dir), "--trust-domain", td)
    assert again.returncode == 0 and "kept the existing CA" in again.stdout
    assert (ca_dir / "ca.pem").read_bytes() == pem


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="needs root and unshare (a read-only bind mount in a mount namespace)")
def test_a_daemon_uses_the_ca_from_a_read_only_directory(tmp_path: Path) -> None:
    """As from the Secret's volume: read-only, the files symlinks into ``..data`` (the kubelet's
    layout). A daemon's identity comes from it and nothing is written."""
    td = trust_domain()
    assert nsm("ca-init", "--dir", str(tmp_path / "made"), "--trust-domain", td).returncode == 0
    secret = tmp_path / "secret"
    (secret / "..2025_01_01").mkdir(parents=True)
    for name in ("ca.pem", "ca.key"):
        shutil.copy(tmp_path / "made" / name, secret / "..2025_01_01" / name)
        (secret / name).symlink_to(f"..data/{name}")
    (secret / "..data").symlink_to("..2025_01_01")
    script = textwrap.dedent(f"""
        import asyncio
        from nsm.security.options import security_from_environment
        async def main():
            s = security_from_environment("spiffe://{td}/nsm/node/node1/manager")
            await s.start()
            print("identity", s.id)
            await s.close()
        asyncio.run(main())
    """)
    run = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         'mount --bind -o ro "$0" "$0" && ! touch "$0/x" 2>/dev/null && exec "$1" -c "$2"',
         str(secret), sys.executable, script],
        env=daemon_env({"NSM_CA_DIR": str(secret), "NSM_TRUST_DOMAIN": td}), capture_output=True, text=True,
        timeout=60, cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"identity spiffe://{td}/nsm/node/node1/manager" in run.stdout
    assert sorted(os.listdir(secret)) == ["..2025_01_01", "..data", "ca.key", "ca.pem"]


def test_ca_init_refuses_bad_input(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    run = nsm("ca-init", "--dir", str(a_file))
    assert run.returncode == 2 and run.stderr.strip() == f"nsm ca-init: --dir {a_file} is not a directory"
    assert a_file.read_text() == "x"
    assert nsm("ca-init", "--dir", str(tmp_path / "ca"), "--trust-domain", "one.td").returncode == 0
    run = nsm("ca-init", "--dir", str(tmp_path / "ca"), "--trust-domain", "other.td")
    assert run.returncode == 2 and "is for trust domain one.td, not other.td" in run.stderr, run.stderr
    run = nsm("ca-init", "--dir", str(tmp_path / "x"), "--trust-domain", "Not A Domain")
    assert run.returncode == 2 and "not a valid SPIFFE trust domain" in run.stderr
    assert not (tmp_path / "x").exists()
    run = nsm("ca-init")
    assert run.returncode == 2 and "--dir" in run.stderr and "Traceback" not in run.stderr


def test_kind_run_makes_the_secret_before_deploying() -> None:
    """e2e/kind/run.sh and the suite's objects use the manifests' trust domain, Secret and path."""
    from e2e.kind import kube

    script = (ROOT / "e2e" / "kind" / "run.sh").read_text()
    assert f'TRUST_DOMAIN="{trust_domain()}"' in script
    assert "ca-init --dir" in script and '--trust-domain "$TRUST_DOMAIN"' in script
    assert script.index("create secret generic nsm-ca") < script.index("apply -k deploy/overlays/kind")
    assert kube.TRUST_DOMAIN == trust_domain() and kube.CA_SECRET == "nsm-ca"
    base_ca = {env_of(c, FIELDS)["NSM_CA_DIR"] for _, _, c in daemons(render("base"))}
    assert base_ca == {kube.CA_DIR}
    env = containers(kube.endpoint("nse", "svc", "172.16.1.0/24"))[0]["env"]
    assert {e["name"]: e.get("value") for e in env}["NSM_CA_DIR"] == kube.CA_DIR

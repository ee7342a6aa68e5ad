"""deploy/: every kustomization renders, every document is valid against the Kubernetes API's
schemas (kubernetes-validate, schemas bundled, no cluster), and the settings are what the
daemons read: every container runs ``nsm <command>`` with nothing but ``NSM_*`` variables that
are flags of that command, and its probes reach what it listens on."""

from __future__ import annotations

import argparse
import importlib
from typing import Any

import kubernetes_validate
import pytest

from nsm.cli import COMMANDS
from nsm.config import env_name
from nsm.transport import parse_url
from tests.deploy.render import (
    KUSTOMIZATIONS,
    NeedsKustomize,
    containers,
    find,
    have_tool,
    pod_specs,
    render,
)

pytestmark = pytest.mark.timeout(120)

#: The Kubernetes versions the kind suite runs against (the reference's CI: 1.29 to 1.32).
K8S_VERSIONS = ["1.29", "1.32"]
#: Custom resources of other projects (no schema in kubernetes-validate's bundle).
NOT_IN_THE_API_SCHEMAS = {("spire.spiffe.io/v1alpha1", "ClusterSPIFFEID")}
FIELD_VALUES = {"NODE_NAME": "node1", "NODE_IP": "10.0.0.1", "POD_NAME": "pod-1", "POD_IP": "10.1.0.5",
                "POD_NAMESPACE": "nsm-examples"}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    out = {}
    for k in KUSTOMIZATIONS:
        try:
            out[k] = render(k)
        except NeedsKustomize:
            continue
    return out


def documents(rendered: dict[str, list[dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    return [(k, d) for k, docs in rendered.items() for d in docs]


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_renders(kustomization: str) -> None:
    try:
        docs = render(kustomization)
    except NeedsKustomize as exc:
        pytest.skip(str(exc))
    assert docs, kustomization
    names = [(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names)), names


@pytest.mark.parametrize("kustomization", ["base", "examples/kernel2kernel", "uninstall"])
def test_python_renderer_agrees_with_kustomize(kustomization: str) -> None:
    """The Python fallback (used where no kustomize is installed) gives what kustomize gives."""
    if not have_tool():
        pytest.skip("neither kustomize nor kubectl on PATH: nothing to compare the Python renderer with")

    def key(d: dict[str, Any]) -> tuple[str, str]:
        return d["kind"], d["metadata"]["name"]

    assert sorted(render(kustomization, python=True), key=key) == sorted(render(kustomization), key=key)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_valid_against_the_api_schemas(rendered: dict[str, list[dict[str, Any]]], version: str) -> None:
    assert set(rendered) >= {"base", "examples/kernel2kernel", "uninstall"}
    errors = []
    for k, doc in documents(rendered):
        if (doc["apiVersion"], doc["kind"]) in NOT_IN_THE_API_SCHEMAS:
            continue  # a custom resource: tests/deploy/test_identities.py checks its shape
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{k}: {doc['kind']}/{doc['metadata']['name']}: {exc.message} at "
                          f"{'.'.join(map(str, exc.path))}")
    assert not errors, "\n".join(errors)


def test_validator_catches_a_bad_document() -> None:
    """The check above checks: a misspelt field and a wrong type fail."""
    doc = render("base")
    ds = find(doc, "DaemonSet", "nsm-node")
    ds["spec"]["template"]["spec"]["hostNetwrk"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, "1.32", strict=True)
    ds = find(render("base"), "DaemonSet", "nsm-node")
    ds["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = ["1"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, "1.32", strict=True)


def command_flags(command: str) -> set[str]:
    parser = argparse.ArgumentParser()
    importlib.import_module(COMMANDS[command][0]).add_arguments(parser)
    return {env_name(o) for a in parser._actions for o in a.option_strings if o.startswith("--")}


Docs = dict[str, list[dict[str, Any]]]


def nsm_containers(rendered: Docs) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    return [(k, d, c) for k, d in documents(rendered) for c in containers(d)
            if c["image"].split(":")[0].endswith("nsm")]


def test_every_setting_is_an_nsm_variable_of_the_command(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Containers of the nsm image run ``nsm <command>`` (the entrypoint) with no flags on the
    command line; every ``NSM_*`` variable they get is a flag of that command; variables that
    are not NSM_* only feed ``$(...)`` references."""
    seen = set()
    for k, doc, c in nsm_containers(rendered):
        where = f"{k}: {doc['kind']}/{doc['metadata']['name']}/{c['name']}"
        if "command" in c:  # not the entrypoint: only a placeholder is allowed
            assert c["command"] == ["sleep", "infinity"], where
            continue
        assert len(c["args"]) == 1 and c["args"][0] in COMMANDS, where
        command = c["args"][0]
        seen.add(command)
        flags = command_flags(command)
        env = [e["name"] for e in c.get("env", [])]
        for name in env:
            if name.startswith("NSM_"):
                assert name in flags, f"{where}: {name} is not a flag of nsm {command}"
            else:
                refs = [e for e in c["env"] if f"$({name})" in e.get("value", "")]
                assert refs, f"{where}: {name} is set but not used"
    assert seen >= {"registry", "manager", "forwarder", "cni-agent", "cni-install", "nse", "cni-uninstall"}


def test_required_flags_are_set(rendered: dict[str, list[dict[str, Any]]]) -> None:
    required = {"manager": {"NSM_NAME", "NSM_LISTEN", "NSM_REGISTRY"},
                "forwarder": {"NSM_NAME", "NSM_LISTEN", "NSM_MANAGER", "NSM_REGISTRY"},
                "cni-agent": {"NSM_MANAGER"},
                "nse": {"NSM_NAME", "NSM_SERVICE", "NSM_CIDR", "NSM_LISTEN", "NSM_REGISTRY"}}
    for k, doc, c in nsm_containers(rendered):
        names = {e["name"] for e in c.get("env", [])}
        command = (c.get("args") or [""])[0]
        missing = required.get(command, set()) - names
        assert not missing, f"{k}: {doc['metadata']['name']}/{c['name']}: {missing}"


def test_probes_reach_what_each_daemon_listens_on(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """A ``grpc:`` probe's port is a TCP port the daemon listens on (and the kubelet dials the pod
    IP: with host network the node's); an exec probe is ``nsm health``, which checks the first
    URL of the container's own NSM_LISTEN; every daemon has readiness and liveness."""
    from tests.deploy.render import env_of

    daemons = 0
    for k, doc, c in nsm_containers(rendered):
        if c.get("args", [""])[0] not in {"registry", "manager", "forwarder", "cni-agent", "nse"}:
            continue
        daemons += 1
        where = f"{k}: {doc['metadata']['name']}/{c['name']}"
        env = env_of(c, FIELD_VALUES)
        urls = [parse_url(u) for u in env["NSM_LISTEN"].split(",")]
        assert "readinessProbe" in c and "livenessProbe" in c, where
        for probe in (c[p] for p in ("startupProbe", "readinessProbe", "livenessProbe") if p in c):
            if "grpc" in probe:
                ports = {u.port for u in urls if u.scheme == "tcp"}
                assert probe["grpc"]["port"] in ports, f"{where}: probe port not in {ports}"
                host_network = pod_specs(doc)[0].get("hostNetwork", False)
                hosts = {u.host for u in urls if u.scheme == "tcp" and u.port == probe["grpc"]["port"]}
                ok = {"0.0.0.0", FIELD_VALUES["NODE_IP"] if host_network else FIELD_VALUES["POD_IP"]}
                assert hosts & ok, f"{where}: the kubelet dials the pod IP, the daemon listens on {hosts}"
            else:
                assert probe["exec"]["command"] == ["nsm", "health"], where
                assert urls, where
    assert daemons >= 5


def test_one_image_for_every_role(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for k, docs in rendered.items():
        images = {c["image"] for d in docs for c in containers(d) if "nsm" in c["image"]}
        assert len(images) == 1, (k, images)


def test_resources_everywhere(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for k, doc in documents(rendered):
        for c in containers(doc):
            r = c.get("resources", {})
            assert {"cpu", "memory"} <= set(r.get("requests", {})), (k, c["name"])
            assert {"cpu", "memory"} <= set(r.get("limits", {})), (k, c["name"])


def test_only_the_node_pod_shares_the_hosts_pids(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The forwarder finds pods' namespaces among the node's processes (hostPID, the node pod
    only); endpoints name theirs by identity, so no workload pod needs the host's PIDs."""
    from e2e.kind import kube

    shared = {(k, d["metadata"]["name"]) for k, d in documents(rendered)
              for pod in pod_specs(d) if pod.get("hostPID")}
    assert shared and {name for _, name in shared} == {"nsm-node"}, shared
    assert not any(pod.get("hostPID") for pod in pod_specs(kube.endpoint("nse", "svc", "172.16.1.0/24")))


def test_node_pod_shape(rendered: dict[str, list[dict[str, Any]]]) -> None:
    ds = find(rendered["base"], "DaemonSet", "nsm-node")
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] and pod["hostPID"]
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    volumes = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert {"/run/nsm", "/var/run/netns", "/opt/cni/bin", "/etc/cni/net.d"} <= set(volumes.values())
    by_name = {c["name"]: c for c in pod["containers"]}
    assert set(by_name) == {"manager", "forwarder", "cni-agent"}
    assert [c["name"] for c in pod["initContainers"]] == ["cni-install"]
    for name in by_name:  # the socket directory is shared
        assert any(m["mountPath"] == "/run/nsm" for m in by_name[name]["volumeMounts"]), name
    for name in ("forwarder", "cni-agent"):  # pods' namespaces appear after the container started
        netns = [m for m in by_name[name]["volumeMounts"] if m["mountPath"] == "/var/run/netns"]
        assert netns and netns[0]["mountPropagation"] == "HostToContainer", name
    assert not by_name["manager"]["securityContext"].get("privileged")
    # The conflist entry the init container writes names the socket the agent listens on, in the
    # host directory the runtime (which runs the plugin on the host) sees.
    install = {e["name"]: e.get("value") for e in pod["initContainers"][0]["env"]}
    agent = {e["name"]: e.get("value") for e in by_name["cni-agent"]["env"]}
    assert install["NSM_SOCKET"] == agent["NSM_SOCKET"] and agent["NSM_SOCKET"].startswith("/run/nsm/")
    assert volumes["nsm-run"] == "/run/nsm"


def test_each_manager_finds_only_its_own_forwarder(rendered: Docs) -> None:
    """A manager selects the forwarders whose nsmgrURL label (the forwarder's --manager) is one of
    its own URLs: on two nodes the forwarders' labels differ and each is one of its manager's."""
    from tests.deploy.render import env_of

    by_name = {c["name"]: c for c in containers(find(rendered["base"], "DaemonSet", "nsm-node"))}
    labels = []
    for node, ip in (("node1", "10.0.0.1"), ("node2", "10.0.0.2")):
        values = {"NODE_NAME": node, "NODE_IP": ip}
        manager, forwarder = env_of(by_name["manager"], values), env_of(by_name["forwarder"], values)
        urls = manager["NSM_LISTEN"].split(",") + manager["NSM_ADVERTISE"].split(",")
        assert forwarder["NSM_MANAGER"] in urls
        labels.append(forwarder["NSM_MANAGER"])
    assert labels[0] != labels[1]

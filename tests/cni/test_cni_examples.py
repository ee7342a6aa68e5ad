"""The example configs in ``cni/examples/`` are what an operator copies: each parses as the
runtime would hand it to nsm-cni, and the agent accepts its requests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from nsm.cni.attachments import parse_requests
from nsm.cni.spec import parse_config

pytestmark = pytest.mark.timeout(10)

EXAMPLES = Path(__file__).resolve().parents[2] / "cni" / "examples"


def _plugin_configs(conflist: dict) -> list[dict]:  # type: ignore[type-arg]
    """What a runtime passes each nsm-cni entry of a conflist on stdin (libcni adds the list's
    name and cniVersion)."""
    return [{**entry, "name": conflist["name"], "cniVersion": conflist["cniVersion"]}
            for entry in conflist["plugins"] if entry.get("type") == "nsm-cni"]


@pytest.mark.parametrize("name", ["chained.conflist", "kubernetes.conflist"])
def test_each_conflist_chains_nsm_cni_after_a_primary_plugin(name: str) -> None:
    conflist = json.loads((EXAMPLES / name).read_text())
    assert conflist["plugins"][0]["type"] != "nsm-cni"  # chained: after the primary plugin
    (config,) = _plugin_configs(conflist)
    parsed = parse_config(json.dumps(config), "ADD")
    if "services" in parsed:
        requests = parse_requests(parsed["services"], cni_ifname="eth0", delegate=False)
        assert [r.ifname for r in requests] == ["nsm-1", "nsm-2"]
        assert requests[0].service == "blue"


def test_the_multus_delegate_takes_the_interface_multus_names() -> None:
    nad = yaml.safe_load((EXAMPLES / "multus-nad.yaml").read_text())
    assert nad["kind"] == "NetworkAttachmentDefinition"
    config = parse_config(nad["spec"]["config"], "ADD")
    assert config["type"] == "nsm-cni" and config["name"] == nad["metadata"]["name"]
    (request,) = parse_requests(config["services"], cni_ifname="net1", delegate=True)
    assert (request.service, request.ifname) == ("blue", "net1")


def test_every_example_is_covered() -> None:
    assert sorted(p.name for p in EXAMPLES.iterdir()) == [
        "chained.conflist", "kubernetes.conflist", "multus-nad.yaml"]

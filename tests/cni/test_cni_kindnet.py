"""nsm-cni chained the way ``nsm cni-install`` chains it on a kind node: kindnet's own conflist
(cniVersion 0.3.1, Debian's real ``ptp`` + ``host-local`` then ``portmap``), nsm-cni appended by
:func:`nsm.cni.conflist.insert`, run plugin by plugin in node1's namespace as the runtime does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nsm.cni import conflist

pytestmark = [pytest.mark.kernel, pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(90)]

KINDNET = Path(__file__).resolve().parents[1] / "deploy" / "conflists" / "10-kindnet.conflist"
POD_SUBNET = "10.124.1.0/24"


def kindnet_with_nsm_cni(tmp_path: Path, socket: str) -> dict:
    """kindnet's file in a configuration directory, then nsm-cni inserted as cni-install does."""
    conf_dir = tmp_path / "net.d"
    conf_dir.mkdir()
    data = json.loads(KINDNET.read_text())
    ipam = data["plugins"][0]["ipam"]
    ipam["ranges"], ipam["dataDir"] = [[{"subnet": POD_SUBNET}]], str(tmp_path / "ipam")
    (conf_dir / KINDNET.name).write_text(json.dumps(data))
    where, written = conflist.insert(str(conf_dir), {"type": "nsm-cni", "socket": socket, "agentWait": 5})
    assert written
    return json.loads(Path(where).read_text())


async def test_kindnet_then_nsm_cni(cni, tmp_path: Path) -> None:
    chained = kindnet_with_nsm_cni(tmp_path, cni.socket)
    assert [p["type"] for p in chained["plugins"]] == ["ptp", "portmap", "nsm-cni"]
    chained["plugins"][-1]["services"] = [f"kernel://{cni.local}/nsm-1"]  # on a cluster: the annotation
    rt = cni.node1.runtime("0.3.1", None)
    rt.conflist = chained

    c, ns = await cni.container("kind")
    result = (await rt.add(c, ns)).ok()
    assert result["cniVersion"] == "0.3.1"
    assert [i["name"] for i in result["interfaces"] if i.get("sandbox")] == ["eth0", "nsm-1"]
    assert all(ip["version"] == "4" for ip in result["ips"])  # 0.3.1's shape, ours too
    assert cni.address_of(result, "eth0").startswith("10.124.1.")
    await cni.assert_ping(ns, cni.route_into(result, cni.local_cidr))

    (await rt.delete(c, ns)).ok()
    assert await cni.link_names(ns) == []
    assert await cni.attachments() == 0

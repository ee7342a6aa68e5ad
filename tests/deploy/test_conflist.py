"""Putting nsm-cni into a node's CNI configuration and taking it out (nsm.cni.conflist), on real
primary networks' files (kind's kindnet, flannel, calico, podman's single-plugin bridge) and the
project's own examples: insert, idempotent re-insert, a changed entry replaced in place,
removal back to the original, another network's file untouched, atomic writes."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

import pytest

from nsm.cni import conflist

pytestmark = pytest.mark.timeout(30)

HERE = Path(__file__).resolve().parent
REAL = sorted((HERE / "conflists").iterdir())
EXAMPLES = Path(__file__).resolve().parents[2] / "cni" / "examples"
ENTRY = {"type": "nsm-cni", "socket": "/run/nsm/cni/agent.sock", "agentWait": 60}


def snapshot(directory: Path) -> dict[str, tuple[bytes, int, int, int]]:
    """Every file's bytes, inode, mtime and mode."""
    out = {}
    for p in sorted(directory.iterdir()):
        st = p.stat()
        out[p.name] = (p.read_bytes(), st.st_ino, st.st_mtime_ns, stat.S_IMODE(st.st_mode))
    return out


def load(path: Path | str) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


@pytest.fixture
def conf_dir(tmp_path: Path) -> Path:
    d = tmp_path / "net.d"
    d.mkdir()
    return d


@pytest.mark.parametrize("source", REAL, ids=[p.name for p in REAL])
def test_insert_idempotent_remove(conf_dir: Path, source: Path) -> None:
    shutil.copy(source, conf_dir / source.name)
    os.chmod(conf_dir / source.name, 0o600)
    original = load(source)

    where, written = conflist.insert(str(conf_dir), ENTRY)
    assert written
    inserted = load(where)
    assert inserted["plugins"][-1] == ENTRY
    assert inserted["cniVersion"] == original["cniVersion"] and inserted["name"] == original["name"]
    single = {k: v for k, v in original.items() if k not in ("cniVersion", "name")}
    before = original.get("plugins") or [single]
    assert inserted["plugins"][:-1] == before  # the primary's plugins untouched, in order
    assert where.endswith(".conflist") and conflist.primary(str(conf_dir)) == where
    assert stat.S_IMODE(os.stat(where).st_mode) == 0o600
    assert not [n for n in os.listdir(conf_dir) if n.endswith(".tmp")]

    after_insert = snapshot(conf_dir)
    assert conflist.insert(str(conf_dir), ENTRY) == (where, False)  # nothing to do: not written
    assert snapshot(conf_dir) == after_insert

    assert conflist.remove(str(conf_dir)) == [str(conf_dir / source.name)]
    assert sorted(os.listdir(conf_dir)) == [source.name]
    assert load(conf_dir / source.name) == original
    if not source.name.endswith(".conflist"):  # a converted single-plugin file comes back as it was
        assert (conf_dir / source.name).read_bytes() == source.read_bytes()
    assert conflist.remove(str(conf_dir)) == []


def test_changed_entry_replaced_in_place(conf_dir: Path) -> None:
    shutil.copy(HERE / "conflists" / "10-calico.conflist", conf_dir)
    where, _ = conflist.insert(str(conf_dir), ENTRY)
    changed = {**ENTRY, "socket": "/run/other/agent.sock"}
    assert conflist.insert(str(conf_dir), changed) == (where, True)
    plugins = load(where)["plugins"]
    assert [p["type"] for p in plugins] == ["calico", "portmap", "bandwidth", "nsm-cni"]
    assert plugins[-1] == changed


def test_an_entry_in_the_middle_stays_there(conf_dir: Path) -> None:
    """An operator who put nsm-cni before a later plugin keeps that order on re-insert."""
    data = load(HERE / "conflists" / "10-calico.conflist")
    data["plugins"].insert(1, {"type": "nsm-cni", "socket": "/old.sock"})
    (conf_dir / "10-calico.conflist").write_text(json.dumps(data))
    where, written = conflist.insert(str(conf_dir), ENTRY)
    assert written
    assert [p["type"] for p in load(where)["plugins"]] == ["calico", "nsm-cni", "portmap", "bandwidth"]


def test_another_networks_file_is_left_intact(conf_dir: Path) -> None:
    """Only the primary (first by name) gains the entry; the others keep bytes, inode, mtime."""
    shutil.copy(HERE / "conflists" / "10-kindnet.conflist", conf_dir)
    shutil.copy(HERE / "conflists" / "10-calico.conflist", conf_dir / "20-calico.conflist")
    shutil.copy(HERE / "conflists" / "87-podman-bridge.conf", conf_dir)
    (conf_dir / "README").write_text("not a config\n")
    (conf_dir / "99-broken.conflist").write_text("{not json")
    others = {k: v for k, v in snapshot(conf_dir).items() if k != "10-kindnet.conflist"}

    where, written = conflist.insert(str(conf_dir), ENTRY)
    assert where == str(conf_dir / "10-kindnet.conflist") and written
    assert {k: v for k, v in snapshot(conf_dir).items() if k != "10-kindnet.conflist"} == others
    conflist.remove(str(conf_dir))
    assert {k: v for k, v in snapshot(conf_dir).items() if k != "10-kindnet.conflist"} == others
    assert load(conf_dir / "10-kindnet.conflist") == load(HERE / "conflists" / "10-kindnet.conflist")


def test_remove_takes_every_entry_out(conf_dir: Path) -> None:
    """The project's own examples already chain nsm-cni: uninstall takes it out of all of them."""
    for p in EXAMPLES.glob("*.conflist"):
        shutil.copy(p, conf_dir)
    written = conflist.remove(str(conf_dir))
    assert sorted(written) == sorted(str(conf_dir / p.name) for p in EXAMPLES.glob("*.conflist"))
    for p in conf_dir.iterdir():
        assert [q["type"] for q in load(p)["plugins"]] == ["bridge"]


def test_no_configuration_yet(conf_dir: Path, tmp_path: Path) -> None:
    assert conflist.insert(str(conf_dir), ENTRY) is None
    assert conflist.insert(str(tmp_path / "missing"), ENTRY) is None
    assert conflist.remove(str(tmp_path / "missing")) == []


def test_bad_input(conf_dir: Path) -> None:
    from nsm.errors import FailedPrecondition, InvalidArgument

    (conf_dir / "10-x.conflist").write_text("[1, 2]")
    with pytest.raises(InvalidArgument, match="not a CNI configuration"):
        conflist.insert(str(conf_dir), ENTRY)
    (conf_dir / "10-x.conflist").write_text('{"cniVersion": "1.0.0", "name": "x", "plugins": "bridge"}')
    with pytest.raises(InvalidArgument, match="plugins must be a list"):
        conflist.insert(str(conf_dir), ENTRY)
    with pytest.raises(InvalidArgument, match="type"):
        conflist.insert(str(conf_dir), {"type": "bridge"})
    (conf_dir / "10-x.conflist").unlink()
    (conf_dir / "10-nsm.conf").write_text('{"cniVersion": "1.0.0", "name": "x", "type": "nsm-cni"}')
    with pytest.raises(FailedPrecondition, match="nothing to chain after"):
        conflist.insert(str(conf_dir), ENTRY)


def test_atomic_write_failure_leaves_the_file(conf_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copy(HERE / "conflists" / "10-flannel.conflist", conf_dir)
    before = snapshot(conf_dir)

    def fail(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        conflist.insert(str(conf_dir), ENTRY)
    assert snapshot(conf_dir) == before  # the old file whole, no temporary file left

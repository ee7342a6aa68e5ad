"""Namespaces named by identity (``inode://<dev>/<ino>``): the URL's syntax, and
:class:`nsm.kernel.netns.NetnsFinder` finding a named namespace and one only a process holds,
remembering it, and noticing when it is gone."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from nsm.api.connection_pb2 import Mechanism
from nsm.errors import InvalidArgument, NotFound
from nsm.kernel.netns import NetnsFinder
from nsm.lab.harness import NetnsGroup
from nsm.mechanisms import (
    KERNEL,
    LOCAL,
    NETNS_INODE_URL,
    inode_url,
    netns_inode,
    netns_path,
    validate_mechanism,
)

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(30)]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")


def ident(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def test_inode_urls() -> None:
    assert netns_inode("inode://4/4026531833") == (4, 4026531833)
    assert inode_url((4, 4026531833)) == "inode://4/4026531833"
    assert netns_inode("file:///var/run/netns/x") is None and netns_inode("/proc/1/ns/net") is None
    for bad in ("inode://", "inode://4", "inode://4/", "inode://x/y", "inode://4/5/6", "inode://-4/5",
                "inode://4/0", "inode://4/ 5", "inode://\u0664/5", "inode://4/" + "9" * 21):
        with pytest.raises(InvalidArgument):
            netns_inode(bad)
    with pytest.raises(InvalidArgument, match="by inode"):
        netns_path("inode://4/4026531833")  # no path of its own
    good = Mechanism(cls=LOCAL, type=KERNEL, parameters={NETNS_INODE_URL: "inode://4/4026531833"})
    validate_mechanism(good)
    with pytest.raises(InvalidArgument):
        validate_mechanism(Mechanism(cls=LOCAL, type=KERNEL, parameters={NETNS_INODE_URL: "inode://4/x"}))


@needs_root
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")
def test_a_named_namespace_and_one_only_a_process_holds(netns_factory: NetnsGroup) -> None:
    finder = NetnsFinder()
    named = netns_factory("fi")
    assert finder.resolve(inode_url(ident(named))) == named
    assert finder.resolve(f"file://{named}") == named
    # A namespace with no name: a process that made it and waits.
    holder = subprocess.Popen(
        ["unshare", "--net", sys.executable, "-c", "import os, sys; "
         "st = os.stat('/proc/self/ns/net'); print(st.st_dev, st.st_ino, flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        dev, ino = (int(x) for x in holder.stdout.readline().split())
        path = finder.path((dev, ino))
        assert path == f"/proc/{holder.pid}/ns/net" and ident(path) == (dev, ino)
        assert finder.resolve(inode_url((dev, ino))) == path  # remembered, and still right
    finally:
        holder.kill()
        holder.wait()
    with pytest.raises(NotFound, match=f"inode://{dev}/{ino}"):
        finder.path((dev, ino))  # gone with its last process: not the remembered path
    with pytest.raises(NotFound):
        finder.resolve("file:///var/run/netns/nsm-no-such-namespace")


def test_where_it_looks(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Only names under its directory and processes' namespaces count; nothing else is opened."""
    run, proc = tmp_path / "netns", tmp_path / "proc"
    run.mkdir()
    (proc / "42" / "ns").mkdir(parents=True)
    (proc / "self").mkdir()
    (proc / "42" / "ns" / "net").write_text("")
    (run / "pod").write_text("")
    finder = NetnsFinder(proc=str(proc), run_dir=str(run))
    assert finder.path(ident(str(run / "pod"))) == str(run / "pod")
    assert finder.path(ident(str(proc / "42" / "ns" / "net"))) == str(proc / "42" / "ns" / "net")
    with pytest.raises(NotFound):
        finder.path(ident(str(tmp_path)))


def test_a_new_pod_costs_a_few_stats_not_one_per_entry(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Once the node's entries have been seen (:meth:`NetnsFinder.prime`, at start), finding a
    new pod's namespace stats only what is new (plus the confirmation), not every name and
    process again; an entry that now holds another namespace than when it was seen is still
    found; without priming, a search stops at the first match."""
    import nsm.kernel.netns as netns_module

    run, proc = tmp_path / "netns", tmp_path / "proc"
    run.mkdir()
    proc.mkdir()
    for i in range(50):
        (run / f"pod{i}").write_text("")
        (proc / str(100 + i) / "ns").mkdir(parents=True)
        (proc / str(100 + i) / "ns" / "net").write_text("")
    finder = NetnsFinder(proc=str(proc), run_dir=str(run))
    finder.prime()  # as the forwarder does at start
    assert finder.path(ident(str(run / "pod7"))) == str(run / "pod7")
    stats: list[str] = []
    real = netns_module._stat_ident

    def counting(path: str) -> tuple[int, int] | None:
        stats.append(path)
        return real(path)

    monkeypatch.setattr(netns_module, "_stat_ident", counting)
    (run / "new-pod").write_text("")
    assert finder.path(ident(str(run / "new-pod"))) == str(run / "new-pod")
    assert len(stats) <= 3, stats
    # A name made again for another namespace (another inode): found by looking again.
    (run / "pod9").unlink()
    (run / "pod9").write_text("again")
    stats.clear()
    assert finder.path(ident(str(run / "pod9"))) == str(run / "pod9")
    # A process's namespace seen before, asked for again: one stat to confirm, and remembered.
    stats.clear()
    path = str(proc / "120" / "ns" / "net")
    assert finder.path(ident(path)) == path and len(stats) <= 2, stats
    fresh = NetnsFinder(proc=str(proc), run_dir=str(run))
    stats.clear()
    assert fresh.path(ident(str(run / "new-pod"))) == str(run / "new-pod")
    assert len(stats) < 100, "a search stops at its match"

"""What a lab holds, counted: the leak check of long runs (1000 request/close cycles, clients
killed without Close, the chaos soak). A :class:`Census` is a flat map ``what → count``, taken
before and after; :func:`compare` lists what grew.

Each count is measured by something that does not share code with what it checks:

- **Kernel**, per namespace (nodes, pods, the fabric, and the root namespace's links), with
  ``ip -j`` (read-only): links, addresses, routes of every table (both families), policy rules
  (both families), permanent neighbour entries (:func:`kernel_counts`); and the named namespaces
  that carry the lab's prefix.
- **File descriptors** of every daemon, from ``/proc/<pid>/fd`` (by kind: sockets, namespace
  fds, pipes, anonymous inodes, files; :func:`fd_counts`), and of this process; beside them the
  resident memory (``rss_kib``, :func:`rss_kib`: shown, not a leak measure by itself).
- **What each daemon holds** (connections, timers, monitor watchers, next-hop streams, VNIs,
  routing tables, IPAM pairs, asyncio tasks…): the ``status`` line it logs on SIGUSR1
  (:mod:`nsm.daemon`), read back from its log (:func:`parse_status`).
- **Registrations**: a Find of every service and endpoint at the registry.
- **asyncio tasks** of this process.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from nsm.daemon import STATUS_MESSAGE

#: What :func:`kernel_counts` counts in a namespace.
KERNEL_KINDS = ("links", "addresses", "routes", "rules", "neighbours")
_STATUS_TEXT = re.compile(r"^\S+ info\s+nsm\.daemon '" + re.escape(STATUS_MESSAGE) + r"'(?P<kv>( \S+=\S+)*)$")


def _ip_json(netns: str | None, *args: str) -> list[dict[str, object]]:
    cmd = ["ip", "-j", *(["-n", netns] if netns else []), *args]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=10).stdout
    return json.loads(out or "[]")


def kernel_counts(netns: str | None) -> dict[str, int]:
    """Links, addresses, routes (every table, both families), policy rules (both families)
    and permanent neighbour entries of a named namespace (None: this process's, links only:
    the root namespace is only ever looked at). Runs ``ip``: call it in a thread."""
    links = _ip_json(netns, "link", "show")
    if netns is None:
        return {"links": len(links)}
    addrs = _ip_json(netns, "address", "show")
    routes = [r for fam in ("-4", "-6") for r in _ip_json(netns, fam, "route", "show", "table", "all")]
    rules = [r for fam in ("-4", "-6") for r in _ip_json(netns, fam, "rule", "show")]
    neigh = _ip_json(netns, "neigh", "show", "nud", "permanent")
    return {"links": len(links),
            "addresses": sum(len(a.get("addr_info", [])) for a in addrs),  # type: ignore[arg-type]
            "routes": len(routes), "rules": len(rules), "neighbours": len(neigh)}


def fd_kind(target: str) -> str:
    """What an fd is, from its ``readlink``: socket, netns (a namespace), pipe, anon (eventfd,
    epoll, timerfd…) or file."""
    if target.startswith("socket:"):
        return "socket"
    if re.match(r"^(net|mnt|uts|ipc|pid|user|cgroup|time):\[\d+\]$", target):
        return "netns" if target.startswith("net:") else "ns"
    if target.startswith("pipe:"):
        return "pipe"
    if target.startswith("anon_inode:"):
        return "anon"
    return "file"


def fd_counts(pid: int | str = "self") -> dict[str, int]:
    """The open file descriptors of a process: ``fds`` (all) and one count per kind
    (:func:`fd_kind`). Empty when the process is gone."""
    counts: dict[str, int] = {}
    base = f"/proc/{pid}/fd"
    try:
        entries = os.listdir(base)
    except OSError:
        return {}
    for entry in entries:
        try:
            kind = fd_kind(os.readlink(f"{base}/{entry}"))
        except OSError:  # closed meanwhile (the listing's own fd, for "self")
            continue
        counts["fds"] = counts.get("fds", 0) + 1
        counts[f"fds.{kind}"] = counts.get(f"fds.{kind}", 0) + 1
    return counts


def rss_kib(pid: int | str = "self") -> int | None:
    """The resident memory of a process in KiB (``VmRSS``), None when it is gone. Not a leak
    measure by itself (allocators keep what they once used): shown beside the counts."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def parse_status(line: str) -> dict[str, int] | None:
    """The counts of a daemon's ``status`` log line (text or JSON lines), or None for any other
    line."""
    line = line.strip()
    if line.startswith("{"):
        try:
            doc = json.loads(line)
        except ValueError:
            return None
        if doc.get("msg") != STATUS_MESSAGE or doc.get("logger") != "nsm.daemon":
            return None
        return {k: int(v) for k, v in doc.items() if isinstance(v, int)}
    m = _STATUS_TEXT.match(line)
    if m is None:
        return None
    out = {}
    for pair in m.group("kv").split():
        key, _, value = pair.partition("=")
        if value.lstrip("-").isdigit():
            out[key] = int(value)
    return out


@dataclass
class Census:
    """Counts by what is counted (``node1: routes``, ``forwarder.node1: vnis``, ...)."""

    counts: dict[str, int] = field(default_factory=dict)

    def add(self, prefix: str, counts: Mapping[str, int]) -> None:
        for key, value in counts.items():
            self.counts[f"{prefix}: {key}"] = value

    def __getitem__(self, key: str) -> int:
        return self.counts.get(key, 0)

    def total(self, suffix: str) -> int:
        """The sum of every count whose name ends with ``suffix`` (e.g. ``": connections"``)."""
        return sum(v for k, v in self.counts.items() if k.endswith(suffix))

    def lines(self) -> list[str]:
        return [f"{k} = {v}" for k, v in sorted(self.counts.items())]


def compare(before: Census, after: Census, *, slack: Mapping[str, int] | None = None,
            ignore: Iterable[str] = ()) -> list[str]:
    """What ``after`` has more of than ``before`` (a count may grow by ``slack[name]``, where a
    name matches a count that ends with it, e.g. ``": fds"``, the longest matching name
    winning); counts that went down are fine (a cache that expired). Names containing one of
    ``ignore`` are skipped. Empty: no leak."""
    slack = dict(slack or {})
    ignored = tuple(ignore)
    grew = []
    for key in sorted(set(before.counts) | set(after.counts)):
        if any(i in key for i in ignored):
            continue
        allowed = max(((len(s), v) for s, v in slack.items() if key.endswith(s)),
                      default=(0, 0))[1]
        if after[key] > before[key] + allowed:
            grew.append(f"{key}: {before[key]} -> {after[key]}"
                        + (f" (slack {allowed})" if allowed else ""))
    return grew

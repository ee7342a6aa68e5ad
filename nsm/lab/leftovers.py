"""What a lab leaves to be found again: its JSON state file (for ``nsm lab status``/``down``),
and the removal of everything a lab with a given prefix left behind — after its supervisor
crashed, or a test process died — found from the prefix and the state file."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nsm.kernel import netns as nsns
from nsm.lab.processes import end_pids, end_processes_in
from nsm.lab.topology import FABRIC, validate_prefix

DEFAULT_STATE_DIR = "/run/nsm-lab"


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write a JSON file atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


@dataclass
class CleanupReport:
    """What :func:`cleanup` removed."""

    processes: list[int] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.processes or self.namespaces or self.files)


def state_path(prefix: str, state_dir: str | Path = DEFAULT_STATE_DIR) -> Path:
    return Path(state_dir) / f"{validate_prefix(prefix)}.json"


def read_state(prefix: str, state_dir: str | Path = DEFAULT_STATE_DIR) -> dict[str, Any] | None:
    """The state file of a lab, or None if there is none (or it is unreadable)."""
    try:
        data = json.loads(state_path(prefix, state_dir).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def lab_namespaces(prefix: str) -> list[str]:
    """Named namespaces that belong to the lab ``prefix`` (``<prefix>-*``)."""
    start = validate_prefix(prefix) + "-"
    return [n for n in nsns.list_netns() if n.startswith(start)]


def cleanup(prefix: str, *, state_dir: str | Path | None = DEFAULT_STATE_DIR,
            timeout: float = 10.0) -> CleanupReport:
    """Remove what a lab with this prefix left behind (e.g. after its supervisor crashed):
    its supervisor and daemons recorded in the state file (by pid, checked to be the same
    process), any process inside its namespaces, the namespaces, its work directory and state
    file. Idempotent; blocking (call it through ``asyncio.to_thread`` from async code)."""
    report = CleanupReport()
    state = read_state(prefix, state_dir) if state_dir is not None else None
    if state:
        sup = state.get("supervisor") or {}
        if sup.get("pid") and sup.get("pid") != os.getpid():
            # The supervisor tears down by itself on SIGTERM: give it the time to.
            report.processes += end_pids([(sup["pid"], sup.get("start_time"))], timeout)
        recorded = [(d["pid"], d.get("start_time")) for d in (state.get("daemons") or {}).values()
                    if d.get("pid") and d.get("start_time")]
        report.processes += end_pids(recorded, min(timeout, 5.0))
    names = lab_namespaces(prefix)
    report.processes += end_processes_in([nsns.netns_path(n) for n in names], min(timeout, 5.0))
    for name in sorted(names, key=lambda n: n == f"{prefix}-{FABRIC}"):
        if nsns.delete_netns(name):
            report.namespaces.append(name)
    if state and state_dir is not None:
        workdir = state.get("workdir")
        # Only a work dir this lab made under the state dir, never an arbitrary path.
        if workdir and Path(workdir).resolve() == (Path(state_dir) / prefix).resolve() \
                and Path(workdir).is_dir():
            shutil.rmtree(workdir, ignore_errors=True)
            report.files.append(workdir)
    if state_dir is not None:
        for path in (state_path(prefix, state_dir), Path(state_dir) / f"{prefix}.log"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                report.files.append(str(path))
    report.processes = sorted(set(report.processes))
    return report

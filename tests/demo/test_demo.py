"""``nsm demo`` as a user runs it: it succeeds and leaves nothing behind, also when interrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from nsm.lab.harness import find_leftovers

pytestmark = [pytest.mark.kernel,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, links)")]


def leftovers(pid: int) -> tuple[list[str], list[int]]:
    """The namespaces and processes of the demo run by ``pid`` (all named ``nsmdemo<pid>-...``)."""
    found = find_leftovers([f"nsmdemo{pid}-"])
    return found.namespaces, [p for p, _ in found.processes]


def wait_clean(pid: int, timeout: float = 10.0) -> tuple[list[str], list[int]]:
    deadline = time.monotonic() + timeout
    left = leftovers(pid)
    while (left[0] or left[1]) and time.monotonic() < deadline:
        time.sleep(0.1)
        left = leftovers(pid)
    return left


@pytest.mark.timeout(120)
@pytest.mark.parametrize("args", [[], ["--payload", "ETHERNET"], ["--local"]])
def test_demo_shows_a_working_link_and_tears_down(args: list[str]) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "nsm.cli", "demo", "--pings", "3", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=100)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out + err
    assert "3 sent, 3 received, 0% loss" in out
    assert "client interface removed" in out
    assert "path of 4 segments" in out if "--local" in args else "path of 6 segments" in out
    if "--local" not in args:
        assert "tunnel on node1" in out and "mtu 1450" in out
    assert "packet with don't-fragment: passes" in out
    assert wait_clean(proc.pid) == ([], [])


@pytest.mark.timeout(120)
def test_demo_interrupted_leaves_nothing() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "nsm.cli", "demo", "--pings", "50"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        seen = []
        for line in proc.stdout:  # interrupt while the link is up and pinging
            seen.append(line)
            if "ping " in line:
                break
        assert any("ping " in line for line in seen), "".join(seen)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        rest = proc.stdout.read()
        assert "torn down" in rest, "".join(seen) + rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert wait_clean(proc.pid) == ([], [])

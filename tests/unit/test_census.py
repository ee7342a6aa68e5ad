"""The lab's census (:mod:`nsm.lab.census`) and the daemons' status line (:mod:`nsm.daemon`):
the status a daemon logs on SIGUSR1 is read back as counts; what grew between two censuses,
with slack, is what a leak test reports."""

from __future__ import annotations

import asyncio
import logging
import os
import socket

import pytest

from nsm import log as nsm_log
from nsm.daemon import STATUS_SIGNAL, status_on_signal
from nsm.lab.census import Census, compare, fd_counts, fd_kind, parse_status

pytestmark = pytest.mark.timeout(10)


async def test_sigusr1_logs_the_status_once_per_signal(caplog: pytest.LogCaptureFixture) -> None:
    calls = []

    def status() -> dict[str, int]:
        calls.append(1)
        return {"connections": 3, "vnis": 2}

    caplog.set_level(logging.INFO, logger="nsm.daemon")
    with status_on_signal(status):
        os.kill(os.getpid(), STATUS_SIGNAL)
        for _ in range(100):
            await asyncio.sleep(0.01)
            if calls:
                break
    records = [r for r in caplog.records if r.getMessage() == "status"]
    assert len(records) == 1 and len(calls) == 1
    fields = records[0].fields  # type: ignore[attr-defined]
    assert fields["connections"] == 3 and fields["vnis"] == 2 and fields["tasks"] >= 1
    # The formatted line (text and JSON) reads back as the same counts.
    for json_lines in (False, True):
        line = nsm_log._Formatter(json_lines).format(records[0])
        assert parse_status(line) == fields, line


async def test_a_failing_status_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    def status() -> dict[str, int]:
        raise RuntimeError("boom")

    caplog.set_level(logging.INFO, logger="nsm.daemon")
    with status_on_signal(status):
        os.kill(os.getpid(), STATUS_SIGNAL)
        for _ in range(100):
            await asyncio.sleep(0.01)
            if caplog.records:
                break
    assert [r.getMessage() for r in caplog.records] == ["status failed"]


def test_parse_status_ignores_other_lines() -> None:
    assert parse_status("2024-01-01T00:00:00.000Z info  nsm.daemon 'status' a=1 b=-2 c=x") == {
        "a": 1, "b": -2}
    assert parse_status("2024-01-01T00:00:00.000Z info  nsm.manager 'status' a=1") is None
    assert parse_status("2024-01-01T00:00:00.000Z info  nsm.daemon 'statuses' a=1") is None
    assert parse_status('{"msg": "status", "logger": "nsm.other", "a": 1}') is None
    assert parse_status("{not json") is None
    assert parse_status("") is None


def test_compare_reports_growth_beyond_the_slack() -> None:
    before = Census({"forwarder.node1: vnis": 0, "forwarder.node1: fds": 20,
                     "test: tasks": 1, "manager.node1: tasks": 10, "node1: links": 3})
    after = Census({"forwarder.node1: vnis": 1, "forwarder.node1: fds": 22,
                    "test: tasks": 2, "manager.node1: tasks": 12, "node1: links": 2,
                    "new: routes": 1})
    slack = {": fds": 2, ": tasks": 2, "test: tasks": 0}
    assert compare(before, after, slack=slack) == [
        "forwarder.node1: vnis: 0 -> 1", "new: routes: 0 -> 1", "test: tasks: 1 -> 2"]
    assert compare(before, after, slack=slack, ignore=("vnis", "new", "test")) == []
    assert compare(after, before) == ["node1: links: 2 -> 3"]  # what went down is no leak


def test_fd_counts_by_kind() -> None:
    assert [fd_kind(t) for t in ("socket:[12]", "net:[4026531840]", "mnt:[4026531841]",
                                 "pipe:[3]", "anon_inode:[eventpoll]", "/tmp/x")] == [
        "socket", "netns", "ns", "pipe", "anon", "file"]
    before = fd_counts()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM):
        during = fd_counts()
    assert during["fds"] == before["fds"] + 1
    assert during["fds.socket"] == before.get("fds.socket", 0) + 1
    assert fd_counts(2 ** 22 + 1) == {}  # no such process

"""``python -m nsm.lab.netns_exec NETNS -- COMMAND...``: run a command inside a network namespace
(setns, then exec) — how the emulated cluster starts each node's daemons in its namespace,
without the ``ip`` tool.

Every lab daemon starts through it, so it imports nothing beyond the standard library (no gRPC,
no protobuf: the daemon it execs imports those itself). ``NETNS`` is a name under
``/var/run/netns`` or an absolute path.
"""

from __future__ import annotations

import ctypes
import os
import sys

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/var/run/netns"


def enter(netns: str) -> None:
    """Move this (single-threaded) process into the network namespace ``netns``."""
    path = netns if netns.startswith("/") else os.path.join(NETNS_RUN_DIR, netns)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # this process's libc, without a library search
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m nsm.lab.netns_exec NETNS -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    try:
        enter(argv[0])
    except OSError as exc:
        print(f"nsm.lab.netns_exec: {argv[0]}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    os.execvp(argv[2], argv[2:])
    return 127  # not reached


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

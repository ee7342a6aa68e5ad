"""``python -m nsm.lab.netns_exec NETNS -- COMMAND...``: run a command inside a network namespace
(setns, then exec) — how the emulated cluster starts each node's daemons in its namespace,
without the ``ip`` tool."""

from __future__ import annotations

import os
import sys

from nsm.kernel.netns import netns_path, open_netns, setns


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m nsm.lab.netns_exec NETNS -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    fd = open_netns(netns_path(argv[0]))
    setns(fd)
    os.close(fd)
    os.execvp(argv[2], argv[2:])
    return 127  # not reached


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

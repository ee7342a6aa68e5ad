"""``nsm cni-install`` / ``nsm cni-uninstall``: the node's side of the CNI plugin, run by the node
DaemonSet's init container (install) and by the uninstall DaemonSet (``deploy/uninstall``).

    nsm cni-install --bin-dir /opt/cni/bin --conf-dir /etc/cni/net.d --runtime /opt/nsm-cni
    nsm cni-uninstall --bin-dir /opt/cni/bin --conf-dir /etc/cni/net.d

Install writes the ``nsm-cni`` executable into ``--bin-dir`` and appends ``nsm-cni`` to the
primary network's conflist in ``--conf-dir`` (:mod:`nsm.cni.conflist`), waiting up to ``--wait``
for the primary plugin to write one. The plugin runs on the *host* (the runtime executes it),
where this image's interpreter does not exist: ``--runtime`` names a self-contained bundle (an
interpreter with its libraries, the standard library and the plugin's modules, built into the
image by ``deploy/image/cni_bundle.py``) which is copied to ``<bin-dir>/nsm-cni.d`` and which
the executable runs; without it the executable runs this interpreter (a host that has the
package installed, as the emulated cluster does). When the bundle (or the package's build)
has the plugin's compiled fast path, that is ``nsm-cni`` and the launcher ``nsm-cni-python``
(:func:`nsm.cni.plugin.install_executables`). Uninstall removes the conflist entries, the
executables and the bundle. Both are idempotent.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sys
import time

from nsm.cni import conflist, plugin, spec
from nsm.config import duration, fail, flag
from nsm.errors import InvalidArgument

PLUGIN = "nsm-cni"
BUNDLE = "nsm-cni.d"
#: The bundle's launcher (``deploy/image/cni_bundle.py`` writes it).
LAUNCHER = "run"
#: The compiled fast path in the bundle (the image builds it from ``cni/shim/nsm-cni.c``).
SHIM = "shim"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Both commands' flags (each also settable as ``NSM_<FLAG>``)."""
    flag(parser, "--bin-dir", default="/opt/cni/bin", help="the runtime's CNI plugin directory")
    flag(parser, "--conf-dir", default="/etc/cni/net.d", help="the runtime's CNI configuration directory")
    flag(parser, "--runtime", default=None,
         help="cni-install: a self-contained plugin bundle to copy to <bin-dir>/nsm-cni.d "
              "(default: the plugin runs this interpreter)")
    flag(parser, "--socket", default=spec.DEFAULT_SOCKET,
         help="cni-install: the agent's socket, written into the conflist entry")
    flag(parser, "--agent-wait", type=duration, default=60.0,
         help="cni-install: the entry's agentWait (how long ADD waits for the agent)")
    flag(parser, "--wait", type=duration, default=300.0,
         help="cni-install: how long to wait for the primary network's conflist to appear")


def entry(args: argparse.Namespace) -> dict[str, object]:
    return {"type": PLUGIN, "socket": args.socket, "agentWait": round(args.agent_wait)}


def install_bundle(src: str, bin_dir: str) -> str:
    """Copy the bundle to ``<bin_dir>/nsm-cni.d`` (a new copy renamed into place) and write the
    ``nsm-cni`` executable that runs it (atomically). Returns the executable's path."""
    if not os.path.isfile(os.path.join(src, LAUNCHER)):
        raise InvalidArgument(f"{src} is not an nsm-cni bundle (no {LAUNCHER})")
    os.makedirs(bin_dir, exist_ok=True)
    dest = os.path.join(bin_dir, BUNDLE)
    new = os.path.join(bin_dir, f".{BUNDLE}.{os.getpid()}.new")
    old = os.path.join(bin_dir, f".{BUNDLE}.{os.getpid()}.old")
    shutil.rmtree(new, ignore_errors=True)
    shutil.copytree(src, new, symlinks=True)
    with contextlib.suppress(FileNotFoundError):
        os.rename(dest, old)
    os.rename(new, dest)
    shutil.rmtree(old, ignore_errors=True)
    text = (f"#!/bin/sh\n# nsm-cni, the NSM CNI plugin (written by nsm cni-install)\n"
            f"exec '{os.path.join(dest, LAUNCHER)}' \"$@\"\n")
    shim = os.path.join(dest, SHIM)
    return plugin.install_executables(bin_dir, text, name=PLUGIN,
                                      shim=shim if os.path.isfile(shim) else None)


def uninstall_files(bin_dir: str) -> list[str]:
    """Remove the executable and the bundle; what was there."""
    removed = []
    for path in (os.path.join(bin_dir, PLUGIN), os.path.join(bin_dir, PLUGIN + plugin.PYTHON_SUFFIX)):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            removed.append(path)
    bundle = os.path.join(bin_dir, BUNDLE)
    if os.path.isdir(bundle):
        shutil.rmtree(bundle)
        removed.append(bundle)
    return removed


async def install(args: argparse.Namespace) -> int:
    if args.runtime:
        path = install_bundle(args.runtime, args.bin_dir)
    else:
        path = plugin.write_wrapper(args.bin_dir)
    print(f"nsm cni-install: wrote {path}", file=sys.stderr, flush=True)
    deadline = time.monotonic() + args.wait
    while (done := conflist.insert(args.conf_dir, entry(args))) is None:
        if time.monotonic() > deadline:
            return fail("nsm cni-install", f"no CNI configuration in {args.conf_dir} after "
                        f"{args.wait:.0f}s (the primary network writes one)")
        await asyncio.sleep(1.0)
    where, written = done
    print(f"nsm cni-install: {where}: {'nsm-cni added' if written else 'already there'}: "
          f"{json.dumps(entry(args))}", file=sys.stderr, flush=True)
    return 0


async def uninstall(args: argparse.Namespace) -> int:
    for path in conflist.remove(args.conf_dir):
        print(f"nsm cni-uninstall: {path}: nsm-cni removed", file=sys.stderr, flush=True)
    for path in uninstall_files(args.bin_dir):
        print(f"nsm cni-uninstall: removed {path}", file=sys.stderr, flush=True)
    return 0


async def run(args: argparse.Namespace) -> int:
    try:
        return await (uninstall(args) if args.command == "cni-uninstall" else install(args))
    except OSError as exc:
        return fail(f"nsm {args.command}", f"{exc.filename or ''}: {exc.strerror}")

"""Build the self-contained ``nsm-cni`` bundle the image carries (``python deploy/image/cni_bundle.py
DEST``; ``nsm cni-install --runtime DEST`` copies it to the node).

The plugin runs on the host, where the image's interpreter does not exist, so the bundle brings
its own: this interpreter's binary, the shared libraries it and its extension modules load
(glibc's loader included, found with ``ldd``), the standard library (without tests, tkinter,
site-packages and the like, precompiled) and the plugin's modules (standard library only).
``DEST/run`` starts the plugin through the bundled loader (``-S -P``, ``PYTHONHOME`` = the
bundle), so it depends on nothing on the host but ``/bin/sh``.
"""

from __future__ import annotations

import compileall
import os
import re
import shutil
import subprocess
import sys
import sysconfig

SKIP = {"site-packages", "dist-packages", "test", "tests", "idlelib", "tkinter", "turtledemo",
        "ensurepip", "lib2to3", "pydoc_data", "__pycache__", "venv", "unittest", "sqlite3"}
#: Extension modules the plugin never loads and that pull in large libraries (X11, OpenSSL, ...).
SKIP_EXTENSIONS = ("_tkinter", "_sqlite3", "_ssl", "_hashlib", "readline", "_curses", "_dbm", "_gdbm",
                   "nis", "_ctypes", "_lzma", "_bz2", "_uuid", "_decimal")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from nsm.cni.plugin import PLUGIN_MODULES, RUN_PLUGIN  # noqa: E402  (standard library only)


def shared_libraries(binary: str) -> tuple[list[str], str | None]:
    """The libraries ``binary`` loads and its loader (from ``ldd``)."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=False).stdout
    libs, loader = [], None
    for line in out.splitlines():
        m = re.match(r"\s*(\S+) => (/\S+)", line)
        if m:
            libs.append(m.group(2))
        elif (m := re.match(r"\s*(/\S*ld-linux\S*|/\S*ld64\S*)\s", line)):
            loader = m.group(1)
    return libs, loader


def build(dest: str) -> None:
    stdlib = sysconfig.get_paths()["stdlib"]
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(os.path.join(dest, "bin"))
    os.makedirs(os.path.join(dest, "lib"))
    exe = os.path.realpath(sys.executable)
    shutil.copy2(exe, os.path.join(dest, "bin", "python3"))
    shutil.copytree(stdlib, os.path.join(dest, "lib", version),
                    ignore=lambda d, names: [n for n in names if n in SKIP or n.startswith("config-")])
    dynload = os.path.join(dest, "lib", version, "lib-dynload")
    extensions = os.listdir(dynload) if os.path.isdir(dynload) else []
    for name in extensions:
        if name.startswith(SKIP_EXTENSIONS):
            os.unlink(os.path.join(dynload, name))
    binaries = [exe] + [os.path.join(dynload, n) for n in extensions if not n.startswith(SKIP_EXTENSIONS)]
    loader = None
    for binary in binaries:
        libs, found = shared_libraries(binary)
        loader = loader or found
        for lib in libs:
            target = os.path.join(dest, "lib", os.path.basename(lib))
            if not os.path.exists(target):
                shutil.copy2(os.path.realpath(lib), target)
    if loader is None:
        raise SystemExit(f"no ELF loader found for {exe}")
    shutil.copy2(os.path.realpath(loader), os.path.join(dest, "lib", "ld.so"))
    for module in PLUGIN_MODULES:
        target = os.path.join(dest, "site", module)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, module), target)
    compileall.compile_dir(dest, quiet=1, workers=1)
    launcher = os.path.join(dest, "run")
    with open(launcher, "w") as f:
        f.write('#!/bin/sh\n# nsm-cni with its own interpreter (deploy/image/cni_bundle.py)\n'
                'R=$(cd "$(dirname "$0")" && pwd -P)\n'
                'PYTHONHOME="$R" PYTHONPATH="$R/site" exec "$R/lib/ld.so" --library-path "$R/lib" '
                f'"$R/bin/python3" -S -P -c \'{RUN_PLUGIN}\' "$@"\n')
    os.chmod(launcher, 0o755)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: cni_bundle.py DEST")
    build(sys.argv[1])

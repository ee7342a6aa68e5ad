"""The node's CNI configuration: putting ``nsm-cni`` into the primary network's conflist, and
taking it out again (``nsm cni-install`` / ``nsm cni-uninstall``, :mod:`nsm.cni.install`).

The runtime (containerd, CRI-O) uses the first file of its configuration directory, by name,
ending in ``.conflist``, ``.conf`` or ``.json``: the primary network. ``nsm-cni`` is appended to
that file's ``plugins``. A ``.conf`` or ``.json`` holds a single plugin (libcni reads it so), so
it is turned into ``<stem>.conflist`` with the plugin and ``nsm-cni``, and the original file is
kept aside as ``.<name>.nsm-cni-orig`` (a name the runtime does not read) for removal to put back.

- Insert is idempotent: an ``nsm-cni`` entry already there is replaced in place, and a file that
  would not change is not written at all (no event for a watcher, no new mtime).
- Removal takes out every ``nsm-cni`` entry of every file of the directory (or puts a converted
  single-plugin file back); a file without one (another network's conflist) is not touched.
- Writes are atomic: a temporary file in the same directory (its name starts with a dot and
  ends in ``.tmp``, so the runtime never reads it), fsync, rename, fsync of the directory; the
  file keeps its mode.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from typing import Any

from nsm.errors import FailedPrecondition, InvalidArgument

PLUGIN_TYPE = "nsm-cni"
#: The suffix of a single-plugin file set aside when it was turned into a conflist.
ORIGINAL = ".nsm-cni-orig"
#: What the runtime reads (libcni's ConfFiles).
EXTENSIONS = (".conflist", ".conf", ".json")


def config_files(conf_dir: str) -> list[str]:
    """The directory's CNI configuration files, in the order the runtime considers them."""
    try:
        names = sorted(os.listdir(conf_dir))
    except FileNotFoundError:
        return []
    return [os.path.join(conf_dir, n) for n in names
            if n.endswith(EXTENSIONS) and not n.startswith(".")
            and os.path.isfile(os.path.join(conf_dir, n))]


def primary(conf_dir: str) -> str | None:
    """The file of the primary network (the first one by name), None when there is none."""
    files = config_files(conf_dir)
    return files[0] if files else None


def read(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read())
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"{path}: not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidArgument(f"{path}: not a CNI configuration (a JSON object)")
    return data


def with_plugin(config: Mapping[str, Any], entry: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` (a conflist, or a single-plugin ``.conf``) with ``entry`` as its last plugin, or
    in place of the ``nsm-cni`` entry it has."""
    if entry.get("type") != PLUGIN_TYPE:
        raise InvalidArgument(f"the entry to insert must have type {PLUGIN_TYPE!r}")
    out = dict(config)
    if "plugins" not in out:
        if "type" not in out:
            raise InvalidArgument("neither a conflist (plugins) nor a plugin configuration (type)")
        if out["type"] == PLUGIN_TYPE:
            raise FailedPrecondition("the primary network is nsm-cni itself: nothing to chain after")
        keep = ("cniVersion", "name", "disableCheck")
        plugin = {k: v for k, v in out.items() if k not in keep}
        out = {k: out[k] for k in keep if k in out}
        out["plugins"] = [plugin]
    plugins = out["plugins"]
    if not isinstance(plugins, list) or not all(isinstance(p, dict) for p in plugins):
        raise InvalidArgument("plugins must be a list of objects")
    ours = [i for i, p in enumerate(plugins) if p.get("type") == PLUGIN_TYPE]
    plugins = [p for p in plugins if p.get("type") != PLUGIN_TYPE]
    plugins.insert(ours[0] if ours else len(plugins), dict(entry))
    out["plugins"] = plugins
    return out


def without_plugin(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` without its ``nsm-cni`` entries."""
    out = dict(config)
    plugins = out.get("plugins")
    if isinstance(plugins, list):
        out["plugins"] = [p for p in plugins if not (isinstance(p, dict) and p.get("type") == PLUGIN_TYPE)]
    return out


def has_plugin(config: Mapping[str, Any]) -> bool:
    plugins = config.get("plugins")
    return isinstance(plugins, list) and any(isinstance(p, dict) and p.get("type") == PLUGIN_TYPE
                                             for p in plugins)


def write_atomic(path: str, text: str, *, like: str | None = None) -> None:
    """Replace ``path`` with ``text`` atomically, keeping the mode of ``path`` (or of ``like``;
    0644 for a new file; see the module)."""
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.tmp")
    try:
        mode = os.stat(like or path).st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o644
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dfd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _dump(config: Mapping[str, Any]) -> str:
    return json.dumps(config, indent=2) + "\n"


def set_aside(path: str) -> str:
    """Where a single-plugin file converted to a conflist is kept."""
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}{ORIGINAL}")


def insert(conf_dir: str, entry: Mapping[str, Any]) -> tuple[str, bool] | None:
    """Put ``entry`` into the primary network's file: (its path, whether it was written), or
    None when the directory has no CNI configuration yet."""
    path = primary(conf_dir)
    if path is None:
        return None
    config = read(path)
    new = with_plugin(config, entry)
    if path.endswith(".conflist"):
        if new == config:
            return path, False
        write_atomic(path, _dump(new))
        return path, True
    target = os.path.splitext(path)[0] + ".conflist"
    if os.path.exists(target):
        raise FailedPrecondition(f"cannot turn {path} into {target}: it exists")
    write_atomic(target, _dump(new), like=path)
    os.replace(path, set_aside(path))
    return target, True


def remove(conf_dir: str) -> list[str]:
    """Take ``nsm-cni`` out of every file of ``conf_dir`` that has it (a converted single-plugin
    file is put back instead); the files written or put back."""
    written = []
    for path in config_files(conf_dir):
        try:
            config = read(path)
        except InvalidArgument:
            continue  # not ours to judge (another network's broken file)
        if not has_plugin(config):
            continue
        stem = os.path.splitext(path)[0]
        originals = [set_aside(stem + ext) for ext in (".conf", ".json")
                     if os.path.exists(set_aside(stem + ext))]
        if path.endswith(".conflist") and originals:
            original = originals[0]
            name = os.path.basename(original)[1:-len(ORIGINAL)]
            restored = os.path.join(conf_dir, name)
            os.replace(original, restored)
            os.unlink(path)
            written.append(restored)
            continue
        write_atomic(path, _dump(without_plugin(config)))
        written.append(path)
    return written

"""``nsm-cni``: the thin CNI plugin. It hands each command to the node agent (``nsm cni-agent``)
over a unix socket and prints the agent's answer; the agent does the work.

Standard library only (no gRPC, protobuf or pyroute2): a runtime starts it for every pod, so it
must start fast. What it does itself:

- VERSION: answered here (0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0).
- Bad input: a missing ``CNI_*`` variable is code 4, stdin that is not JSON 6, a config without
  ``name``/``cniVersion`` 7 (:mod:`nsm.cni.spec`), before the agent is asked.
- The agent not listening: ADD, CHECK and GC wait up to ``agentWait`` seconds (config, default
  60) for it, then fail with "try again later" (11); STATUS then answers 50 (not available).
  DEL never waits: with no agent it succeeds (best effort; the agent's GC and its namespace
  sweep remove what is left), so a pod's deletion never wedges on it.
- The agent not answering within ``timeout`` seconds (config, default 120): 11, except DEL,
  which then succeeds (the agent finishes it).

Config keys of ours in the plugin's entry of the conflist: ``socket`` (the agent's socket,
default ``/run/nsm/cni/agent.sock``), ``agentWait``, ``timeout``, and the agent's
(``services``...; see :mod:`nsm.cni.agent`). Errors are the spec's JSON on stdout with exit 1.
"""

from __future__ import annotations

import _socket  # the C module: ``socket`` costs a few ms of imports (enum...) at every start
import os
import sys
import time

from nsm.cni import wirejson
from nsm.cni.spec import (
    DEFAULT_AGENT_WAIT,
    DEFAULT_SOCKET,
    DEFAULT_TIMEOUT,
    INVALID_CONFIG,
    IO_ERROR,
    LATEST,
    MAX_MESSAGE,
    NOT_AVAILABLE,
    SUPPORTED,
    TRY_AGAIN,
    CniError,
    check_env,
    config_number,
    encode,
    parse_config,
    version_result,
)

TYPE_CHECKING = False  # importing typing costs milliseconds at every start of the plugin
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any, BinaryIO, TextIO

_UNREACHABLE = (FileNotFoundError, ConnectionRefusedError, ConnectionResetError, BrokenPipeError,
                ConnectionAbortedError)


def _warn(text: str) -> None:
    print(f"nsm-cni: {text}", file=sys.stderr, flush=True)


def _connect(path: str, *, wait: float) -> _socket.socket | None:
    """A connection to the agent, trying for ``wait`` seconds (once when 0); None if none."""
    deadline = time.monotonic() + wait
    delay = 0.02
    while True:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except _UNREACHABLE:
            sock.close()
        except OSError:
            sock.close()
            raise
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        time.sleep(min(delay, left))
        delay = min(delay * 2, 0.5)


def _read_line(sock: _socket.socket, deadline: float) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        sock.settimeout(left)
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionResetError("the agent closed the connection")
        chunks.append(chunk)
        size += len(chunk)
        if chunk.endswith(b"\n") or b"\n" in chunk:
            return b"".join(chunks).split(b"\n", 1)[0]
        if size > MAX_MESSAGE:
            raise CniError(IO_ERROR, "the node agent's answer is too long")


def ask_agent(path: str, message: Mapping[str, Any], *, command: str, wait: float,
              timeout: float) -> Any:
    """Send ``message`` to the agent at ``path``; its result (None for DEL when the agent is
    down or too slow). CniError as the module says."""
    delete = command == "DEL"
    sock = _connect(path, wait=0.0 if delete else wait)
    if sock is None:
        if delete:
            _warn(f"the node agent does not listen at {path}; DEL succeeds (best effort)")
            return None
        if command == "STATUS":
            raise CniError(NOT_AVAILABLE, "the NSM node agent is not running",
                           f"nothing listens at {path}")
        raise CniError(TRY_AGAIN, f"the NSM node agent did not listen at {path} within {wait:g}s",
                       "start nsm cni-agent on this node")
    try:
        try:
            sock.sendall(encode(message))
            line = _read_line(sock, time.monotonic() + timeout)
        finally:
            sock.close()
    except (TimeoutError, *_UNREACHABLE) as exc:
        what = ("did not answer in time" if isinstance(exc, TimeoutError)
                else "closed the connection before answering")
        if delete:
            _warn(f"the node agent {what}; DEL succeeds (best effort)")
            return None
        if command == "STATUS":
            raise CniError(NOT_AVAILABLE, f"the NSM node agent {what}") from None
        raise CniError(TRY_AGAIN, f"the NSM node agent {what}", f"at {path}") from None
    try:
        answer = wirejson.loads(line)
    except ValueError:
        raise CniError(IO_ERROR, "the node agent sent what is not JSON", line[:200].decode(
            errors="replace")) from None
    if not isinstance(answer, dict):
        raise CniError(IO_ERROR, "the node agent sent a malformed answer")
    if "error" in answer:
        raise CniError.from_json(answer["error"])
    return answer.get("result")


def run(env: Mapping[str, str], raw: bytes) -> tuple[int, Any]:
    """One command: (exit status, what to print on stdout or None)."""
    version = LATEST
    try:
        # The version errors are reported in: the config's, when it has a supported one.
        with_version = wirejson.loads(raw) if raw.strip() else {}
        if isinstance(with_version, dict) and with_version.get("cniVersion") in SUPPORTED:
            version = with_version["cniVersion"]
    except (ValueError, UnicodeDecodeError):
        pass
    try:
        command = check_env(env)
        if command == "VERSION":
            return 0, version_result(version)
        config = parse_config(raw, command)
        path = config.get("socket", DEFAULT_SOCKET)
        if not isinstance(path, str) or not path.startswith("/"):
            raise CniError(INVALID_CONFIG, f"socket must be an absolute path, not {path!r}")
        wait = config_number(config, "agentWait", DEFAULT_AGENT_WAIT)
        timeout = config_number(config, "timeout", DEFAULT_TIMEOUT)
        message = {"env": {k: v for k, v in env.items() if k.startswith("CNI_")}, "config": config}
        result = ask_agent(path, message, command=command, wait=wait, timeout=timeout)
        return 0, result
    except CniError as exc:
        return 1, exc.to_json(version)
    except OSError as exc:
        return 1, CniError(IO_ERROR, f"cannot talk to the NSM node agent: {exc}").to_json(version)


#: Every module a start of the plugin imports (paths from the package's root): what a wrapper
#: compiles and an image's bundle carries (``deploy/image/cni_bundle.py``).
PLUGIN_MODULES = ("nsm/__init__.py", "nsm/cni/__init__.py", "nsm/cni/spec.py",
                  "nsm/cni/wirejson.py", "nsm/cni/plugin.py")
#: What the interpreter runs: the plugin imported (a script would be compiled at every start).
RUN_PLUGIN = "from nsm.cni.plugin import main; raise SystemExit(main())"


def write_wrapper(directory: str, name: str = "nsm-cni") -> str:
    """Write ``directory/name``: an executable that runs this plugin (imported, its modules
    compiled here once) with this interpreter, without ``site`` (``-S``: on a host with many
    ``.pth`` files it costs tens of ms a start) and without its own directory on ``sys.path``
    (``-P``), this package's root on ``PYTHONPATH``. Written atomically (the runtime may be
    running it). Returns the path."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    # Imported, not run as a script (a script is compiled at every start): compiled once here.
    import py_compile
    for module in PLUGIN_MODULES:
        try:
            py_compile.compile(os.path.join(root, module), doraise=True)
        except (OSError, py_compile.PyCompileError):
            pass  # a read-only install: compiled at each start instead
    text = (f"#!/bin/sh\n# nsm-cni, the NSM CNI plugin (written by nsm cni-agent)\n"
            f"PYTHONPATH='{root}' exec '{sys.executable}' -S -P -c '{RUN_PLUGIN}' \"$@\"\n")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)
    return path


def main(env: Mapping[str, str] | None = None, stdin: BinaryIO | None = None,
         stdout: TextIO | None = None) -> int:
    raw = (stdin or sys.stdin.buffer).read()
    status, out = run(os.environ if env is None else env, raw)
    if out is not None:
        stream = stdout or sys.stdout
        stream.write(wirejson.dumps(out) + "\n")
        stream.flush()
    return status


if __name__ == "__main__":
    sys.exit(main())

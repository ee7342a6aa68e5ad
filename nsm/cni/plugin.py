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

#: Set by the compiled fast path when it ran this plugin after its exchange with the agent
#: failed half way (see :func:`run`).
SHIM_FAILED = "NSM_CNI_SHIM_FAILED"

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


def agent_failed(command: str, path: str, exc: BaseException) -> None:
    """The answer when the exchange with the agent failed half way (``exc``: TimeoutError,
    or the connection closed): DEL succeeds (None: the agent finishes it); otherwise
    CniError, 50 for STATUS and 11 (try again) for the rest."""
    what = ("did not answer in time" if isinstance(exc, TimeoutError)
            else "closed the connection before answering")
    if command == "DEL":
        _warn(f"the node agent {what}; DEL succeeds (best effort)")
        return None
    if command == "STATUS":
        raise CniError(NOT_AVAILABLE, f"the NSM node agent {what}") from None
    raise CniError(TRY_AGAIN, f"the NSM node agent {what}", f"at {path}") from None


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
        return agent_failed(command, path, exc)
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


def version_of(raw: bytes) -> str:
    """The version errors are reported in: the config's, when it has a supported one."""
    try:
        with_version = wirejson.loads(raw) if raw.strip() else {}
        if isinstance(with_version, dict) and with_version.get("cniVersion") in SUPPORTED:
            return str(with_version["cniVersion"])
    except (ValueError, UnicodeDecodeError):
        pass
    return LATEST


def prepare(env: Mapping[str, str], raw: bytes) -> tuple[str, dict[str, Any], str, float, float]:
    """What a command needs before the agent is asked: (command, config, the agent's socket,
    agentWait, timeout); CniError for bad input (the config is not parsed for VERSION)."""
    command = check_env(env)
    if command == "VERSION":
        return command, {}, DEFAULT_SOCKET, DEFAULT_AGENT_WAIT, DEFAULT_TIMEOUT
    config = parse_config(raw, command)
    path = config.get("socket", DEFAULT_SOCKET)
    if not isinstance(path, str) or not path.startswith("/"):
        raise CniError(INVALID_CONFIG, f"socket must be an absolute path, not {path!r}")
    wait = config_number(config, "agentWait", DEFAULT_AGENT_WAIT)
    timeout = config_number(config, "timeout", DEFAULT_TIMEOUT)
    return command, config, path, wait, timeout


def cni_env(env: Mapping[str, str]) -> dict[str, str]:
    """The part of the environment the agent gets: the ``CNI_*`` variables."""
    return {k: v for k, v in env.items() if k.startswith("CNI_")}


def run(env: Mapping[str, str], raw: bytes) -> tuple[int, Any]:
    """One command: (exit status, what to print on stdout or None).

    ``NSM_CNI_SHIM_FAILED`` (``timeout`` or ``closed``): the compiled fast path
    (``cni/shim/nsm-cni.c``) asked the agent already and the exchange failed that way; the
    answer is the one this plugin gives for that failure, without asking again."""
    version = version_of(raw)
    try:
        command, config, path, wait, timeout = prepare(env, raw)
        if command == "VERSION":
            return 0, version_result(version)
        message = {"env": cni_env(env), "config": config}
        failed = env.get(SHIM_FAILED)
        if failed is not None:
            return 0, agent_failed(command, path, TimeoutError() if failed == "timeout"
                                   else ConnectionResetError())
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


#: The Python plugin's name beside the compiled fast path (which runs it for what it does not do).
PYTHON_SUFFIX = "-python"
#: The compiled fast path (``cni/shim/nsm-cni.c``), as ``./dev setup`` builds it (from the
#: package's root); ``NSM_CNI_SHIM`` names another.
SHIM_BUILD = ("build", "nsm-cni")


def shim_binary() -> str | None:
    """The compiled fast path of the plugin, when it has been built (None: the Python plugin
    alone is installed)."""
    path = os.environ.get("NSM_CNI_SHIM")
    if not path:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        path = os.path.join(root, *SHIM_BUILD)
    return path if os.path.isfile(path) and os.access(path, os.X_OK) else None


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)


def install_executables(directory: str, script: str, *, name: str = "nsm-cni",
                        shim: str | None = None) -> str:
    """Write the plugin's executables into ``directory`` (atomically: the runtime may be
    running them): with ``shim`` (the compiled fast path) that as ``name`` and ``script`` (a
    shell script that runs the Python plugin) as ``name-python``, which the fast path runs for
    what it does not do; without, ``script`` as ``name``. Returns ``name``'s path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    python = path + PYTHON_SUFFIX
    if shim is None:
        _write_atomic(path, script.encode())
        if os.path.exists(python):
            os.unlink(python)
        return path
    _write_atomic(python, script.encode())
    with open(shim, "rb") as f:
        _write_atomic(path, f.read())
    return path


def write_wrapper(directory: str, name: str = "nsm-cni", *, compiled: bool = True) -> str:
    """Write ``directory/name``: the compiled fast path when it is built (:func:`shim_binary`;
    not unless ``compiled``), and an executable that runs this plugin (imported, its modules compiled here
    once) with this interpreter, without ``site`` (``-S``: on a host with many ``.pth`` files it
    costs tens of ms a start) and without its own directory on ``sys.path`` (``-P``), this
    package's root on ``PYTHONPATH`` (:func:`install_executables`). Returns the path."""
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
    return install_executables(directory, text, name=name,
                               shim=shim_binary() if compiled else None)


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

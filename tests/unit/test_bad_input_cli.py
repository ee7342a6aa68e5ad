"""Bad flags found by fuzzing, through the real CLI (``python -m nsm.cli`` as a subprocess): an
empty or malformed name for any role is refused before a daemon starts (one line, exit 2, no
socket bound), and a listen that fails (a unix path longer than a socket address, or a second
URL that cannot be bound) leaves no directory behind."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def work(nsm_run_prefix: str) -> Iterator[Path]:
    """A short directory (socket paths must fit in 107 bytes) named with the run prefix."""
    path = Path(tempfile.mkdtemp(prefix=f"{nsm_run_prefix}-cli-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def nsm(*args: str, env: Mapping[str, str] | None = None,
              timeout: float = 15.0) -> tuple[int | None, str]:
    """Run ``nsm ARGS``: (exit status, stderr); None when it was still running after
    ``timeout`` (a daemon that started: killed)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("NSM_")}
    environ["PYTHONPATH"] = str(ROOT)
    # A daemon that gets as far as its identity makes the built-in CA: one of its own here,
    # not the machine's /run/nsm/ca.
    ca_dir = tempfile.mkdtemp(prefix="nsm-cli-ca-")
    environ["NSM_CA_DIR"] = f"{ca_dir}/ca"
    environ.update(env or {})
    try:
        return await _run(args, environ, timeout)
    finally:
        shutil.rmtree(ca_dir, ignore_errors=True)


async def _run(args: tuple[str, ...], environ: dict[str, str], timeout: float) -> tuple[int | None, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nsm.cli", *args, cwd=ROOT, env=environ,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, start_new_session=True)
    try:
        _, err = await asyncio.wait_for(proc.communicate(), timeout)
        return proc.returncode, err.decode(errors="replace")
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        _, err = await proc.communicate()
        return None, err.decode(errors="replace")


def role_args(role: str, work: Path, **override: str) -> list[str]:
    """A role's flags, good but for ``override`` (a registry that is not running is fine:
    nothing may get that far)."""
    reg = f"unix://{work}/reg.sock"
    flags = {
        "manager": {"--name": "node1", "--listen": f"unix://{work}/mgr.sock", "--registry": reg},
        "forwarder": {"--name": "fwd1", "--node": "node1", "--listen": f"unix://{work}/fwd.sock",
                      "--manager": f"unix://{work}/mgr.sock", "--registry": reg},
        "nse": {"--name": "nse1", "--service": "svc", "--cidr": "10.0.0.0/24",
                "--listen": f"unix://{work}/nse.sock", "--registry": reg},
        "nsc": {"--name": "nsc1", "--service": "svc", "--manager": f"unix://{work}/mgr.sock",
                "--timeout": "1s"},
    }[role]
    flags.update(override)
    return [role, *(x for k, v in flags.items() for x in (k, v))]


#: (role, flag, value, message fragment)
BAD_NAMES = [
    ("manager", "--name", "", "nsm manager: manager name (--name) is empty"),
    ("manager", "--name", "node 1", "manager name (--name) 'node 1' has spaces"),
    ("manager", "--name", "n" * 254, "is 254 characters; at most 253"),
    ("forwarder", "--name", "", "nsm forwarder: forwarder name (--name) is empty"),
    ("forwarder", "--node", "", "nsm forwarder: node name (--node) is empty"),
    ("forwarder", "--node", "node\t1", "node name (--node) 'node\\t1' has spaces"),
    ("nse", "--name", "", "nsm nse: endpoint name is empty"),
    ("nsc", "--name", "", "nsm nsc: client name (--name) is empty"),
]


@pytest.mark.parametrize(("role", "flag", "value", "message"), BAD_NAMES,
                         ids=[f"{r}{f}={v[:8]!r}" for r, f, v, _ in BAD_NAMES])
async def test_a_bad_name_is_refused_before_anything_starts(work: Path, role: str, flag: str,
                                                           value: str, message: str) -> None:
    code, err = await nsm(*role_args(role, work, **{flag: value}))
    assert code == 2, (code, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err
    assert sorted(os.listdir(work)) == [], "a daemon bound its socket"


async def test_an_empty_name_from_the_environment_is_refused_too(work: Path) -> None:
    args = [a for a in role_args("manager", work) if a not in ("--name", "node1")]
    code, err = await nsm(*args, env={"NSM_NAME": ""})
    assert code == 2 and "manager name (--name) is empty" in err, (code, err)
    assert os.listdir(work) == []


async def test_a_unix_listen_path_too_long_for_a_socket_is_refused_without_a_directory(
        work: Path) -> None:
    deep = work / "made"
    path = f"{deep}/{'s' * (108 - len(str(deep)))}.sock"
    code, err = await nsm("registry", "--listen", f"unix://{path}")
    assert code == 1, (code, err)
    assert f"unix socket path is {len(path)} bytes; at most 107" in err, err
    assert "Traceback" not in err
    assert os.listdir(work) == [], "the failed listen left a directory"


async def test_a_failed_listen_removes_the_directory_it_made(work: Path) -> None:
    """The unix URL binds in a directory made for it; the second URL cannot be bound (not an
    address of ours): the daemon exits 1 and the directory is gone again."""
    code, err = await nsm("registry", "--listen", f"unix://{work}/made/deeper/reg.sock",
                          "--listen", "tcp://192.0.2.1:1")
    assert code == 1, (code, err)
    assert "cannot listen on tcp://192.0.2.1:1" in err, err
    assert os.listdir(work) == [], "the failed listen left a directory"

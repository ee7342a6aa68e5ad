"""``nsm lab up|down|status``: an emulated cluster kept running in the background.

``up`` starts a detached supervisor (``nsm lab up --foreground``) that builds the lab, writes a
JSON state file (default ``/run/nsm-lab/<prefix>.json``) and waits for SIGTERM; ``down`` stops it
and cleans up whatever is left (idempotent); ``status`` shows the lab and whether its daemons
serve.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nsm import log as nsm_log
from nsm.config import flag
from nsm.daemon import serve_until_signal
from nsm.errors import FailedPrecondition, NsmError
from nsm.lab.builder import Lab, shielded
from nsm.lab.leftovers import DEFAULT_STATE_DIR, cleanup, lab_namespaces, read_state, state_path
from nsm.lab.processes import daemon_env, is_alive, tail, wait_serving
from nsm.lab.topology import DEFAULT_PREFIX, Topology, validate_prefix
from nsm.security.sources import CaSource
from nsm.security.tls import Security

LOG_LEVELS = ["debug", "info", "warning", "error"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``nsm lab up|down|status`` (every flag also reads ``NSM_<FLAG>``)."""
    sub = parser.add_subparsers(dest="lab_command", required=True, metavar="ACTION")

    def common(p: argparse.ArgumentParser) -> None:
        flag(p, "--prefix", default=DEFAULT_PREFIX,
             help="lab name: namespaces are <prefix>-<node|pod>; [A-Za-z0-9_] only")
        flag(p, "--state-dir", default=DEFAULT_STATE_DIR,
             help="where the state file <prefix>.json and the work directory live")

    up = sub.add_parser("up", help="build a lab and leave it running in the background",
                        description="Build an emulated cluster and leave it running.")
    common(up)
    flag(up, "--nodes", type=int, default=2, help="number of nodes")
    flag(up, "--pods-per-node", type=int, default=1, help="empty pod namespaces per node")
    flag(up, "--service", default="",
         help="if set, run an endpoint <node>-nse offering this service on every node")
    flag(up, "--log-level", default="info", choices=LOG_LEVELS, help="daemons' log level")
    flag(up, "--timeout", type=float, default=120.0, help="seconds to wait for the lab")
    flag(up, "--foreground", switch=True, default=False,
         help="build, then stay in the foreground until SIGTERM/Ctrl-C, then tear down")
    down = sub.add_parser("down", help="tear a lab down (idempotent)",
                          description="Tear down a lab started with `nsm lab up`, and any leftover "
                                      "of one with this prefix.")
    common(down)
    status = sub.add_parser("status", help="show a lab and whether its daemons serve",
                            description="Show a running lab.")
    common(status)
    flag(status, "--json", switch=True, default=False, help="print the state file's JSON")


async def run(args: argparse.Namespace) -> int:
    nsm_log.setup("warning")
    validate_prefix(args.prefix)
    if args.lab_command == "up":
        if os.geteuid() != 0:
            raise FailedPrecondition("needs root (it creates network namespaces and links)")
        return await (_up_foreground(args) if args.foreground else _up(args))
    if args.lab_command == "down":
        return await _down(args)
    return await _status(args)


def _topology(args: argparse.Namespace) -> Topology:
    return Topology.simple(args.nodes, pods_per_node=args.pods_per_node,
                           service=args.service or None)


def _spawn_supervisor(nsm_args: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start ``nsm <nsm_args>`` in a session of its own, output to ``log_path``. A plain Popen
    (asyncio's would kill the process when its transport is collected): it outlives us. Its
    environment is a daemon's (:func:`~nsm.lab.processes.daemon_env`, no ``NSM_*`` variables):
    every setting is in ``nsm_args``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "nsm.cli", *nsm_args], env=daemon_env(),
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True)


async def _up(args: argparse.Namespace) -> int:
    """Start the supervisor detached, wait until it reports the lab ready."""
    _topology(args)  # bad input fails here, not in the background
    state_dir = Path(args.state_dir)
    current = read_state(args.prefix, state_dir)
    if current and is_alive(current["supervisor"]["pid"], current["supervisor"]["start_time"]):
        print(f"nsm lab: lab {args.prefix!r} is already up (supervisor pid "
              f"{current['supervisor']['pid']}); `nsm lab down --prefix {args.prefix}` first",
              file=sys.stderr)
        return 1
    log_path = state_dir / f"{args.prefix}.log"
    sup = _spawn_supervisor(
        ["lab", "up", "--foreground", "--prefix", args.prefix, "--state-dir", str(state_dir),
         "--nodes", str(args.nodes), "--pods-per-node", str(args.pods_per_node),
         "--service", args.service, "--log-level", args.log_level, "--timeout", str(args.timeout)],
        log_path)
    t0 = time.monotonic()
    try:
        state = await _wait_ready(args, sup, log_path, t0)
    except BaseException:  # Ctrl-C while waiting: the supervisor tears down what it built
        _stop_supervisor(sup)
        raise
    if state is None:
        return 1
    _print_summary(state, state_path(args.prefix, state_dir), time.monotonic() - t0)
    return 0


def _stop_supervisor(sup: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    if sup.poll() is None:
        sup.terminate()
        try:
            sup.wait(timeout)
        except subprocess.TimeoutExpired:
            sup.kill()
            sup.wait()


async def _wait_ready(args: argparse.Namespace, sup: subprocess.Popen[bytes], log_path: Path,
                      t0: float) -> dict[str, Any] | None:
    """The state once the supervisor reports the lab ready; None (reported, cleaned up) if it
    failed or took too long."""
    state_dir = Path(args.state_dir)
    while True:
        state = read_state(args.prefix, state_dir)
        if state and state.get("ready") and state["supervisor"]["pid"] == sup.pid:
            return state
        if sup.poll() is not None:
            print(f"nsm lab: building the lab failed (exit {sup.returncode}); its output:\n"
                  f"{tail(log_path, 40)}", file=sys.stderr)
            return None  # it tore down what it had built
        if time.monotonic() - t0 > args.timeout:
            print(f"nsm lab: the lab is not ready after {args.timeout:.0f}s; tearing down",
                  file=sys.stderr)
            await asyncio.to_thread(_stop_supervisor, sup)
            return None
        await asyncio.sleep(0.1)


def _print_summary(state: Mapping[str, Any], path: Path, seconds: float) -> None:
    prefix = state["prefix"]
    print(f"lab {prefix!r} up in {seconds:.1f}s (supervisor pid {state['supervisor']['pid']})")
    reg = state["registry"]
    print(f"  registry  on {reg['node']}: {reg['tcp_url']}  (from this host: {reg['url']})")
    for name, n in state["nodes"].items():
        print(f"  {name:8}  {n['ip']:15} netns {n['netns']}")
        print(f"            manager {n['manager_tcp_url']}  {n['manager_url']}")
    for name, p in state["pods"].items():
        print(f"  pod {name} on {p['node']}: netns {p['netns']}")
    first = next(iter(state["nodes"].values()))
    sec = state.get("security")
    env = (f"NSM_CA_DIR={sec['ca_dir']} NSM_TRUST_DOMAIN={sec['trust_domain']} " if sec
           else "NSM_INSECURE=1 ")
    print(f"security: {'mTLS, SVIDs of the built-in CA in ' + sec['ca_dir'] if sec else 'NONE (--insecure)'}")
    print(f"state: {path}\n"
          f"enter a node:  nsenter --net={first['netns']} bash\n"
          f"request:       {env}nsm nsc --manager {first['manager_url']} --service <S> "
          f"--netns <pod netns>"
          f"{' --manager-id ' + first['manager_id'] if first.get('manager_id') else ''}\n"
          f"tear down:     nsm lab down --prefix {prefix}")


async def _up_foreground(args: argparse.Namespace) -> int:
    """Be the lab's supervisor: build, write the state file, wait for SIGTERM/SIGINT, tear
    down (a signal while building stops the build and tears down what was built)."""
    nsm_log.setup("info")
    state_dir = Path(args.state_dir)
    lab = Lab(_topology(args), prefix=args.prefix, workdir=state_dir / args.prefix,
              state_file=state_path(args.prefix, state_dir), log_level=args.log_level,
              start_timeout=args.timeout)
    built = False

    async def build() -> None:
        nonlocal built
        await lab.start()  # tears down what it built when it fails or is cancelled
        built = True
        _print_summary(lab.describe(), state_path(args.prefix, state_dir), lab.build_seconds)
        sys.stdout.flush()

    try:
        await serve_until_signal(build, lambda: shielded(lab.stop()))
    except Exception as exc:
        if built:
            raise
        text = exc.message if isinstance(exc, NsmError) else f"{type(exc).__name__}: {exc}"
        print(f"nsm lab: building the lab failed (torn down): {text}", file=sys.stderr, flush=True)
        return 1
    if not built:
        print("nsm lab: interrupted while building; torn down", file=sys.stderr, flush=True)
        return 130
    print(f"lab {args.prefix!r} torn down in {lab.teardown_seconds:.1f}s", flush=True)
    return 0


async def _down(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    report = await asyncio.to_thread(cleanup, args.prefix, state_dir=args.state_dir)
    if report.empty:
        print(f"lab {args.prefix!r}: nothing to tear down")
    else:
        print(f"lab {args.prefix!r} torn down in {time.monotonic() - t0:.1f}s: "
              f"{len(report.processes)} processes ended, "
              f"{len(report.namespaces)} namespaces deleted, {len(report.files)} files removed")
    return 0


async def _status(args: argparse.Namespace) -> int:
    state = read_state(args.prefix, args.state_dir)
    leftovers = lab_namespaces(args.prefix)
    if state is None:
        if leftovers:
            print(f"lab {args.prefix!r}: no state file, but namespaces are left: "
                  f"{', '.join(leftovers)} (`nsm lab down --prefix {args.prefix}`)")
            return 1
        print(f"lab {args.prefix!r} is not up")
        return 3
    if args.json:
        print(json.dumps(state, indent=2))
    sup = state.get("supervisor") or {}
    sup_alive = is_alive(sup.get("pid"), sup.get("start_time"))
    daemons = state.get("daemons") or {}

    sec = state.get("security")
    security = (Security(CaSource(sec["ca_dir"], sec["lab_id"], trust_domain=sec["trust_domain"],
                                  dns_names=(sec["trust_domain"],)), trust_domain=sec["trust_domain"])
                if sec else Security.insecure())

    async def serving(url: str) -> bool:
        try:
            await wait_serving(url, timeout=1.0, security=security)
        except NsmError:
            return False
        return True

    try:
        await security.start()
    except NsmError as exc:
        print(f"lab {args.prefix!r}: cannot get an identity from its CA: {exc.message}")
        return 1
    try:
        health = await asyncio.gather(*(serving(d["url"]) for d in daemons.values()))
    finally:
        await security.close()
    ok = sup_alive and bool(state.get("ready")) and all(health)
    if not args.json:
        print(f"lab {args.prefix!r}: {'up' if ok else 'DEGRADED' if sup_alive else 'DEAD'} "
              f"(supervisor pid {sup.get('pid')} {'running' if sup_alive else 'gone'}, "
              f"{'ready' if state.get('ready') else 'building'})")
        for (key, d), good in zip(daemons.items(), health, strict=True):
            alive = is_alive(d.get("pid"), d.get("start_time"))
            what = "serving" if good else ("running, not serving" if alive else "not running")
            print(f"  {key:24} pid {d.get('pid')!s:8} {what:22} {d['url']}")
    return 0 if ok else 1

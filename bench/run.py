"""Run the benchmarks: one JSON document on stdout, human tables and progress on stderr.

    python -m bench.run [--quick] [--json out.json] [--repeat K] [--only NAME ...] [--n N]
                        [--concurrency C] [--set key=value ...] [--keep-logs] [--strict] [--list]

``./dev bench`` runs ``python -m bench.run``. ``--quick`` uses small sizes (CI smoke).
``--repeat K`` runs each benchmark K times (fresh daemons each time) and adds best-of/median/worst
of its headline figures: the machine is shared, so one run is one sample of the noise.

The document: ``{"machine", "quick", "repeat", "results": {name: [one result per run]},
"summary": {name: {figure: {best, median, worst, values}}}, "failures", "bars"}``.

Exit status: 0 when every run had zero failures; 1 when a run failed or had failures; 3 with
``--strict`` when a bar was missed in every run; 130 when interrupted (all cleaned up first).

To add a benchmark: a module with ``BENCH = Bench(name, doc, run, table, headline)`` (see
:mod:`bench.common`), listed in :data:`BENCHES`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from bench import (
    chaos,
    cni,
    heal,
    local_setup,
    registry_watch,
    remote_scale,
    remote_setup,
    security,
    throughput,
)
from bench.common import (
    Bench,
    Options,
    emit_json,
    grpc_runtime,
    machine,
    say,
    sigterm_cancels,
    spread,
    spread_table,
)

#: Every benchmark, in the order they run.
BENCHES: dict[str, Bench] = {b.name: b for b in (local_setup.BENCH, remote_setup.BENCH,
                                                  throughput.BENCH, remote_scale.BENCH,
                                                  cni.BENCH, security.BENCH,
                                                  registry_watch.BENCH, heal.BENCH, chaos.BENCH)}
#: Long runs (10-15 min each), only with ``--only``: heal time per fault, the chaos soak.
ON_REQUEST = ("heal", "chaos")


async def _run_each(benches: Sequence[Bench], options: Options, repeat: int,
                    doc: dict[str, Any]) -> None:
    for bench in benches:
        runs: list[dict[str, Any]] = doc["results"].setdefault(bench.name, [])
        for i in range(repeat):
            say(f"== {bench.name} (run {i + 1}/{repeat}): {bench.doc}")
            try:
                result = await bench.run(options)
            except Exception as exc:
                traceback.print_exc(file=sys.stderr)
                result = {"name": bench.name, "failures": 1, "error": repr(exc), "bars": []}
            runs.append(result)
            say(bench.table(result) if "error" not in result
                else f"{bench.name}: {result['error']}")
            say()
        if bench.headline is not None and repeat > 1:
            ok_runs = [r for r in runs if "error" not in r]
            doc["summary"][bench.name] = spread([bench.headline(r) for r in ok_runs])
            say(spread_table(bench.name, doc["summary"][bench.name]))
            say()


async def _run_all(benches: Sequence[Bench], options: Options, repeat: int) -> dict[str, Any]:
    task = asyncio.current_task()
    assert task is not None
    doc: dict[str, Any] = {"machine": machine(), "quick": options.quick, "repeat": repeat,
                           "results": {}, "summary": {}}
    with sigterm_cancels(task):
        async with grpc_runtime():
            await _run_each(benches, options, repeat, doc)
    results = [r for runs in doc["results"].values() for r in runs]
    doc["failures"] = sum(int(r.get("failures") or 0) for r in results)
    bars: dict[str, dict[str, Any]] = {}
    for r in results:
        for b in r.get("bars", []):
            entry = bars.setdefault(f"{r['name']}: {b['name']}",
                                    {"limit": b["limit"], "op": b.get("op", "<="), "values": [],
                                     "met": 0})
            entry["values"].append(b["value"])
            entry["met"] += int(bool(b["ok"]))
    doc["bars"] = bars
    return doc


def run_benches(benches: Sequence[Bench], options: Options, *, json_path: str | None = None,
                strict: bool = False, repeat: int = 1) -> int:
    """Run ``benches``, print the JSON document (stdout) and tables (stderr); exit status."""
    if os.geteuid() != 0:
        say("bench: needs root (network namespaces, veth)")
        return 2
    try:
        doc = asyncio.run(_run_all(benches, options, repeat))
    except (KeyboardInterrupt, asyncio.CancelledError):
        say("bench: interrupted; everything it created was removed")
        return 130
    emit_json(doc, json_path)
    if json_path:
        say(f"JSON written to {json_path}")
    for name, bar in doc["bars"].items():
        values = ", ".join("-" if v is None else f"{v:g}" for v in bar["values"])
        say(f"bar {name} {bar['op']} {bar['limit']:g}: met in {bar['met']} of {len(bar['values'])} "
            f"run(s) ({values})")
    if doc["failures"]:
        say(f"bench: {doc['failures']} failures")
        return 1
    if strict and any(bar["met"] == 0 for bar in doc["bars"].values()):
        return 3
    return 0


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, not {text!r}")
    return key, value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a CI smoke run")
    parser.add_argument("--json", metavar="FILE", help="also write the JSON document to FILE")
    parser.add_argument("--repeat", type=int, default=1, metavar="K",
                        help="run each benchmark K times; report best-of and spread")
    parser.add_argument("--only", nargs="+", choices=list(BENCHES), help="run only these")
    parser.add_argument("--n", type=int, help="connections per phase (each bench's default)")
    parser.add_argument("--concurrency", type=int, help="in flight in concurrent phases")
    parser.add_argument("--set", dest="extra", type=_key_value, action="append", default=[],
                        metavar="KEY=VALUE", help="bench option, e.g. floor=0, breakdown=0")
    parser.add_argument("--settle", type=float, default=1.0,
                        help="seconds of pause between phases (default 1)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the daemons' logs")
    parser.add_argument("--strict", action="store_true",
                        help="exit 3 when a bar is missed in every run")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)
    if args.list:
        for bench in BENCHES.values():
            print(f"{bench.name:16} {bench.doc}")
        return 0
    for value, what in ((args.n, "--n"), (args.concurrency, "--concurrency"),
                        (args.repeat, "--repeat")):
        if value is not None and value < 1:
            parser.error(f"{what} must be positive")
    options = Options(quick=args.quick, n=args.n, concurrency=args.concurrency,
                      keep_logs=args.keep_logs, settle=args.settle, extra=dict(args.extra))
    chosen = [BENCHES[name] for name in (args.only or [n for n in BENCHES if n not in ON_REQUEST])]
    return run_benches(chosen, options, json_path=args.json, strict=args.strict,
                       repeat=args.repeat)


if __name__ == "__main__":
    sys.exit(main())

"""Registry Find among open watches: a Find(all) of the endpoint registry while ``w`` watch
streams are being sent their snapshots, beside the same Find alone; with the snapshot throttle
(the default: ``Limits.snapshots_in_flight`` watchers sent theirs at a time) and without it
(every snapshot at once, as before the throttle), in the same run.

Three processes per side, as on a node: the registry (a :class:`nsm.registry.main.RegistryDaemon`
on a unix socket, plaintext, holding ``records`` endpoint records of ~1 KiB each), the watchers
(another process: ``w`` Find(watch=true) streams over 10 channels, read as raw bytes) and this
one, which runs the Finds. Each watch's snapshot is the whole store: ``w * records`` records
to send in all.

Figures per side: **alone** — Find(all) p50 of 5 before the watchers open; **among watches** —
every Find started while snapshots were still being sent (at most 5), and their ratio to alone
(p50 and max); **all snapshots** — from the watches being opened until every watcher read its
whole snapshot (seen by the watchers). Checked: every Find returns every record, every watcher
gets its snapshot. Bar (ours, from the registry's limits): throttled Find p50 among watches ≤ 10 times
alone.

    python -m bench.registry_watch [--records 200] [--watches 500] [--quick] [--json F]

``--quick``: 50 records, 100 watches. ``bench.run --set records=N --set watches=N`` does the same.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from typing import Any

import grpc

from bench import common
from bench.common import Bar, Bench, CheckFailed, Failures, Options
from nsm.api import registry_pb2_grpc
from nsm.api.registry_pb2 import NetworkServiceEndpoint, NetworkServiceEndpointQuery

NAME = "registry_watch"
DEFAULT_RECORDS, QUICK_RECORDS = 200, 50
DEFAULT_WATCHES, QUICK_WATCHES = 500, 100
#: Finds before the watchers open, and at most this many while snapshots are being sent.
FINDS = 5
BAR = 10.0
FIND = "/registry.NetworkServiceEndpointRegistry/Find"
#: Without the throttle: more snapshots in flight than there are watchers.
UNTHROTTLED = 1 << 20

#: The registry: argv = url, records, watches, snapshots in flight (0: the default limit).
REGISTRY = """
import asyncio, sys
from nsm.api.registry_pb2 import NetworkServiceEndpoint, NetworkServiceLabels
from nsm.limits import Limits
from nsm.registry.main import RegistryDaemon
from nsm.registry.server import Registry

async def main(url, records, watches, in_flight):
    limits = Limits(watches_per_caller=watches + 16, watches=watches + 16,
                    **({"snapshots_in_flight": in_flight} if in_flight else {}))
    registry = Registry(limits=limits, expiry=3600)
    async with RegistryDaemon([url], registry=registry):
        for i in range(records):
            await registry.register_nse(NetworkServiceEndpoint(
                name=f"nse-{i}", network_service_names=["bench"], url="unix:///run/nse.sock",
                network_service_labels={"bench": NetworkServiceLabels(labels={"pad": "x" * 1000})}))
        print("ready", registry.limits.snapshots_in_flight, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

asyncio.run(main(sys.argv[1], *map(int, sys.argv[2:5])))
"""

#: The watchers: argv = target, watches, records, query (hex), method. Prints "open" when every
#: stream is started, then "done <s>" when every one has read ``records`` messages (its snapshot).
WATCHERS = """
import asyncio, sys, time
import grpc

async def main(target, n, records, query, method):
    channels = [grpc.aio.insecure_channel(target) for _ in range(10)]
    left = [n]
    all_read = asyncio.Event()

    async def drain(channel):
        got = 0
        async for _ in channel.unary_stream(method)(query):
            got += 1
            if got == records:
                left[0] -= 1
                if not left[0]:
                    all_read.set()

    started = time.perf_counter()
    tasks = [asyncio.create_task(drain(channels[i % 10])) for i in range(n)]
    print("open", flush=True)
    await all_read.wait()
    print(f"done {time.perf_counter() - started:.3f}", flush=True)
    await asyncio.gather(*tasks, return_exceptions=True)

asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), bytes.fromhex(sys.argv[4]),
                 sys.argv[5]))
"""


async def _find_all(stub: registry_pb2_grpc.NetworkServiceEndpointRegistryStub, records: int) -> float:
    """One Find(all): its time in ms; every record must come back."""
    t0 = time.perf_counter()
    count = 0
    query = NetworkServiceEndpointQuery(network_service_endpoint=NetworkServiceEndpoint())
    async for _ in stub.Find(query, timeout=120):
        count += 1
    if count != records:
        raise CheckFailed(f"Find returned {count} of {records} records")
    return common.ms(t0, time.perf_counter())


async def _line(proc: asyncio.subprocess.Process, timeout: float) -> str:
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), timeout)).decode().strip()
    if not line:
        raise CheckFailed(f"process {proc.pid} ended (exit {await proc.wait()})")
    return line


async def _stop(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    await proc.wait()


async def _side(work: str, label: str, records: int, watches: int, in_flight: int,
                failures: Failures) -> dict[str, Any]:
    """One registry, its Finds alone, then among ``watches`` watchers' snapshots."""
    sock = f"{work}/{label}.sock"
    registry = await asyncio.create_subprocess_exec(
        sys.executable, "-c", REGISTRY, f"unix://{sock}", str(records), str(watches), str(in_flight),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    watchers: asyncio.subprocess.Process | None = None
    channel = grpc.aio.insecure_channel(f"unix:{sock}")
    try:
        ready = (await _line(registry, 60)).split()
        if ready[0] != "ready":
            raise CheckFailed(f"registry said {ready}")
        stub = registry_pb2_grpc.NetworkServiceEndpointRegistryStub(channel)
        await _find_all(stub, records)  # warm: the channel connected, the first call made
        alone = [await _find_all(stub, records) for _ in range(FINDS)]
        query = NetworkServiceEndpointQuery(network_service_endpoint=NetworkServiceEndpoint(),
                                            watch=True).SerializeToString().hex()
        watchers = await asyncio.create_subprocess_exec(
            sys.executable, "-c", WATCHERS, f"unix:{sock}", str(watches), str(records), query, FIND,
            stdout=asyncio.subprocess.PIPE)
        if await _line(watchers, 30) != "open":
            raise CheckFailed("the watchers did not start")
        done = asyncio.ensure_future(_line(watchers, 300))
        among: list[float] = []
        try:
            while not done.done() and len(among) < FINDS:
                among.append(await _find_all(stub, records))
            finished = (await done).split()
        finally:
            done.cancel()
            await asyncio.gather(done, return_exceptions=True)
        if finished[0] != "done":
            raise CheckFailed(f"the watchers said {finished}")
        alone_ms, among_ms = common.summarize(alone), common.summarize(among)
        return {"snapshots_in_flight": int(ready[1]), "alone_ms": alone_ms, "among_ms": among_ms,
                "ratio_p50": common.ratio(among_ms.get("p50"), alone_ms["p50"]),
                "ratio_max": common.ratio(among_ms.get("max"), alone_ms["p50"]),
                "all_snapshots_s": float(finished[1])}
    except (CheckFailed, grpc.aio.AioRpcError, TimeoutError) as exc:
        failures.add(label, exc)
        return {"error": repr(exc)}
    finally:
        await channel.close()
        if watchers is not None:
            await _stop(watchers)
        await _stop(registry)


async def run(options: Options) -> dict[str, Any]:
    records = int(options.extra.get("records", QUICK_RECORDS if options.quick else DEFAULT_RECORDS))
    watches = int(options.extra.get("watches", QUICK_WATCHES if options.quick else DEFAULT_WATCHES))
    failures, result, started = common.begin(NAME, "the sweep of namespaces left by killed benchmarks",
                                             records=records, watches=watches)
    with failures.recording(result, started):
        async with common.Scratch("regw", keep_logs=options.keep_logs, secure=False) as scratch:
            for side, in_flight in (("throttled", 0), ("unthrottled", UNTHROTTLED)):
                common.say(f"{side}: {watches} watches of {records} records")
                result[side] = await _side(str(scratch.work), side, records, watches, in_flight,
                                           failures)
    ratio = result.get("throttled", {}).get("ratio_p50")
    result["bars"] = [Bar("Find p50 among watches / alone (throttled)", ratio, BAR).as_dict()]
    return result


def table(result: dict[str, Any]) -> str:
    rows = [f"{NAME}: Find(all) of {result['records']} records, {result['watches']} watches "
            f"being sent their snapshots (ms)",
            f"{'side':<12} {'in flight':>9} | {'alone p50':>9} | {'among p50':>9} {'max':>8} | "
            f"{'ratio p50':>9} {'max':>6} | {'all snapshots s':>15}"]
    rows.append("-" * len(rows[1]))
    for side in ("throttled", "unthrottled"):
        r = result.get(side, {})
        if "alone_ms" not in r:
            rows.append(f"{side:<12} {r.get('error', 'not run')}")
            continue
        rows.append(f"{side:<12} {r['snapshots_in_flight']:>9} | {r['alone_ms']['p50']:>9.1f} | "
                    f"{common.fmt(r['among_ms'].get('p50'), 9, 1)} "
                    f"{common.fmt(r['among_ms'].get('max'), 8, 1)} | "
                    f"{common.fmt(r['ratio_p50'], 9)} {common.fmt(r['ratio_max'], 6)} | "
                    f"{r['all_snapshots_s']:>15.2f}")
    return "\n".join(rows + common.outcome_lines(result))


def headline(result: dict[str, Any]) -> dict[str, float | None]:
    return {f"{side} {figure}": result.get(side, {}).get(figure)
            for side in ("throttled", "unthrottled") for figure in ("ratio_p50", "all_snapshots_s")}


BENCH = Bench(NAME, common.summary(__doc__), run, table, headline)


async def _main(quick: bool, records: int | None, watches: int | None,
                keep_logs: bool) -> dict[str, Any]:
    extra = {k: str(v) for k, v in (("records", records), ("watches", watches)) if v is not None}
    return await run(Options(quick=quick, keep_logs=keep_logs, extra=extra))


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--records", type=int)
    parser.add_argument("--watches", type=int)
    parser.add_argument("--keep-logs", action="store_true")


def main(argv: list[str] | None = None) -> int:
    return common.cli(__doc__, _main, table, argv, _options)


if __name__ == "__main__":
    sys.exit(main())

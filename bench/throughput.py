"""TCP throughput pod→pod across two nodes: our VXLAN links against hand-built ones, same run.

**Ours**: the demo's cluster (:class:`nsm.lab.Lab`, real daemons); an endpoint on node2 offers
two services, one with IP payload (routed: veth, VXLAN, per-connection policy table) and one with
ETHERNET payload (bridged: veth and VXLAN joined by a bridge); a client pod on node1 requests
each through the SDK. **Hand-built**: the same kind of namespaces (a fabric bridge, two node
namespaces with ``eth0`` on it, a client pod on node1 and a server pod on node2), built directly
with :class:`nsm.kernel.netlink.Netlink` the textbook way:

- *routed*: a veth into each pod (pod address /24, default route via the node end's address),
  a VXLAN per node (VNI 1001, UDP 4789, local/remote underlay addresses, over ``eth0``) with an
  address of a /30 and a route to the other pod's /24 via the other node's VXLAN address;
- *bridged*: a veth into each pod and a VXLAN per node (VNI 1002) joined by a bridge; both pods
  in one /24.

Every pod interface, node veth end, VXLAN and bridge has MTU 1450 (checked and reported, with
the MSS iperf3 saw). ``iperf3 -J`` (one TCP stream, client in the node1 pod, server in the node2
pod, run inside the pods with ``python -m nsm.lab.netns_exec``) measures each link for the same
duration (4 s, 2 s in quick mode; 1 s omitted at the start), interleaved over 6 rounds; within a
round each of our links runs right beside its hand-built twin, ours first in even rounds and
second in odd ones (counterbalanced against drifts of the shared machine's load). Reported: the
median Gbit/s of each link, the ratio ours/hand-built of each round, and their median, which
is what the bar (>= 0.95) judges; the ratio of the medians is shown beside it.

    python -m bench.throughput [--quick] [--rounds 6] [--seconds 4] [--json F]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bench.common import (
    IFNAME,
    TUNNEL_MTU,
    Bench,
    BenchLab,
    Fabric,
    Failures,
    Options,
    Scratch,
    begin,
    cli,
    fmt,
    outcome_lines,
    say,
    summary,
)
from nsm.client.sdk import Client
from nsm.errors import NotFound, Unavailable
from nsm.kernel.netlink import Netlink
from nsm.kernel.ping import ping
from nsm.lab import EndpointSpec, Lab, NodeSpec, PodSpec, ServiceSpec, Topology
from nsm.mechanisms import VXLAN_PORT

NAME = "throughput"
#: The bar: ours / hand-built (median Gbit/s), same run.
BAR = 0.95
SERVICE_IP = "tput-ip"
SERVICE_ETH = "tput-eth"
NSE_CIDR = "172.21.0.0/24"
PORT = 5201
DEFAULT_SECONDS, QUICK_SECONDS = 4, 2
DEFAULT_ROUNDS, QUICK_ROUNDS = 6, 2
OMIT_SECONDS = 1
#: (variant, compared with) in the order they run within a round.
VARIANTS = ("ours IP (routed)", "hand-built routed", "ours ETHERNET (bridged)", "hand-built bridged")
PAIRS = (("ours IP (routed)", "hand-built routed"), ("ours ETHERNET (bridged)", "hand-built bridged"))


@dataclass(frozen=True)
class Link:
    """One pod-to-pod link to measure: iperf3 client in ``client_ns``, server at ``server_ip``
    in ``server_ns``."""

    name: str
    client_ns: str
    client_if: str
    server_ns: str
    server_if: str
    server_ip: str


# ------------------------------------------------------------------------------------ iperf3


def _exec(netns: str, *argv: str) -> list[str]:
    return [sys.executable, "-m", "nsm.lab.netns_exec", netns, "--", *argv]


def _listening(pid: int, port: int) -> bool:
    """Whether the process ``pid`` sees a TCP socket listening on ``port`` (in its namespace)."""
    for table in ("tcp6", "tcp"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                        return True
        except (OSError, StopIteration, IndexError, ValueError):
            continue
    return False


class IperfServers:
    """``iperf3 -s`` in server pods, stopped (by pid) at the end."""

    def __init__(self) -> None:
        self.procs: list[asyncio.subprocess.Process] = []

    async def start(self, netns: str, port: int = PORT, timeout: float = 10.0) -> None:
        proc = await asyncio.create_subprocess_exec(
            *_exec(netns, "iperf3", "-s", "-p", str(port)), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True)
        self.procs.append(proc)
        deadline = time.monotonic() + timeout
        while not _listening(proc.pid, port):
            if proc.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"iperf3 server in {netns} did not start")
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), 5)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    await proc.wait()
        self.procs = []


async def iperf(link: Link, seconds: int, port: int = PORT) -> dict[str, Any]:
    """One ``iperf3 -c`` TCP test over ``link``: Gbit/s received, retransmits, MSS, CPU."""
    proc = await asyncio.create_subprocess_exec(
        *_exec(link.client_ns, "iperf3", "-c", link.server_ip, "-p", str(port), "-t",
               str(seconds), "-O", str(OMIT_SECONDS), "-J"),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, start_new_session=True)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), seconds + OMIT_SECONDS + 30)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    try:
        doc = json.loads(out)
    except json.JSONDecodeError:
        raise RuntimeError(f"iperf3 over {link.name}: no JSON (exit {proc.returncode}): "
                           f"{err.decode(errors='replace')[:300]}") from None
    if doc.get("error"):
        raise RuntimeError(f"iperf3 over {link.name}: {doc['error']}")
    end = doc["end"]
    cpu = end.get("cpu_utilization_percent", {})
    return {"gbps": round(end["sum_received"]["bits_per_second"] / 1e9, 3),
            "sent_gbps": round(end["sum_sent"]["bits_per_second"] / 1e9, 3),
            "retransmits": end["sum_sent"].get("retransmits"),
            "mss": doc["start"].get("tcp_mss_default"),
            "cpu_client_pct": round(cpu.get("host_total", 0.0), 1),
            "cpu_server_pct": round(cpu.get("remote_total", 0.0), 1)}


# ------------------------------------------------------------------------------------ links


async def hand_built(scratch: Scratch, nl: Netlink) -> tuple[Link, Link]:
    """The hand-built routed and bridged links (see the module docstring)."""
    node1, node2 = await Fabric(scratch, nl).build(2)
    mtu = TUNNEL_MTU
    # routed
    pods = {}
    for side, node, net, peer_net, vx_ip, vx_peer in (
            (1, node1, "10.201.1", "10.201.2", "10.201.0.1", "10.201.0.2"),
            (2, node2, "10.201.2", "10.201.1", "10.201.0.2", "10.201.0.1")):
        pod = scratch.netns(f"hr{side}")
        pods[side] = pod
        other = node2 if node is node1 else node1
        await nl.create_veth("eth1", pod, f"hbv{side}", node.netns, mtu=mtu)
        await nl.setup_interface(pod, "eth1", addresses=[f"{net}.2/24"],
                                 routes=[("0.0.0.0/0", f"{net}.1")], mtu=mtu)
        await nl.setup_interface(node.netns, f"hbv{side}", addresses=[f"{net}.1/24"], routes=[],
                                 mtu=mtu)
        await nl.create_vxlan(f"hbx{side}", node.netns, vni=1001, local=node.ip, remote=other.ip,
                              port=VXLAN_PORT, underlay="eth0", mtu=mtu)
        await nl.setup_interface(node.netns, f"hbx{side}", addresses=[f"{vx_ip}/30"],
                                 routes=[(f"{peer_net}.0/24", vx_peer)], mtu=mtu)
    routed = Link("hand-built routed", pods[1], "eth1", pods[2], "eth1", "10.201.2.2")
    # bridged
    for side, node in ((1, node1), (2, node2)):
        pod = scratch.netns(f"hb{side}")
        pods[side] = pod
        other = node2 if node is node1 else node1
        await nl.create_veth("eth1", pod, f"hbw{side}", node.netns, mtu=mtu)
        await nl.setup_interface(pod, "eth1", addresses=[f"10.202.0.{side}/24"], routes=[], mtu=mtu)
        await nl.create_vxlan(f"hby{side}", node.netns, vni=1002, local=node.ip, remote=other.ip,
                              port=VXLAN_PORT, underlay="eth0", mtu=mtu)
        await nl.create_bridge(f"hbb{side}", node.netns, mtu=mtu)
        for dev in (f"hbw{side}", f"hby{side}"):
            await nl.set_master(node.netns, dev, f"hbb{side}")
            await nl.set_up(node.netns, dev)
        await nl.set_up(node.netns, f"hbb{side}")
    bridged = Link("hand-built bridged", pods[1], "eth1", pods[2], "eth1", "10.202.0.2")
    return routed, bridged


async def ours(lab: Lab, failures: Failures) -> tuple[list[Client], Link, Link]:
    """Our two connections (IP and ETHERNET) from the node1 pods to the NSE on node2."""
    node1 = lab.node("node1")
    nse_ns = lab.endpoint("tput-nse").netns
    clients: list[Client] = []
    links = []
    for service, pod, label in ((SERVICE_IP, "tc-ip", "ours IP (routed)"),
                                (SERVICE_ETH, "tc-eth", "ours ETHERNET (bridged)")):
        ns = lab.pod(pod).netns
        deadline = time.monotonic() + 20.0
        while True:  # the first waits until the NSE's registration reached node1's manager
            client = Client(heal=None, manager_url=node1.manager_url, service=service, netns=ns,
                            ifname=IFNAME, name=f"bench-{pod}", security=lab.pod_identity(ns))
            try:
                conn = await client.request()
                break
            except (NotFound, Unavailable) as exc:
                await client.close()
                if time.monotonic() > deadline:
                    failures.add(f"request {service}", exc)
                    raise
                await asyncio.sleep(0.1)
        clients.append(client)
        if conn.payload != ("IP" if service == SERVICE_IP else "ETHERNET"):
            raise RuntimeError(f"{service}: payload {conn.payload}")
        links.append(Link(label, ns, IFNAME, nse_ns, "",
                          conn.context.ip_context.dst_ip_addrs[0].split("/")[0]))
    return clients, links[0], links[1]


async def server_ifname(nl: Netlink, netns: str, ip: str) -> str:
    """The interface of ``netns`` holding ``ip`` (the endpoint's end of one of our links)."""
    for info in await nl.links(netns):
        if any(a.split("/")[0] == ip for a in await nl.addresses(netns, info.name)):
            return info.name
    return ""


async def mtus(nl: Netlink, link: Link) -> dict[str, int | None]:
    """The MTU of both pod interfaces of a link."""
    out: dict[str, int | None] = {}
    for side, ns, ifname in (("client", link.client_ns, link.client_if),
                             ("server", link.server_ns, link.server_if)):
        info = await nl.link(ns, ifname) if ifname else None
        out[side] = info.mtu if info else None
    return out


# ------------------------------------------------------------------------------------ run


async def run(quick: bool = False, *, rounds: int | None = None,
              seconds: int | None = None) -> dict[str, Any]:
    """The whole benchmark (see the module docstring); one JSON-able dict."""
    rounds = rounds or (QUICK_ROUNDS if quick else DEFAULT_ROUNDS)
    seconds = seconds or (QUICK_SECONDS if quick else DEFAULT_SECONDS)
    failures, result, started = begin(NAME, "network namespaces", rounds=rounds, seconds=seconds,
                                      omit_seconds=OMIT_SECONDS, bar=BAR)
    topo = Topology(
        nodes=(NodeSpec("node1"), NodeSpec("node2")),
        pods=(PodSpec("tc-ip", "node1"), PodSpec("tc-eth", "node1")),
        endpoints=(EndpointSpec("tput-nse", "node2", (SERVICE_IP, SERVICE_ETH), NSE_CIDR),),
        services=(ServiceSpec(SERVICE_IP, payload="IP"),
                  ServiceSpec(SERVICE_ETH, payload="ETHERNET")))
    scratch = Scratch("tput")
    nl = Netlink()
    servers = IperfServers()
    clients: list[Client] = []
    samples: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    result["samples"] = samples
    with failures.recording(result, started):
        try:
            async with BenchLab(topo) as lab:
                clients, ours_ip, ours_eth = await ours(lab, failures)
                ours_ip, ours_eth = [
                    dataclasses.replace(link, server_if=await server_ifname(nl, link.server_ns,
                                                                            link.server_ip))
                    for link in (ours_ip, ours_eth)]
                hand_routed, hand_bridged = await hand_built(scratch, nl)
                links = {v.name: v for v in (ours_ip, hand_routed, ours_eth, hand_bridged)}
                result["mtu"] = {name: await mtus(nl, link) for name, link in links.items()}
                for name, m in result["mtu"].items():
                    if set(m.values()) != {TUNNEL_MTU}:
                        failures.add(f"MTU of {name}", RuntimeError(f"pod MTUs {m}, not {TUNNEL_MTU}"))
                await nl.close()
                for ns in {link.server_ns for link in links.values()}:
                    await servers.start(ns)
                for link in links.values():
                    res = await asyncio.to_thread(ping, link.client_ns, link.server_ip, count=3,
                                                  interval=0.05)
                    if not res.received:
                        failures.add(f"ping over {link.name}", RuntimeError(", ".join(res.errors)))
                say(f"throughput: {rounds} rounds of {len(VARIANTS)} links x {seconds} s")
                for r in range(rounds):
                    # Counterbalanced: each pair runs ours first in even rounds and the hand-built
                    # link first in odd ones, so a drift of the machine's load favours neither.
                    order = [name for a, b in PAIRS for name in ((a, b) if r % 2 == 0 else (b, a))]
                    for name in order:
                        try:
                            sample = await iperf(links[name], seconds)
                        except RuntimeError as exc:
                            failures.add(f"iperf3 round {r} {name}", exc)
                            continue
                        samples[name].append(sample)
                        say(f"  round {r + 1} {name:<24} {sample['gbps']:6.2f} Gbit/s "
                            f"(retr {sample['retransmits']}, mss {sample['mss']})")
                await servers.stop()
                for c in clients:
                    await c.close()
                clients = []
                result["daemon_log_problems"] = lab.log_problems()
        finally:
            await servers.stop()
            for c in clients:
                await asyncio.shield(c.close())
            await nl.close()
            await scratch.aclose()
    result["median_gbps"] = {name: (round(statistics.median(s["gbps"] for s in v), 3) if v else None)
                             for name, v in samples.items()}
    result["spread_gbps"] = {name: [min(s["gbps"] for s in v), max(s["gbps"] for s in v)]
                             for name, v in samples.items() if v}
    bars = []
    ratios = {}
    for a, b in PAIRS:
        ma, mb = result["median_gbps"].get(a), result["median_gbps"].get(b)
        of_medians = round(ma / mb, 3) if ma and mb else None
        # Paired per round (the two runs are adjacent in time, so a slow drift of the shared
        # machine's load affects both); the bar is judged on the median of these.
        per_round = [round(x["gbps"] / y["gbps"], 3)
                     for x, y in zip(samples[a], samples[b], strict=False) if y["gbps"]]
        value = round(statistics.median(per_round), 3) if per_round else None
        ratios[f"{a} / {b}"] = {"median_ratio": value, "ratio_of_medians": of_medians,
                                "per_round": per_round}
        bars.append({"name": f"{a} / {b} (median of paired rounds; bar >= {BAR})", "value": value,
                     "limit": BAR, "unit": "x", "op": ">=",
                     "ok": value is not None and value >= BAR})
    result["ratios"] = ratios
    result["bars"] = bars
    return result


def table(result: dict[str, Any]) -> str:
    """The result as a human table."""
    lines = [f"throughput: iperf3 TCP, 1 stream, pod on node1 -> pod on node2, "
             f"{result.get('seconds')} s per test (+{result.get('omit_seconds')} s omitted), "
             f"{result.get('rounds')} rounds interleaved"]
    head = f"{'link':<26} {'median':>8} {'min':>7} {'max':>7} {'retr(med)':>9} {'mss':>5} {'pod MTU':>8}"
    lines += [head, "-" * len(head)]
    for name in VARIANTS:
        s = result.get("samples", {}).get(name) or []
        lo, hi = (result.get("spread_gbps") or {}).get(name, [None, None])
        retr = statistics.median(x["retransmits"] or 0 for x in s) if s else None
        mss = s[0]["mss"] if s else None
        mtu = (result.get("mtu") or {}).get(name, {})
        lines.append(f"{name:<26} {fmt((result.get('median_gbps') or {}).get(name))} "
                     f"{fmt(lo, 7)} {fmt(hi, 7)} {fmt(retr, 9, 0)} {mss or '-':>5} "
                     f"{'/'.join(str(v) for v in mtu.values()) or '-':>8}")
    lines.append("(Gbit/s)")
    for name, r in (result.get("ratios") or {}).items():
        lines.append(f"ratio {name}: {fmt(r['median_ratio'], 0, 3)} median of rounds "
                     f"({', '.join(f'{v:.3f}' for v in r['per_round'])}); ratio of medians "
                     f"{fmt(r.get('ratio_of_medians'), 0, 3)}")
    lines += outcome_lines(result)
    return "\n".join(lines)


def headline(result: dict[str, Any]) -> dict[str, float | None]:
    """Figures compared across repeated runs (Gbit/s are better higher: ``/s``)."""
    out: dict[str, float | None] = {f"{k} Gbit/s": v for k, v in (result.get("median_gbps") or {}).items()}
    for name, r in (result.get("ratios") or {}).items():
        out[f"{name} ratio of Gbit/s"] = r["median_ratio"]
    return out


async def run_options(options: Options) -> dict[str, Any]:
    """:func:`run` for ``bench.run`` (``--set rounds=N --set seconds=S``)."""
    extra = options.extra
    return await run(options.quick, rounds=int(extra["rounds"]) if "rounds" in extra else None,
                     seconds=int(extra["seconds"]) if "seconds" in extra else None)


BENCH = Bench(name=NAME, doc=summary(__doc__), run=run_options,
              table=table, headline=headline)


def main(argv: Sequence[str] | None = None) -> int:
    def extra(p: argparse.ArgumentParser) -> None:
        p.add_argument("--rounds", type=int, default=None,
                       help=f"interleaved rounds ({DEFAULT_ROUNDS}; quick {QUICK_ROUNDS})")
        p.add_argument("--seconds", type=int, default=None,
                       help=f"seconds per test ({DEFAULT_SECONDS}; quick {QUICK_SECONDS})")

    return cli(__doc__, run, table, list(argv) if argv is not None else None, extra)


if __name__ == "__main__":
    sys.exit(main())

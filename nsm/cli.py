"""``nsm``: one command for every role.

    nsm registry   --listen URL ...
    nsm manager    --name NODE --listen URL --registry URL
    nsm forwarder  --name NAME --manager URL --listen URL --registry URL
    nsm nse        --name N --service S --cidr CIDR --netns PATH --listen URL --registry URL
    nsm nsc        --service S --netns PATH --ifname NAME --manager URL
    nsm cni-agent  --manager URL --socket PATH --state-dir DIR   (the nsm-cni plugin's agent)
    nsm cni-install / cni-uninstall   put nsm-cni into the node's conflist / take it out
    nsm ca-init    --dir DIR [--trust-domain TD]   a CA for every machine (Kubernetes: Secret nsm-ca)
    nsm health     [--url URL]   exit 0 when the daemon at URL (default: NSM_LISTEN) is SERVING
    nsm metrics    [--url URL]   print the metrics of the daemon at URL (default: NSM_METRICS_LISTEN)
    nsm demo       build a throwaway mesh, show a link and a ping, tear it all down

Every flag also reads an ``NSM_*`` environment variable (``--listen`` → ``NSM_LISTEN``).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys

from nsm.errors import InvalidArgument, NsmError

#: subcommand → (module, one-line help). Modules provide add_arguments(parser) and run(args).
COMMANDS: dict[str, tuple[str, str]] = {
    "registry": ("nsm.registry.main", "run the registry of network services and endpoints"),
    "manager": ("nsm.manager.main", "run a node's network service manager"),
    "forwarder": ("nsm.forwarder.main", "run a node's forwarder (programs the kernel)"),
    "nse": ("nsm.endpoint.main", "run a network service endpoint"),
    "nsc": ("nsm.client.main", "request a network service for a namespace"),
    "cni-agent": ("nsm.cni.agent", "run a node's CNI agent (behind the nsm-cni plugin)"),
    "cni-install": ("nsm.cni.install", "install nsm-cni on this node: the executable, the conflist entry"),
    "cni-uninstall": ("nsm.cni.install", "remove nsm-cni from this node (conflist entries, executable)"),
    "ca-init": ("nsm.security.cainit", "make a built-in CA directory to share between machines (a Secret)"),
    "health": ("nsm.health", "ask a daemon's gRPC health service once (exit 0 when SERVING)"),
    "metrics": ("nsm.scrape", "read a daemon's Prometheus metrics once and print them"),
    "demo": ("nsm.lab.demo", "build a throwaway mesh in namespaces and show it working"),
    "lab": ("nsm.lab.cli", "an emulated cluster of nodes in namespaces: lab up|down|status"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nsm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Only the chosen command's module is imported (fast start, no unused imports).
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, text) in COMMANDS.items():
        p = sub.add_parser(name, help=text, description=text)
        if name == chosen:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    parser = build_parser(args_list)
    args = parser.parse_args(args_list)
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(asyncio.run(module.run(args)) or 0)
    except KeyboardInterrupt:
        return 130
    except InvalidArgument as exc:
        print(f"nsm {args.command}: {exc.message}", file=sys.stderr)
        return 2
    except NsmError as exc:
        print(f"nsm {args.command}: {exc.code.name}: {exc.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())

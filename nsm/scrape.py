"""``nsm metrics``: read a daemon's Prometheus metrics once and print them.

    nsm metrics                          # NSM_METRICS_LISTEN (the container's own daemon)
    nsm metrics --url tcp://10.0.0.1:9101

Run in a daemon's container (``kubectl exec ... -c manager -- nsm metrics``) it inherits its
environment: without ``--url`` it reads the metrics the daemon serves (``NSM_METRICS_LISTEN``),
with the daemon's security settings. Its identity is ``spiffe://<td>/nsm/metrics`` from the
built-in CA, or the container's SVID from the Workload API: every daemon lets both read its
metrics (:func:`nsm.metrics.serving_metrics`). Exit 1 (one line on stderr) when the daemon does
not answer or refuses; 2 on bad input.
"""

from __future__ import annotations

import argparse
import os
import sys

from nsm.config import EXIT_FAILED, duration, fail
from nsm.errors import NsmError
from nsm.health import one_shot
from nsm.metrics import METRICS_PATH, reader_id
from nsm.security.options import add_security_flags
from nsm.transport import http_get

PROG = "nsm metrics"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Not read from NSM_URL/NSM_TIMEOUT (in a daemon's container those would be its own); the
    # security flags are read from the environment on purpose, as for `nsm health`.
    parser.add_argument("--url", default=None, help="where the daemon serves its metrics, "
                        "tcp://host:port or unix:///path (default: NSM_METRICS_LISTEN)")
    parser.add_argument("--timeout", type=duration, default=5.0, help="how long to wait for the answer")
    add_security_flags(parser)


async def run(args: argparse.Namespace) -> int:
    ready = await one_shot(PROG, args.url or os.environ.get("NSM_METRICS_LISTEN", "").strip(),
                           "NSM_METRICS_LISTEN", args, reader_id(args.trust_domain))
    if isinstance(ready, int):
        return ready
    url, security = ready
    try:
        status, body = await http_get(url, METRICS_PATH, security, timeout=args.timeout)
    except NsmError as exc:
        return fail(PROG, exc.message, EXIT_FAILED)
    finally:
        await security.close()
    if status != 200:
        return fail(PROG, f"{url}: HTTP {status}: {body.decode(errors='replace').strip()[:300]}",
                    EXIT_FAILED)
    sys.stdout.write(body.decode(errors="replace"))
    sys.stdout.flush()
    return 0

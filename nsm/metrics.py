"""A daemon's Prometheus metrics, and serving them (``--metrics-listen``, off unless given).

Every daemon (registry, manager, forwarder, endpoint, CNI agent) exports:

- ``nsm_info{role,name}`` = 1: which daemon this is;
- ``nsm_held{what}``: what it holds, counted: its status (the line SIGUSR1 logs,
  :func:`nsm.daemon.status_on_signal`: connections, expiry timers, monitor watchers, a
  forwarder's VNIs, the registry's records and watches, the CNI agent's attachments...);
- ``nsm_tasks``: its asyncio tasks (a leak shows as a climb).

The roles that serve NetworkService (manager, forwarder, endpoint) also export, from the first
element of their chain (:class:`nsm.elements.metrics.Measured`), and the registry for its calls
(methods ``ns.Register``, ``nse.Find``, ``nse.Watch``, ...; a watch counts when it ends):

- ``nsm_requests_total{method,code}``: the Requests and Closes this hop served, by the gRPC
  status each ended with (refused callers included: ``PERMISSION_DENIED``);
- ``nsm_request_duration_seconds{method}``: how long each took here, down the rest of the path
  (a histogram).

Who may read them: with security on the listener is HTTPS with the daemon's SVID, and a client
must present an SVID of the trust domain listed in ``--metrics-scrapers`` or ``--observers``,
or the daemon's own, or ``spiffe://<td>/nsm/metrics`` (``nsm metrics``, :mod:`nsm.scrape`)
(403 otherwise; no certificate, or one of another authority, fails the handshake). A Prometheus
scrapes with an SVID of its own (a SPIRE registration, or one of the built-in CA). With
``--insecure`` it is plain HTTP and anyone may read, as nothing else is checked then either.
prometheus_client gives the metric types and the exposition format; each daemon has its own
registry of them (not the library's global one).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from nsm.config import flag
from nsm.errors import InvalidArgument, status_of
from nsm.log import get_logger
from nsm.security.ids import SpiffeId, parse_id
from nsm.security.tls import Security
from nsm.transport import HttpListener, parse_url

log = get_logger("nsm.metrics")

#: Where the metrics are served.
METRICS_PATH = "/metrics"
#: Buckets of ``nsm_request_duration_seconds``: a local Request takes milliseconds, a remote one
#: tens of them, one that waits for a slow endpoint up to the request timeout (15 s).
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0,
                    30.0)

Status = Callable[[], Mapping[str, int]]


class _Held(Collector):
    """``nsm_info``, ``nsm_held`` and ``nsm_tasks``, read when scraped."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return []  # read only when scraped: the status may not be ready at registration

    def collect(self) -> Iterable[Metric]:
        info = GaugeMetricFamily("nsm_info", "This daemon: its role and name", labels=("role", "name"))
        info.add_metric((self._metrics.role, self._metrics.name), 1)
        yield info
        held = GaugeMetricFamily("nsm_held", "What this daemon holds, counted (its status)",
                                 labels=("what",))
        status = self._metrics.status
        try:
            counts = dict(status()) if status is not None else {}
        except Exception as exc:  # a scrape must never take the daemon down
            log.warning("status failed", error=repr(exc))
            counts = {}
        for what, count in sorted(counts.items()):
            held.add_metric((what,), count)
        yield held
        try:
            tasks = len(asyncio.all_tasks())
        except RuntimeError:  # no running loop (a scrape from another thread)
            return
        yield GaugeMetricFamily("nsm_tasks", "asyncio tasks of this daemon", value=tasks)


class Metrics:
    """One daemon's metrics: ``role`` and ``name`` say which; ``status`` counts what it holds
    (set here or later, :attr:`status`)."""

    def __init__(self, role: str, name: str = "", status: Status | None = None) -> None:
        self.role = role
        self.name = name
        self.status = status
        self.registry = CollectorRegistry(auto_describe=True)
        self._requests = Counter("nsm_requests", "Requests and Closes this hop served, by the gRPC "
                                 "status they ended with", ("method", "code"), registry=self.registry)
        self._duration = Histogram("nsm_request_duration_seconds", "How long Requests and Closes "
                                   "took at this hop, down the rest of the path", ("method",),
                                   buckets=DURATION_BUCKETS, registry=self.registry)
        self.registry.register(_Held(self))

    @contextlib.contextmanager
    def measure(self, method: str) -> Iterator[None]:
        """Count and time the call inside as one ``method``, by the gRPC status it ends with
        (``CANCELLED`` when cancelled; any other exception as :func:`nsm.errors.status_of`
        maps it)."""
        started, code = time.perf_counter(), "OK"
        try:
            yield
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception as exc:
            code = status_of(exc)[0].name
            raise
        finally:
            self.observe(method, code, time.perf_counter() - started)

    def observe(self, method: str, code: str, seconds: float) -> None:
        """One call served (a Request, a Close, a registry call): how it ended (a gRPC status
        code name) and its time."""
        self._requests.labels(method, code).inc()
        self._duration.labels(method).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """The text exposition of every metric, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# --- serving ------------------------------------------------------------------------------------


def _listen_url(text: str) -> str:
    try:
        return str(parse_url(text.strip()))
    except InvalidArgument as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def _scraper(text: str) -> str:
    try:
        return str(parse_id(text.strip()))
    except InvalidArgument as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def reader_id(trust_domain: str) -> str:
    """The SPIFFE ID of ``nsm metrics``, which every daemon lets read its metrics."""
    return f"spiffe://{trust_domain}/nsm/metrics"


def add_metrics_flags(parser: argparse.ArgumentParser) -> None:
    """``--metrics-listen`` and ``--metrics-scrapers`` (``NSM_METRICS_LISTEN``,
    ``NSM_METRICS_SCRAPERS``)."""
    flag(parser, "--metrics-listen", type=_listen_url, default=None,
         help=f"serve Prometheus metrics at {METRICS_PATH} on this URL, tcp://host:port or "
              f"unix:///path (HTTPS with the daemon's SVID; HTTP when --insecure); off if unset")
    flag(parser, "--metrics-scrapers", many=True, default=[], type=_scraper,
         help="SPIFFE IDs that may read the metrics (besides --observers)")


@contextlib.asynccontextmanager
async def serving_metrics(args: argparse.Namespace | None, metrics: Metrics,
                          security: Security) -> AsyncIterator[HttpListener | None]:
    """While entered, serve ``metrics`` on ``args.metrics_listen`` (nothing when unset) to the
    IDs of ``--metrics-scrapers`` and ``--observers``, the daemon's own and ``nsm metrics``'s
    (:func:`reader_id`)."""
    url = getattr(args, "metrics_listen", None)
    if not url:
        yield None
        return
    readers = frozenset(getattr(args, "metrics_scrapers", None) or ()) | \
        frozenset(getattr(args, "observers", None) or ())
    if security.enabled:  # `nsm metrics` (the daemon's own ID is let in too: metrics_listener)
        readers |= {reader_id(security.trust_domain)}
    listener = metrics_listener(url, metrics, security, readers)
    await listener.start()
    log.info("metrics serving", url=f"{listener.url}{METRICS_PATH}",
             scrapers=",".join(sorted(readers)) if security.enabled else "anyone (insecure)")
    try:
        yield listener
    finally:
        await listener.stop()


def metrics_listener(url: str, metrics: Metrics, security: Security,
                     readers: Iterable[str]) -> HttpListener:
    """The listener of ``metrics`` on ``url``, readable by the SPIFFE IDs ``readers`` and by
    the daemon's own (``security``'s, looked at when asked: it may not be known before the
    daemon's first SVID)."""
    allowed = frozenset(readers)

    def may_read(sid: SpiffeId) -> bool:
        return str(sid) in allowed or str(sid) == security.id

    return HttpListener(url, {METRICS_PATH: metrics.render}, security=security, allowed=may_read)


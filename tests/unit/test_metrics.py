"""A daemon's metrics (nsm.metrics): what they say, the chain's first element that counts
Requests and Closes, and the HTTP listener they are served on (nsm.transport.HttpListener)
against bad input: a malformed request, another method or path, an oversized head, a slow
client, too many connections, a route that fails, a bad or busy URL. Plain HTTP here (the
listener is the same with TLS; who may read is tests/security/test_metrics_access.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from nsm import transport
from nsm.api.connection_pb2 import Connection
from nsm.api.networkservice_pb2 import NetworkServiceRequest
from nsm.chain import Chain, Ctx, Element, NextClose, NextRequest
from nsm.elements.metrics import Measured
from nsm.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from nsm.metrics import METRICS_PATH, Metrics, metrics_listener
from nsm.security.tls import Security
from nsm.transport import HttpListener, http_get

pytestmark = pytest.mark.timeout(30)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``{(sample name, sorted labels): value}`` of a text exposition."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


# -- what the metrics say ------------------------------------------------------------------------


def test_metrics_say_which_daemon_what_it_holds_and_how_its_calls_ended() -> None:
    held = {"connections": 3, "timers": 2}
    metrics = Metrics("manager", "node1", status=lambda: held)
    metrics.observe("Request", "OK", 0.004)
    metrics.observe("Request", "OK", 0.02)
    metrics.observe("Request", "NOT_FOUND", 0.001)
    metrics.observe("Close", "OK", 0.002)
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    got = samples(body.decode())
    assert got[("nsm_info", (("name", "node1"), ("role", "manager")))] == 1
    assert got[("nsm_held", (("what", "connections"),))] == 3
    assert got[("nsm_held", (("what", "timers"),))] == 2
    assert got[("nsm_requests_total", (("code", "OK"), ("method", "Request")))] == 2
    assert got[("nsm_requests_total", (("code", "NOT_FOUND"), ("method", "Request")))] == 1
    assert got[("nsm_requests_total", (("code", "OK"), ("method", "Close")))] == 1
    assert got[("nsm_request_duration_seconds_count", (("method", "Request"),))] == 3
    assert got[("nsm_request_duration_seconds_bucket", (("le", "0.005"), ("method", "Request")))] == 2
    held["connections"] = 0  # read when scraped, not when made
    assert samples(metrics.render()[0].decode())[("nsm_held", (("what", "connections"),))] == 0


def test_a_failing_status_does_not_fail_the_scrape() -> None:
    def broken() -> dict[str, int]:
        raise RuntimeError("boom")

    got = samples(Metrics("registry", status=broken).render()[0].decode())
    assert got[("nsm_info", (("name", ""), ("role", "registry")))] == 1
    assert not [k for k in got if k[0] == "nsm_held"]


def test_two_daemons_in_one_process_count_apart() -> None:
    """Each has its own registry of metrics (not prometheus_client's global one)."""
    one, other = Metrics("forwarder", "a"), Metrics("forwarder", "b")
    one.observe("Request", "OK", 0.001)
    counted = samples(one.render()[0].decode())
    assert ("nsm_requests_total", (("code", "OK"), ("method", "Request"))) in counted
    assert not [k for k in samples(other.render()[0].decode()) if k[0] == "nsm_requests_total"]


class _Fails(Element):
    def __init__(self) -> None:
        self.error: BaseException | None = None

    async def request(self, ctx: Ctx, request: NetworkServiceRequest, next: NextRequest) -> Connection:
        if self.error is not None:
            raise self.error
        return await next(ctx, request)

    async def close(self, ctx: Ctx, conn: Connection, next: NextClose) -> None:
        if self.error is not None:
            raise self.error
        await next(ctx, conn)


async def test_the_first_element_counts_every_request_and_close_by_how_it_ended() -> None:
    metrics = Metrics("endpoint", "nse")
    fails = _Fails()
    chain = Chain([Measured(metrics), fails])
    request = NetworkServiceRequest(connection=Connection(id="c1", network_service="svc"))
    await chain.request(request)
    fails.error = PermissionDenied("no")
    with pytest.raises(PermissionDenied):
        await chain.request(request)
    fails.error = NotFound("gone")
    with pytest.raises(NotFound):
        await chain.close(request.connection)
    fails.error = RuntimeError("a bug")
    with pytest.raises(RuntimeError):
        await chain.request(request)
    fails.error = asyncio.CancelledError()
    with pytest.raises(asyncio.CancelledError):
        await chain.request(request)
    got = samples(metrics.render()[0].decode())
    count = {(dict(k[1])["method"], dict(k[1])["code"]): v for k, v in got.items()
             if k[0] == "nsm_requests_total"}
    assert count == {("Request", "OK"): 1, ("Request", "PERMISSION_DENIED"): 1,
                     ("Close", "NOT_FOUND"): 1, ("Request", "INTERNAL"): 1,
                     ("Request", "CANCELLED"): 1}


# -- the HTTP listener ---------------------------------------------------------------------------


@pytest.fixture
async def listener(tmp_path: Path) -> AsyncIterator[HttpListener]:
    metrics = Metrics("manager", "node1", status=lambda: {"connections": 1})
    served = metrics_listener(f"unix://{tmp_path}/m.sock", metrics, Security.insecure(), ())
    await served.start()
    try:
        yield served
    finally:
        await served.stop()


async def raw(listener: HttpListener, data: bytes, *, read: bool = True) -> bytes:
    """Send ``data`` on a new connection; what came back before the listener closed it."""
    reader, writer = await asyncio.open_unix_connection(listener.url.path)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10) if read else b""
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


async def test_get_metrics_over_plain_http_when_insecure(listener: HttpListener) -> None:
    status, body = await http_get(listener.url, METRICS_PATH)
    assert status == 200
    assert samples(body.decode())[("nsm_held", (("what", "connections"),))] == 1
    answer = await raw(listener, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n")
    assert status_of(answer) == 200 and b"\r\nConnection: close\r\n" in answer
    head = await raw(listener, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status_of(head) == 200 and head.endswith(b"\r\n\r\n")  # no body


@pytest.mark.parametrize(("request_bytes", "status"), [
    (b"garbage\r\n\r\n", 400),
    (b"GET /metrics\r\n\r\n", 400),
    (b"\xff\xfe /metrics HTTP/1.1\r\n\r\n", 400),
    (b"POST /metrics HTTP/1.1\r\n\r\n", 405),
    (b"GET /other HTTP/1.1\r\n\r\n", 404),
    (b"GET /metrics HTTP/2.0\r\n\r\n", 505),
    (b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n", 431),
], ids=["garbage", "no-version", "not-ascii", "post", "other-path", "http2", "oversized"])
async def test_bad_requests_get_a_clear_status(listener: HttpListener, request_bytes: bytes,
                                               status: int) -> None:
    answer = await raw(listener, request_bytes)
    assert status_of(answer) == status, answer[:200]
    # and the listener goes on serving
    assert (await http_get(listener.url, METRICS_PATH))[0] == 200


async def test_a_client_that_sends_nothing_is_dropped(listener: HttpListener,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport, "HTTP_READ_TIMEOUT", 0.2)
    reader, writer = await asyncio.open_unix_connection(listener.url.path)
    try:
        writer.write(b"GET /metr")  # and nothing more
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, unanswered
    finally:
        writer.close()
    assert (await http_get(listener.url, METRICS_PATH))[0] == 200


async def test_one_connection_too_many_is_closed_unanswered(listener: HttpListener) -> None:
    held = []
    try:
        for _ in range(transport.MAX_HTTP_CONNECTIONS):
            held.append(await asyncio.open_unix_connection(listener.url.path))
        for _ in range(100):  # every one accepted and waiting for its request
            if len(listener._serving) == transport.MAX_HTTP_CONNECTIONS:
                break
            await asyncio.sleep(0.02)
        with contextlib.suppress(ConnectionError):
            assert await raw(listener, b"GET /metrics HTTP/1.1\r\n\r\n") == b""
    finally:
        for _, writer in held:
            writer.close()
    for _ in range(100):
        if not listener._serving:
            break
        await asyncio.sleep(0.02)
    assert (await http_get(listener.url, METRICS_PATH))[0] == 200


async def test_a_route_that_fails_is_500_and_the_listener_goes_on(tmp_path: Path) -> None:
    calls = []

    def route() -> tuple[bytes, str]:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return b"ok\n", "text/plain"

    served = HttpListener(f"unix://{tmp_path}/r.sock", {"/r": route}, security=Security.insecure(),
                          allowed=lambda sid: True)
    await served.start()
    try:
        assert await http_get(served.url, "/r") == (500, b"could not answer\n")
        assert await http_get(served.url, "/r") == (200, b"ok\n")
    finally:
        await served.stop()


async def test_stop_removes_the_socket_and_its_directory(tmp_path: Path) -> None:
    path = tmp_path / "made" / "m.sock"
    served = metrics_listener(f"unix://{path}", Metrics("registry"), Security.insecure(), ())
    await served.start()
    assert path.exists()
    await served.stop()
    assert not path.exists() and not path.parent.exists()
    await served.stop()  # idempotent


async def test_a_tcp_port_in_use_is_failed_precondition() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        served = metrics_listener(f"tcp://127.0.0.1:{port}", Metrics("registry"), Security.insecure(), ())
        with pytest.raises(FailedPrecondition, match=r"cannot listen on tcp://127\.0\.0\.1"):
            await served.start()
    served = metrics_listener("tcp://127.0.0.1:0", Metrics("registry"), Security.insecure(), ())
    await served.start()
    try:
        assert served.url.port != 0
        assert (await http_get(served.url, METRICS_PATH))[0] == 200
    finally:
        await served.stop()


def test_a_bad_url_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgument, match="unsupported URL"):
        metrics_listener("http://x:1", Metrics("registry"), Security.insecure(), ())


def _nsm(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nsm.cli", *args], capture_output=True, text=True,
                          timeout=20, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("command", [
    ["manager", "--name", "n1", "--listen", "unix:///tmp/x.sock", "--registry", "unix:///tmp/r.sock"],
    ["forwarder", "--name", "f1", "--listen", "unix:///tmp/x.sock", "--manager", "unix:///tmp/m.sock"],
    ["registry"],
    ["nse", "--name", "e1", "--service", "s", "--cidr", "10.0.0.0/24", "--listen",
     "unix:///tmp/x.sock", "--registry", "unix:///tmp/r.sock"],
    ["cni-agent", "--manager", "unix:///tmp/m.sock"],
], ids=["manager", "forwarder", "registry", "nse", "cni-agent"])
@pytest.mark.parametrize("how", ["flag", "env"])
def test_every_daemon_refuses_a_bad_metrics_url_before_starting(command: list[str], how: str) -> None:
    """``--metrics-listen`` and ``NSM_METRICS_LISTEN`` on every daemon; a bad URL or SPIFFE ID
    is a usage error naming it (exit 2), before anything is started."""
    if how == "flag":
        done = _nsm(*command, "--metrics-listen", "http://0.0.0.0:9090")
    else:
        done = _nsm(*command, env={"NSM_METRICS_LISTEN": "http://0.0.0.0:9090"})
    assert done.returncode == 2, done.stderr
    assert "unsupported URL 'http://0.0.0.0:9090'" in done.stderr
    done = _nsm(*command, "--metrics-scrapers", "prometheus")
    assert done.returncode == 2 and "metrics-scrapers" in done.stderr, done.stderr



def test_nsm_metrics_bad_input_and_an_absent_daemon(tmp_path: Path) -> None:
    env = {"NSM_INSECURE": "1", "NSM_METRICS_LISTEN": ""}
    done = _nsm("metrics", env=env)
    assert done.returncode == 2 and "--url (or NSM_METRICS_LISTEN) is required" in done.stderr
    done = _nsm("metrics", "--url", "http://x:1", env=env)
    assert done.returncode == 2 and "unsupported URL" in done.stderr
    done = _nsm("metrics", "--url", f"unix://{tmp_path}/none.sock", env=env)
    assert done.returncode == 1 and "GET unix://" in done.stderr and done.stdout == ""


async def test_nsm_metrics_prints_what_an_insecure_daemon_serves(listener: HttpListener) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nsm.cli", "metrics", "--insecure",
        env={**os.environ, "NSM_METRICS_LISTEN": str(listener.url)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err.decode()
    assert samples(out.decode())[("nsm_held", (("what", "connections"),))] == 1

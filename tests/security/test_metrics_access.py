"""Who may read a daemon's metrics: with security on, the listener is HTTPS with the daemon's
SVID; a reader listed in ``--metrics-scrapers`` (or ``--observers``) gets them, another SVID of
the trust domain 403; a certificate of our CA with another trust domain's ID or none 403; a
client with no certificate, an expired one or one of another authority fails the handshake; a
rotation of the daemon's SVID applies to the next handshake."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from security_ids import MGR1, NSC, TD  # type: ignore[import-not-found]
from tls_probe import StaticSource, presented_serial, refused_identities  # type: ignore[import-not-found]

from nsm.errors import Unavailable
from nsm.metrics import METRICS_PATH, Metrics, metrics_listener
from nsm.security.ca import CertificateAuthority
from nsm.security.ids import workload_id
from nsm.security.tls import Security
from nsm.transport import HttpListener, http_get

pytestmark = pytest.mark.timeout(30)

SCRAPER = workload_id(TD, "prometheus")
OBSERVER = workload_id(TD, "operator")


@pytest.fixture
async def served(identity: Any, tmp_path: Path) -> AsyncIterator[tuple[HttpListener, Security]]:
    manager = await identity(MGR1, ttl=3.0)
    metrics = Metrics("manager", "node1", status=lambda: {"connections": 2})
    listener = metrics_listener(f"unix://{tmp_path}/metrics.sock", metrics, manager,
                                (SCRAPER, OBSERVER))
    await listener.start()
    try:
        yield listener, manager
    finally:
        await listener.stop()


async def test_a_listed_reader_gets_the_metrics_over_https(served: Any, identity: Any) -> None:
    """The scrapers and observers given, and the daemon's own ID (the daemon is MGR1)."""
    listener, _ = served
    for reader in (SCRAPER, OBSERVER, MGR1):
        status, body = await http_get(listener.url, METRICS_PATH, await identity(reader))
        assert status == 200, body
        assert b'nsm_held{what="connections"} 2.0' in body


async def test_another_svid_of_the_trust_domain_is_forbidden(served: Any, identity: Any) -> None:
    listener, _ = served
    status, body = await http_get(listener.url, METRICS_PATH, await identity(NSC))
    assert status == 403
    assert body == f"{NSC} may not read this\n".encode()
    assert b"nsm_" not in body


#: How the metrics listener refuses each of :func:`tls_probe.refused_identities`: at the
#: handshake (the certificate does not chain to the bundle, or has expired) or, for a
#: certificate our CA signed whose ID is not of the trust domain (or that has none), 403.
REFUSAL = {"another trust domain's CA": "handshake", "another CA of the same name": "handshake",
           "our CA, another trust domain's ID": 403, "our CA, no SPIFFE ID": 403,
           "expired": "handshake"}


async def test_plaintext_foreign_forged_and_expired_readers_get_nothing(
        served: Any, identity: Any, ca: CertificateAuthority) -> None:
    listener, _ = served
    with pytest.raises(Unavailable):  # plain HTTP to the HTTPS listener
        await http_get(listener.url, METRICS_PATH)
    made = []
    try:
        for what, svid in refused_identities(ca).items():
            reader = Security(StaticSource(svid), trust_domain=TD)
            await reader.start()
            made.append(reader)
            if REFUSAL[what] == "handshake":
                with pytest.raises(Unavailable):
                    await http_get(listener.url, METRICS_PATH, reader)
            else:
                status, body = await http_get(listener.url, METRICS_PATH, reader)
                assert status == 403 and b"nsm_" not in body, (what, body)
    finally:
        for reader in made:
            await reader.close()
    # TLS without a client certificate
    context = ssl.create_default_context(cadata=(await identity(SCRAPER)).svid.bundle_pem.decode())
    context.check_hostname = False
    try:
        reader_, writer = await asyncio.open_unix_connection(listener.url.path, ssl=context,
                                                             server_hostname=TD)
    except (ssl.SSLError, ConnectionError):
        pass  # refused in the handshake (TLS 1.2)
    else:  # TLS 1.3: the client's handshake ends first; the refusal comes with the first read
        try:
            writer.write(f"GET {METRICS_PATH} HTTP/1.1\r\n\r\n".encode())
            with contextlib.suppress(ssl.SSLError, ConnectionError):
                assert await asyncio.wait_for(reader_.read(), 10) == b""
        finally:
            writer.close()
    # and the listener goes on serving its readers
    assert (await http_get(listener.url, METRICS_PATH, await identity(SCRAPER)))[0] == 200


async def test_a_rotation_of_the_daemons_svid_applies_to_the_next_handshake(served: Any,
                                                                            identity: Any) -> None:
    listener, manager = served
    scraper = await identity(SCRAPER)
    first = manager.svid.chain[0].serial_number
    url = str(listener.url)
    assert await presented_serial(url, scraper.svid) == first
    for _ in range(60):  # the manager's SVIDs live 3 s, renewed at half
        if manager.svid.chain[0].serial_number != first:
            break
        await asyncio.sleep(0.1)
    rotated = manager.svid.chain[0].serial_number
    assert rotated != first
    assert await presented_serial(url, scraper.svid) == rotated
    assert (await http_get(listener.url, METRICS_PATH, scraper))[0] == 200

"""Fixtures of the security tests: one in-memory CA (trust domain ``nsm.lab``), identities
issued by it as started :class:`~nsm.security.tls.Security` objects (closed at the end of the
test), and the mesh's SPIFFE IDs. Every test has a timeout and leaves no task behind."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from security_ids import TD  # type: ignore[import-not-found]

from nsm.lab import harness
from nsm.security.ca import DEFAULT_SVID_TTL, CertificateAuthority
from nsm.security.sources import CaSource
from nsm.security.tls import Security

MakeIdentity = Callable[..., Awaitable[Security]]


@pytest.fixture(autouse=True)
async def _no_leaked_tasks() -> AsyncIterator[None]:
    async with harness.no_leaked_tasks():
        yield


@pytest.fixture(scope="session")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create(TD)


@pytest.fixture
async def identity(ca: CertificateAuthority) -> AsyncIterator[MakeIdentity]:
    """``await identity(spiffe_id, ca=..., trust_domain=..., ttl=...)``: a started Security of
    that ID (its SVIDs live ``ttl`` seconds, renewed at half)."""
    made: list[Security] = []

    async def make(spiffe_id: str, *, authority: CertificateAuthority | None = None,
                   trust_domain: str = TD, ttl: float = DEFAULT_SVID_TTL) -> Security:
        source = CaSource(authority or ca, spiffe_id, trust_domain=trust_domain, dns_names=(TD,),
                          ttl=ttl)
        security = Security(source, trust_domain=trust_domain, server_name=TD)
        await security.start()
        made.append(security)
        return security

    yield make
    for security in made:
        await security.close()

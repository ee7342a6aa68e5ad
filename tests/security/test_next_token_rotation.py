"""``next_token_signed`` across a rotation of the next hop: a token it minted with its key of a
moment ago (it rotated between signing and proving who it is) is its own; a key it never proved
is not."""

from __future__ import annotations

from typing import Any

import pytest

from nsm.api.connection_pb2 import Connection
from nsm.elements.tokens import HopTokens
from nsm.errors import PermissionDenied
from nsm.security.ca import CertificateAuthority
from nsm.security.policy import Policies
from nsm.security.sources import CaSource
from nsm.security.tls import Security
from nsm.security.tokens import mint

TD = "nsm.lab"
HOP = "spiffe://nsm.lab/nsm/node/node1/manager"
ME = "spiffe://nsm.lab/ns/default/pod/client"
URL = "unix:///run/nsm/nsm.sock"


class _Channels:
    """What HopTokens asks of Channels: the peer's proofs, newest first."""

    def __init__(self, security: Security, proofs: list[tuple[Any, Any]]) -> None:
        self.security = security
        self._proofs = proofs

    async def peer(self, url: str, *, again: bool = False) -> tuple[Any, Any]:
        return self._proofs[0]

    def proven(self, url: str) -> list[tuple[Any, Any]]:
        return list(self._proofs)


def _answer(token: str) -> Connection:
    conn = Connection(id="c")
    conn.path.path_segments.add(name="client", id="c")
    conn.path.path_segments.add(name="node1", id="m", token=token)
    return conn


@pytest.fixture
async def me() -> Any:
    ca = CertificateAuthority.create(TD)
    security = Security(CaSource(ca, ME, trust_domain=TD, dns_names=(TD,)), trust_domain=TD)
    await security.start()
    yield ca, security
    await security.close()


async def test_a_token_signed_with_the_key_before_the_last_rotation_is_accepted(me: Any) -> None:
    ca, security = me
    old, new = ca.issue(HOP, dns_names=(TD,)), ca.issue(HOP, dns_names=(TD,))
    token = mint(old, ME, expires=2**31).text
    proofs = [(new.spiffe_id, new.chain[0]), (old.spiffe_id, old.chain[0])]
    await HopTokens(_Channels(security, proofs), Policies()).check(URL, _answer(token), 0)


async def test_a_key_the_hop_never_proved_is_refused(me: Any) -> None:
    ca, security = me
    other, new = ca.issue(HOP, dns_names=(TD,)), ca.issue(HOP, dns_names=(TD,))
    token = mint(other, ME, expires=2**31).text
    with pytest.raises(PermissionDenied, match="next_token_signed"):
        await HopTokens(_Channels(security, [(new.spiffe_id, new.chain[0])]), Policies()).check(
            URL, _answer(token), 0)


async def test_another_identitys_old_certificate_does_not_count(me: Any) -> None:
    ca, security = me
    new = ca.issue(HOP, dns_names=(TD,))
    stranger = ca.issue("spiffe://nsm.lab/ns/default/pod/stranger", dns_names=(TD,))
    token = mint(stranger, ME, expires=2**31).text
    proofs = [(new.spiffe_id, new.chain[0]), (stranger.spiffe_id, stranger.chain[0])]
    with pytest.raises(PermissionDenied):
        await HopTokens(_Channels(security, proofs), Policies()).check(URL, _answer(token), 0)

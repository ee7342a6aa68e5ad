"""Path tokens and the token policies as functions (no gRPC): minting, verification, and each
policy refusing what it must (expired, forged, replayed by another identity, unchained)."""

from __future__ import annotations

import argparse
import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from security_ids import EVIL, FWD1, MGR1, NSC, NSE, TD  # type: ignore[import-not-found]

from nsm.errors import PermissionDenied
from nsm.security.ca import CertificateAuthority
from nsm.security.ids import parse_id
from nsm.security.policy import Policies, add_policy_flags, check_next_token, check_tokens, policies_from_args
from nsm.security.tokens import EXPIRES_HEADER, TOKEN_HEADER, claims_of, mint, verify

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
def svids(ca: CertificateAuthority) -> dict[str, object]:
    return {sid: ca.issue(sid, dns_names=(TD,)) for sid in (NSC, MGR1, FWD1, NSE, EVIL)}


def test_mint_and_verify(svids) -> None:  # type: ignore[no-untyped-def]
    nsc = svids[NSC]
    token = mint(nsc, MGR1, expires=time.time() + 30)
    claims = verify(token.text, nsc.chain[0])
    assert claims.sub == NSC and claims.aud == (MGR1,)
    assert time.time() + 28 <= claims.exp <= time.time() + 30 and claims.iat is not None
    assert claims_of(token.text) == claims
    header = jwt.get_unverified_header(token.text)
    assert header["alg"] == "ES256"
    (k1, v1), (k2, v2) = token.metadata()
    assert (k1, k2) == (TOKEN_HEADER, EXPIRES_HEADER) and v1 == token.text
    assert v2.endswith("Z") and "T" in v2


def test_token_lifetime_never_beyond_the_svid(ca: CertificateAuthority) -> None:
    short = ca.issue(NSC, ttl=60, dns_names=(TD,))
    token = mint(short, MGR1, expires=time.time() + 3600)
    assert token.expires <= short.expires.timestamp()


def test_forged_token_does_not_verify(svids) -> None:  # type: ignore[no-untyped-def]
    other = ec.generate_private_key(ec.SECP256R1())
    forged = jwt.encode({"sub": NSC, "aud": [MGR1], "exp": int(time.time()) + 30}, other,
                        algorithm="ES256")
    claims_of(forged)  # well-formed ...
    with pytest.raises(PermissionDenied, match="signature"):
        verify(forged, svids[NSC].chain[0])  # ... but not the victim's signature


@pytest.mark.parametrize("payload", [
    {"aud": [MGR1], "exp": 2**31},  # no sub
    {"sub": NSC, "exp": 2**31},  # no aud
    {"sub": NSC, "aud": [MGR1]},  # no exp
    {"sub": NSC, "aud": [MGR1], "exp": "1.5"},  # not a NumericDate
])
def test_malformed_tokens(svids, payload) -> None:  # type: ignore[no-untyped-def]
    text = jwt.encode(payload, svids[NSC].key, algorithm="ES256")
    with pytest.raises(PermissionDenied):
        claims_of(text)


def test_other_algorithms_and_garbage_refused(svids) -> None:  # type: ignore[no-untyped-def]
    hs = jwt.encode({"sub": NSC, "aud": [MGR1], "exp": 2**31}, "s" * 32, algorithm="HS256")
    for bad in (hs, "", "x.y.z", "a" * 10_000):
        with pytest.raises(PermissionDenied):
            claims_of(bad)
        with pytest.raises(PermissionDenied):
            verify(bad, svids[NSC].chain[0])


def chain_tokens(svids, *, exp: float | None = None) -> list[str]:  # type: ignore[no-untyped-def]
    """nsc → mgr → fwd, each for the next (the forwarder's for the endpoint)."""
    expires = time.time() + 30 if exp is None else exp
    return [mint(svids[NSC], MGR1, expires=expires).text,
            mint(svids[MGR1], FWD1, expires=expires).text,
            mint(svids[FWD1], NSE, expires=expires).text]


def check(svids, tokens, *, caller=FWD1, policies=Policies()):  # type: ignore[no-untyped-def]
    return check_tokens(policies, tokens, own_id=NSE, peer=parse_id(caller),
                        peer_cert=svids[caller].chain[0])


def test_a_good_path_passes(svids) -> None:  # type: ignore[no-untyped-def]
    claims = check(svids, chain_tokens(svids))
    assert [c.sub for c in claims] == [NSC, MGR1, FWD1]


def test_expired(svids) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PermissionDenied, match="tokens_expired") as info:
        check(svids, chain_tokens(svids, exp=time.time() - 5))
    assert info.value.reason == "TOKENS_EXPIRED"
    check(svids, chain_tokens(svids, exp=time.time() - 5), policies=Policies(tokens_expired=False))


def test_replayed_by_another_identity(svids) -> None:  # type: ignore[no-untyped-def]
    """The forwarder's tokens, stolen and sent by another identity over its own TLS."""
    with pytest.raises(PermissionDenied, match="prev_token_signed"):
        check(svids, chain_tokens(svids), caller=EVIL)


def test_forged_with_the_victims_sub(svids) -> None:  # type: ignore[no-untyped-def]
    tokens = chain_tokens(svids)
    tokens[-1] = jwt.encode({"sub": FWD1, "aud": [NSE], "exp": int(time.time()) + 30},
                            svids[EVIL].key, algorithm="ES256")
    with pytest.raises(PermissionDenied, match="prev_token_signed"):
        check(svids, tokens, caller=EVIL)
    with pytest.raises(PermissionDenied, match="prev_token_signed"):
        check(svids, tokens, caller=FWD1)  # not FWD1's signature either


def test_unchained(svids) -> None:  # type: ignore[no-untyped-def]
    tokens = chain_tokens(svids)
    tokens[0] = mint(svids[NSC], EVIL, expires=time.time() + 30).text  # not for the manager
    with pytest.raises(PermissionDenied, match="tokens_chained"):
        check(svids, tokens)
    tokens = chain_tokens(svids)
    tokens[-1] = mint(svids[FWD1], EVIL, expires=time.time() + 30).text  # not for this hop
    with pytest.raises(PermissionDenied, match=r"tokens_chained.*this hop"):
        check(svids, tokens)
    check(svids, tokens, policies=Policies(tokens_chained=False))


def test_invalid_and_missing(svids) -> None:  # type: ignore[no-untyped-def]
    tokens = chain_tokens(svids)
    tokens[1] = "garbage"
    with pytest.raises(PermissionDenied, match="tokens_valid: path segment 1"):
        check(svids, tokens)
    with pytest.raises(PermissionDenied, match="tokens_valid: the caller sent no token"):
        check(svids, [])
    assert check(svids, tokens, policies=Policies(tokens_valid=False))[1] is None


def test_next_token_signed(svids) -> None:  # type: ignore[no-untyped-def]
    nse_token = mint(svids[NSE], FWD1, expires=time.time() + 30).text
    check_next_token(Policies(), nse_token, next_id=parse_id(NSE), next_cert=svids[NSE].chain[0])
    with pytest.raises(PermissionDenied, match="next_token_signed"):
        check_next_token(Policies(), nse_token, next_id=parse_id(EVIL), next_cert=svids[EVIL].chain[0])
    evil_token = mint(svids[EVIL], FWD1, expires=time.time() + 30).text
    with pytest.raises(PermissionDenied, match=r"next_token_signed.*not of"):
        check_next_token(Policies(), evil_token, next_id=parse_id(NSE), next_cert=svids[EVIL].chain[0])


def test_policy_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NSM_POLICY_TOKENS_CHAINED", "false")
    monkeypatch.setenv("NSM_OBSERVERS", f"{EVIL},{NSC}")
    parser = argparse.ArgumentParser()
    add_policy_flags(parser)
    policies = policies_from_args(parser.parse_args(["--no-policy-monitor-owner"]))
    assert policies.off() == ["tokens_chained", "monitor_owner"]
    assert policies.observers == {EVIL, NSC}
    assert policies_from_args(parser.parse_args(["--policy-tokens-chained"])).tokens_chained
    with pytest.raises(SystemExit):
        parser.parse_args(["--observers", "not-an-id"])


def test_tokens_interoperate_with_pyjwt(svids) -> None:  # type: ignore[no-untyped-def]
    """Minted and verified with cryptography directly: PyJWT reads ours, we read PyJWT's."""
    nsc = svids[NSC]
    ours = mint(nsc, (MGR1, FWD1), expires=time.time() + 30)
    decoded = jwt.decode(ours.text, nsc.chain[0].public_key(), algorithms=["ES256"],
                         options={"verify_aud": False})
    assert decoded["sub"] == NSC and decoded["aud"] == [MGR1, FWD1] and decoded["exp"] == ours.expires
    theirs = jwt.encode({"sub": NSC, "aud": [MGR1], "exp": 2**31, "iat": 1}, nsc.key, algorithm="ES256")
    assert verify(theirs, nsc.chain[0]) == claims_of(theirs)


def test_tampered_tokens_do_not_verify(svids) -> None:  # type: ignore[no-untyped-def]
    nsc = svids[NSC]
    header, payload, signature = mint(nsc, MGR1, expires=time.time() + 30).text.split(".")
    other = mint(nsc, EVIL, expires=time.time() + 30).text.split(".")[1]
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
    b64_header = jwt.encode({"sub": NSC, "aud": [MGR1], "exp": 2**31}, nsc.key, algorithm="ES256",
                            headers={"crit": ["x"], "x": 1})
    for bad in (f"{header}.{other}.{signature}",  # another payload under the same signature
                f"{header}.{payload}.{signature[:-4]}",  # a signature too short
                f"{header}.{payload}.{signature}AAAA",  # too long
                f"{header}.{payload}.{signature[:-2]}!!",  # not base64url
                b64_header):
        with pytest.raises(PermissionDenied):
            verify(bad, nsc.chain[0])
    with pytest.raises(PermissionDenied, match="P-256"):
        verify(f"{header}.{payload}.{signature}", p384)

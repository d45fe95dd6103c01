"""JWT verification (api/auth_jwt.py) with keys made here: what is accepted and refused,
the JWKS file's rotation, and the URL source's refresh (httpx's MockTransport stands in for
the identity provider: no server, no network) with its rate-limited unknown-kid refetch."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from metald.api.auth import TokenAuthenticator, TokenRefused
from metald.api.auth_jwt import JwksError, JwksFile, JwksUrl, JwtTokens, parse_jwks
from metald.core.identity import Role

ISS, AUD = "https://idp.unit", "metald"


class Key:
    def __init__(self, alg: str, kid: str) -> None:
        self.alg, self.kid = alg, kid
        if alg == "RS256":
            self.private: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            jwk = jwt.algorithms.RSAAlgorithm.to_jwk(self.private.public_key())
        elif alg == "ES256":
            self.private = ec.generate_private_key(ec.SECP256R1())
            jwk = jwt.algorithms.ECAlgorithm.to_jwk(self.private.public_key())
        else:
            self.private = ed25519.Ed25519PrivateKey.generate()
            jwk = jwt.algorithms.OKPAlgorithm.to_jwk(self.private.public_key())
        self.jwk = {**json.loads(jwk), "kid": kid}

    def token(self, **claims: Any) -> str:
        now = int(time.time())
        body = {"iss": ISS, "aud": AUD, "sub": "acme", "exp": now + 300, **claims}
        body = {k: v for k, v in body.items() if v is not None}
        return jwt.encode(body, self.private, algorithm=self.alg, headers={"kid": self.kid})


def doc(*keys: Key, extra: list[dict[str, Any]] | None = None) -> bytes:
    return json.dumps({"keys": [k.jwk for k in keys] + (extra or [])}).encode()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.fixture(scope="module")
def rs() -> Key:
    return Key("RS256", "rs")


@pytest.fixture(scope="module")
def es() -> Key:
    return Key("ES256", "es")


@pytest.fixture(scope="module")
def ed() -> Key:
    return Key("EdDSA", "ed")


def chain(path: Path, **options: Any) -> TokenAuthenticator:
    tokens = JwtTokens(JwksFile(path), issuer=ISS, audience=AUD, leeway_seconds=5, **options)
    return TokenAuthenticator(dev_tokens=True, more=[tokens])


async def refused(auth: TokenAuthenticator, token: str) -> TokenRefused:
    with pytest.raises(TokenRefused) as caught:
        await auth.caller_for(f"Bearer {token}")
    return caught.value


async def test_good_tokens_of_each_algorithm(tmp_path: Path, rs: Key, es: Key, ed: Key) -> None:
    (tmp_path / "jwks").write_bytes(doc(rs, es, ed))
    auth = chain(tmp_path / "jwks")
    for key in (rs, es, ed):
        caller = await auth.caller_for(f"Bearer {key.token()}")
        assert (caller.actor, caller.role, caller.customer_id) == (
            f"jwt:{ISS}#acme",
            Role.CUSTOMER,
            "acme",
        )
    op = await auth.caller_for(f"Bearer {rs.token(sub='alice@ops', role='operator')}")
    assert op.role is Role.OPERATOR and op.customer_id is None  # sub is no customer id
    assert (await auth.caller_for("Bearer dev_customer_x")).customer_id == "x"  # the chain


async def test_claims_from_configured_names(tmp_path: Path, rs: Key) -> None:
    (tmp_path / "jwks").write_bytes(doc(rs))
    auth = chain(tmp_path / "jwks", customer_claim="org", role_claim="metald_role")
    caller = await auth.caller_for(f"Bearer {rs.token(sub='u-1', org='globex')}")
    assert (caller.customer_id, caller.actor) == ("globex", f"jwt:{ISS}#u-1")
    admin = await auth.caller_for(f"Bearer {rs.token(org='globex', metald_role='admin')}")
    assert admin.role is Role.ADMIN
    assert (await refused(auth, rs.token())).reason == "invalid"  # no org claim


async def test_the_refusals(tmp_path: Path, rs: Key, es: Key) -> None:
    (tmp_path / "jwks").write_bytes(doc(rs, es))
    auth = chain(tmp_path / "jwks")
    now = int(time.time())
    good = rs.token()
    head, body, sig = good.split(".")
    claims = {"iss": ISS, "aud": AUD, "sub": "acme", "exp": now + 300}
    none_header = b64(json.dumps({"alg": "none", "kid": "rs"}).encode())
    pem = rs.private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    hs_header = b64(json.dumps({"alg": "HS256", "kid": "rs"}).encode())
    hs_body = b64(json.dumps(claims).encode())
    hs_sig = b64(hmac.new(pem, f"{hs_header}.{hs_body}".encode(), hashlib.sha256).digest())
    other_body = b64(json.dumps({**claims, "sub": "globex"}).encode())
    es_as_rs = b64(json.dumps({"alg": "RS256", "kid": "es"}).encode())  # alg not its key's
    cases = {
        "expired": (rs.token(exp=now - 60), "expired"),
        "within the leeway": None,
        "not yet valid": (rs.token(nbf=now + 120), "invalid"),
        "wrong audience": (rs.token(aud="other"), "invalid"),
        "wrong issuer": (rs.token(iss="https://evil"), "invalid"),
        "tampered signature": (f"{head}.{body}.{sig[:-3]}AAA", "invalid"),
        "tampered claims": (f"{head}.{other_body}.{sig}", "invalid"),
        "alg none": (f"{none_header}.{b64(json.dumps(claims).encode())}.", "invalid"),
        "HS256 with the public key": (f"{hs_header}.{hs_body}.{hs_sig}", "invalid"),
        "alg not the key's": (f"{es_as_rs}.{body}.{sig}", "invalid"),
        "unknown kid": (Key("ES256", "stranger").token(), "invalid"),
        "no exp": (rs.token(exp=None), "invalid"),
        "no sub": (rs.token(sub=None), "invalid"),
        "bad role": (rs.token(role="root"), "invalid"),
        "bad customer": (rs.token(sub="a b"), "invalid"),
        "not json": ("eyJhbGciOi.e30.x", "malformed"),
    }
    for what, case in cases.items():
        if case is None:
            continue
        token, reason = case
        got = await refused(auth, token)
        assert got.reason == reason, what
    # A few seconds past exp is within the leeway (clock skew).
    assert await auth.caller_for(f"Bearer {rs.token(exp=now - 2)}")


def test_symmetric_and_foreign_keys_in_a_jwks_are_ignored(rs: Key) -> None:
    oct_key = {"kty": "oct", "kid": "h", "k": b64(b"secret")}
    enc = {**rs.jwk, "kid": "enc", "use": "enc"}
    keys = parse_jwks(doc(rs, extra=[oct_key, enc, {"kty": "nope"}]))
    assert set(keys) == {"rs"}
    for bad in (b"[]", b"{}", b"not json", json.dumps({"keys": [oct_key]}).encode()):
        with pytest.raises(JwksError):
            parse_jwks(bad)


async def test_the_jwks_file_is_reread_when_it_changes(tmp_path: Path, rs: Key, ed: Key) -> None:
    path = tmp_path / "jwks"
    path.write_bytes(doc(rs))
    auth = chain(path)
    assert await auth.caller_for(f"Bearer {rs.token()}")
    assert (await refused(auth, ed.token())).reason == "invalid"
    path.write_bytes(doc(ed, rs, extra=[{"kty": "RSA", "kid": "pad"}]))
    assert await auth.caller_for(f"Bearer {ed.token()}")
    path.write_bytes(doc(ed))
    assert (await refused(auth, rs.token())).reason == "invalid"
    path.write_bytes(b"garbage, a half-written rotation")  # the keys read before stay
    assert await auth.caller_for(f"Bearer {ed.token()}")


def test_a_bad_jwks_file_at_start_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(JwksError):
        JwksFile(tmp_path / "missing")


class Idp:
    """The identity provider's JWKS endpoint, counting fetches."""

    def __init__(self, document: bytes) -> None:
        self.document = document
        self.fetches = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.fetches += 1
        return httpx.Response(200, content=self.document)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_the_url_source_refetches_once_for_an_unknown_kid(rs: Key, es: Key) -> None:
    idp, clock = Idp(doc(rs)), Clock()
    client = httpx.AsyncClient(transport=httpx.MockTransport(idp))
    source = JwksUrl("https://idp.unit/jwks", 300, clock=clock, client=client)
    await source.start()
    try:
        auth = TokenAuthenticator(
            dev_tokens=False, more=[JwtTokens(source, issuer=ISS, audience=AUD)]
        )
        assert await auth.caller_for(f"Bearer {rs.token()}")
        assert idp.fetches == 1
        idp.document = doc(rs, es)  # rotated at the provider
        clock.now += 1  # too soon for an on-demand refetch
        assert (await refused(auth, es.token())).reason == "invalid"
        assert idp.fetches == 1
        clock.now += 10
        assert await auth.caller_for(f"Bearer {es.token()}")  # refetched, then accepted
        assert idp.fetches == 2
        for _ in range(5):  # a flood of made-up kids: no refetch within the interval
            await refused(auth, Key("ES256", "made-up").token())
        assert idp.fetches == 2  # the last try was just now
        clock.now += 10
        await refused(auth, Key("ES256", "made-up").token())
        assert idp.fetches == 3  # one per interval
    finally:
        await source.close()


async def test_the_url_source_keeps_the_last_good_keys(rs: Key) -> None:
    idp = Idp(doc(rs))
    client = httpx.AsyncClient(transport=httpx.MockTransport(idp))
    source = JwksUrl("https://idp.unit/jwks", 300, clock=Clock(), client=client)
    await source.start()
    try:
        idp.document = b"oops"
        assert not await source._fetch()
        assert set(source.keys()) == {"rs"}
    finally:
        await source.close()

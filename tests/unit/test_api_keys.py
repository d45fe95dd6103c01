"""API keys: the token's shape, the keyed hash, expiry parsing, the SQL store (migration
0008 on a real SQLite file) and the ApiKeyTokens authenticator: a good key, a wrong secret,
an unknown key id, a malformed token, expiry and revocation checked on every call."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from metald.api.auth import ApiKeyTokens, TokenAuthenticator, TokenRefused
from metald.core import apikeys
from metald.core.identity import Role
from metald.store.api_keys import SqlApiKeys
from metald.store.database import Database

PEPPER = b"unit-test-pepper-0123456789"


def test_a_token_has_an_id_and_a_secret_and_only_its_keyed_hash_is_kept() -> None:
    made = apikeys.new_key(PEPPER, customer_id="acme", role=Role.CUSTOMER, now=100.0)
    parsed = apikeys.parse(made.token)
    assert parsed is not None
    key_id, secret = parsed
    assert key_id == made.key.key_id and made.token == f"mk_{key_id}_{secret}"
    assert secret.encode() not in made.key.secret_hash
    assert apikeys.matches(made.key, PEPPER, secret)
    assert not apikeys.matches(made.key, b"another-pepper-0123456", secret)
    assert not apikeys.matches(made.key, PEPPER, secret[:-1] + "x")
    other = apikeys.new_key(PEPPER, customer_id="acme", role=Role.CUSTOMER, now=100.0)
    assert other.key.key_id != made.key.key_id and other.token != made.token


@pytest.mark.parametrize(
    "token", ["mk_", "mk_short_secret", "mk_" + "a" * 16 + "_" + "b" * 42, "nope"]
)
def test_malformed_tokens_do_not_parse(token: str) -> None:
    assert apikeys.parse(token) is None


def test_expiry_is_a_duration_or_an_iso_time_in_the_future() -> None:
    now = 1_700_000_000.0
    assert apikeys.parse_expiry("30d", now) == now + 30 * 86400
    assert apikeys.parse_expiry("12h", now) == now + 12 * 3600
    assert apikeys.parse_expiry("2030-01-01T00:00:00Z", now) == 1_893_456_000.0
    assert apikeys.parse_expiry("2030-01-01T00:00:00", now) == 1_893_456_000.0  # UTC
    for bad in ("0d", "yesterday", "2001-01-01", "-5d"):
        with pytest.raises(ValueError):
            apikeys.parse_expiry(bad, now)


@pytest.fixture
async def keys(tmp_path: Path) -> AsyncIterator[SqlApiKeys]:
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'metald.db'}")
    await database.migrate()
    yield SqlApiKeys(database)
    await database.close()


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_the_store_keeps_finds_lists_and_revokes(keys: SqlApiKeys) -> None:
    a = apikeys.new_key(PEPPER, customer_id="acme", role=Role.CUSTOMER, now=1.0)
    b = apikeys.new_key(PEPPER, customer_id=None, role=Role.OPERATOR, now=2.0, description="x")
    await keys.add(a.key)
    await keys.add(b.key)
    assert await keys.by_key_id(a.key.key_id) == a.key
    assert await keys.by_key_id(b.key.key_id) == b.key
    assert await keys.by_key_id("0" * 16) is None
    assert await keys.all() == [a.key, b.key]
    revoked = await keys.revoke(a.key.key_id, 5.0)
    assert revoked is not None and revoked.revoked_at == 5.0
    again = await keys.revoke(a.key.key_id, 9.0)
    assert again is not None and again.revoked_at == 5.0  # the first time stays
    assert await keys.revoke("0" * 16, 9.0) is None


async def test_the_authenticator_checks_expiry_and_revocation_on_every_call(
    keys: SqlApiKeys,
) -> None:
    clock = Clock(1000.0)
    made = apikeys.new_key(
        PEPPER, customer_id="acme", role=Role.CUSTOMER, now=clock.now, expires_at=2000.0
    )
    ops = apikeys.new_key(PEPPER, customer_id=None, role=Role.OPERATOR, now=clock.now)
    await keys.add(made.key)
    await keys.add(ops.key)
    auth = TokenAuthenticator(dev_tokens=False, more=[ApiKeyTokens(keys, PEPPER, clock)])
    caller = await auth.caller_for(f"Bearer {made.token}")
    assert (caller.actor, caller.role, caller.customer_id) == (
        f"key:{made.key.key_id}",
        Role.CUSTOMER,
        "acme",
    )
    operator = await auth.caller_for(f"Bearer {ops.token}")
    assert operator.is_operator and operator.customer_id is None
    key_id, secret = made.token.removeprefix("mk_").split("_", 1)
    for token, reason in (
        (f"mk_{key_id}_{'A' * 43}", "invalid"),  # a wrong secret
        (f"mk_{'z' * 16}_{secret}", "invalid"),  # an unknown key id
        ("mk_garbage", "malformed"),
    ):
        with pytest.raises(TokenRefused) as refused:
            await auth.caller_for(f"Bearer {token}")
        assert refused.value.reason == reason
    # A key made with another pepper does not verify.
    stranger = ApiKeyTokens(keys, b"another-pepper-0123456789", clock)
    with pytest.raises(TokenRefused):
        await stranger.authenticate(made.token)
    clock.now = 2000.0
    with pytest.raises(TokenRefused) as expired:
        await auth.caller_for(f"Bearer {made.token}")
    assert expired.value.reason == "expired"
    await keys.revoke(ops.key.key_id, 1500.0)
    with pytest.raises(TokenRefused) as revoked:
        await auth.caller_for(f"Bearer {ops.token}")
    assert revoked.value.reason == "revoked"

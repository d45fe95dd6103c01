"""The auth chain from the settings (auth_setup.py): what stops start-up, and what the
chain then accepts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from metald import auth_setup
from metald.api.auth import TokenRefused
from metald.config import load_settings
from metald.core import apikeys
from metald.core.identity import Role
from metald.store.api_keys import SqlApiKeys
from metald.store.database import Database


def test_the_pepper_must_be_a_readable_file_of_16_bytes_or_more(tmp_path: Path) -> None:
    (tmp_path / "empty").write_bytes(b"\n")
    (tmp_path / "short").write_bytes(b"0123456789")
    (tmp_path / "good").write_bytes(b"0123456789abcdef\n")
    for path, words in (
        (None, "is not set"),
        (tmp_path / "missing", "cannot be read"),
        (tmp_path / "empty", "holds 0 bytes"),
        (tmp_path / "short", "holds 10 bytes"),
    ):
        with pytest.raises(auth_setup.AuthSetupError, match=words):
            auth_setup.read_pepper(path)
    assert auth_setup.read_pepper(tmp_path / "good") == b"0123456789abcdef"


async def test_bad_identity_settings_stop_start_up(tmp_path: Path) -> None:
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'm.db'}")
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "A" * 43}]}))
    cases = [
        ({"auth_api_keys": True}, "PEPPER_FILE is not set"),
        ({"auth_jwks_file": tmp_path / "nope"}, "JWKS_FILE"),
        ({"auth_jwks_file": jwks}, "ISSUER and _JWT_AUDIENCE are required"),
        ({"auth_jwks_file": jwks, "auth_jwks_url": "https://x/j"}, "not both"),
        ({"auth_jwks_url": "ftp://x/j", "auth_jwt_issuer": "i"}, "http"),
        ({"auth_jwks_url": "http://idp.example/j"}, "plain http to idp.example"),
        ({"auth_jwks_url": "http://10.0.0.1/j"}, "plain http to 10.0.0.1"),
        ({"auth_jwks_url": "https:///j"}, "not an https URL"),
    ]
    try:
        for overrides, words in cases:
            settings = load_settings(data_dir=tmp_path, **overrides)
            with pytest.raises(auth_setup.AuthSetupError, match=words):
                async with auth_setup.authenticator(settings, database):
                    pass
    finally:
        await database.close()


async def test_the_chain_with_keys_on(tmp_path: Path) -> None:
    pepper = tmp_path / "pepper"
    pepper.write_bytes(b"a-pepper-of-enough-bytes")
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'm.db'}")
    await database.migrate()
    try:
        made = apikeys.new_key(
            b"a-pepper-of-enough-bytes", customer_id="acme", role=Role.CUSTOMER, now=1.0
        )
        await SqlApiKeys(database).add(made.key)
        # Dev tokens off explicitly: `make test` exports UNKEY_METALD_AUTH_DEV_TOKENS=true.
        on = load_settings(
            data_dir=tmp_path, auth_api_keys=True, auth_pepper_file=pepper, auth_dev_tokens=False
        )
        async with auth_setup.authenticator(on, database) as chain:
            assert (await chain.caller_for(f"Bearer {made.token}")).customer_id == "acme"
            with pytest.raises(TokenRefused):
                await chain.caller_for("Bearer dev_customer_acme")  # dev tokens are off
        off = load_settings(data_dir=tmp_path, auth_dev_tokens=False)
        async with auth_setup.authenticator(off, database) as chain:
            with pytest.raises(TokenRefused):  # keys off: not even looked up
                await chain.caller_for(f"Bearer {made.token}")
    finally:
        await database.close()


def test_a_jwks_url_is_https_or_loopback() -> None:
    for good in ("https://idp.example/.well-known/jwks.json", "http://127.0.0.1:8081/j",
                 "http://localhost/j", "http://[::1]:9/j"):  # fmt: skip
        auth_setup.check_jwks_url(good)

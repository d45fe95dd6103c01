"""API keys: their shape, how a secret is kept, and when a key may be used.

A key is shown once, at creation, as `mk_<key id>_<secret>`: the key id finds the row with
one indexed lookup, the secret proves the bearer holds the key. The store keeps only
HMAC-SHA256(pepper, secret): a copy of the database (a backup, a leaked replica) holds no
usable key without the pepper, which lives in a file of its own (UNKEY_METALD_AUTH_PEPPER_FILE)
outside the database. A secret has 256 random bits, so one keyed hash (no slow KDF) is
enough: there is nothing to guess.

Expiry and revocation are checked at every use (`refusal`), never cached: a revoked key
stops working on the next call of every open connection.

Standard library only.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from metald.core.identity import Role

PREFIX = "mk_"
KEY_ID = re.compile(r"[a-z0-9]{16}")
_SECRET = re.compile(r"[A-Za-z0-9_-]{43}")  # 32 bytes, urlsafe base64 without padding
_TOKEN = re.compile(rf"{PREFIX}(?P<key_id>[a-z0-9]{{16}})_(?P<secret>[A-Za-z0-9_-]{{43}})")
_KEY_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
MIN_PEPPER_BYTES = 16


@dataclass(frozen=True)
class ApiKey:
    id: str  # the row's id (uuid hex)
    key_id: str  # the public part of the token
    customer_id: str | None  # None: an operator's or admin's key without a customer
    role: Role
    secret_hash: bytes  # HMAC-SHA256(pepper, secret)
    created_at: float  # Unix seconds
    expires_at: float | None
    revoked_at: float | None
    description: str

    def refusal(self, now: float) -> str | None:
        """Why the key may not be used at `now` ("revoked", "expired"), or None."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return None


@dataclass(frozen=True)
class NewKey:
    """A key as created: the row to store and the token, shown once."""

    key: ApiKey
    token: str


def secret_hash(pepper: bytes, secret: str) -> bytes:
    return hmac.new(pepper, secret.encode(), hashlib.sha256).digest()


def parse(token: str) -> tuple[str, str] | None:
    """(key id, secret) of an `mk_` token, or None when it is not one."""
    match = _TOKEN.fullmatch(token)
    return None if match is None else (match["key_id"], match["secret"])


def matches(key: ApiKey, pepper: bytes, secret: str) -> bool:
    """Whether `secret` is the key's, compared in constant time."""
    return hmac.compare_digest(key.secret_hash, secret_hash(pepper, secret))


def new_key(
    pepper: bytes,
    *,
    customer_id: str | None,
    role: Role,
    now: float,
    expires_at: float | None = None,
    description: str = "",
) -> NewKey:
    key_id = "".join(secrets.choice(_KEY_ID_ALPHABET) for _ in range(16))
    secret = secrets.token_urlsafe(32)
    assert _SECRET.fullmatch(secret)
    key = ApiKey(
        id=secrets.token_hex(16),
        key_id=key_id,
        customer_id=customer_id,
        role=role,
        secret_hash=secret_hash(pepper, secret),
        created_at=now,
        expires_at=expires_at,
        revoked_at=None,
        description=description,
    )
    return NewKey(key=key, token=f"{PREFIX}{key_id}_{secret}")


_DURATION = re.compile(r"(\d+)\s*([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_expiry(text: str, now: float) -> float:
    """`30d`, `12h`, `90m`, `2w`, `3600s` from `now`, or an ISO 8601 time (UTC when it names
    no zone), as Unix seconds; ValueError for anything else or a time not in the future."""
    value = text.strip()
    match = _DURATION.fullmatch(value.lower())
    if match is not None:
        seconds = int(match.group(1)) * _UNITS[match.group(2)]
        if seconds <= 0:
            raise ValueError("the expiry must be in the future")
        return now + seconds
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{text!r} is neither a duration (30d, 12h) nor an ISO time") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    at = when.timestamp()
    if at <= now:
        raise ValueError(f"{text!r} is not in the future")
    return at


def describe_expiry(at: float | None) -> str:
    if at is None:
        return "never"
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds")


__all__ = [
    "KEY_ID",
    "PREFIX",
    "ApiKey",
    "NewKey",
    "describe_expiry",
    "matches",
    "new_key",
    "parse",
    "parse_expiry",
    "secret_hash",
]

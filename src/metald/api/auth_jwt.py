"""JWT bearer tokens verified against a JWKS (PyJWT): a file, or a URL refreshed in the
background.

What is accepted, and why so little:
- only RS256, ES256 and EdDSA, and a token's `alg` must be the algorithm of the JWKS key
  its `kid` names: `alg: none` and every HMAC algorithm are refused before any key is
  looked at (an HS256 token "signed" with our public key as the secret is the classic
  confusion attack), and symmetric (`oct`) keys in a JWKS are ignored;
- `kid` must name a key of the set (a set of one key may be used without a kid); an
  unknown kid makes the URL source refetch once (rate-limited: a flood of made-up kids
  costs one fetch per interval), then it is refused;
- `iss` and `aud` must be the configured ones, `exp` is required, `exp`/`nbf`/`iat` are
  checked with a small leeway for clock skew;
- the customer and the role come from configurable claims; a token without the role claim
  is a customer's; a customer's token whose customer claim is missing or not a customer
  id is refused; an operator's or admin's then simply has no customer.

Nothing here blocks the event loop: the URL is fetched with httpx's async client in a task
of its own (and, on an unknown kid, awaited by that call only); the file is re-read when
its stat changes (a stat per call, a read only after a rotation).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import httpx
import jwt

from metald.api.auth import TokenRefused
from metald.core.identity import Caller, Role
from metald.core.validation import CUSTOMER_ID

log = logging.getLogger(__name__)

ALGORITHMS = frozenset({"RS256", "ES256", "EdDSA"})
MAX_JWKS_BYTES = 1024 * 1024
FETCH_TIMEOUT_SECONDS = 5.0
ON_DEMAND_MIN_SECONDS = 10.0  # at most one unknown-kid refetch per this (or the refresh)


class JwksError(ValueError):
    """A JWKS that cannot be used (unreadable, not JSON, no usable key)."""


def parse_jwks(data: bytes) -> dict[str, jwt.PyJWK]:
    """The usable signing keys of a JWKS document, by kid ("" for a kid-less key)."""
    try:
        document = json.loads(data)
    except ValueError as exc:
        raise JwksError(f"not JSON: {exc}") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise JwksError("no 'keys' list")
    keys: dict[str, jwt.PyJWK] = {}
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("kty") == "oct":
            continue  # symmetric keys are never accepted
        if entry.get("use", "sig") != "sig":
            continue
        try:
            key = jwt.PyJWK(entry)
        except jwt.PyJWTError as exc:
            log.warning("JWKS: key %r skipped: %s", entry.get("kid"), exc)
            continue
        if key.algorithm_name not in ALGORITHMS:
            continue
        keys[str(entry.get("kid") or "")] = key
    if not keys:
        raise JwksError("no RS256, ES256 or EdDSA signing key")
    return keys


class KeySource(Protocol):
    def keys(self) -> Mapping[str, jwt.PyJWK]: ...

    async def refresh_for_unknown_kid(self) -> bool:
        """Try to get newer keys (rate-limited); whether the set changed."""


class JwksFile:
    """A JWKS file, re-read when its (inode, size, mtime) changes; a bad new version is
    logged and the keys already read stay in use."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._stamp: tuple[int, int, int] | None = None
        self._keys: dict[str, jwt.PyJWK] = {}
        self._load(strict=True)

    def _load(self, *, strict: bool) -> None:
        try:
            st = os.stat(self._path)
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
            if stamp == self._stamp:
                return
            keys = parse_jwks(self._path.read_bytes()[: MAX_JWKS_BYTES + 1])
        except (OSError, JwksError) as exc:
            if strict:
                raise JwksError(f"{self._path}: {exc}") from None
            log.error("JWKS file %s: %s (the keys read before stay in use)", self._path, exc)
            return
        self._stamp, self._keys = stamp, keys
        log.info("JWKS file %s: %d key(s): %s", self._path, len(keys), ", ".join(sorted(keys)))

    def keys(self) -> Mapping[str, jwt.PyJWK]:
        self._load(strict=False)
        return self._keys

    async def refresh_for_unknown_kid(self) -> bool:
        return False  # keys() already re-reads a changed file


class JwksUrl:
    """A JWKS URL fetched every `refresh_seconds` in a background task. Until a fetch has
    worked, no JWT is accepted; a failed fetch keeps the keys of the last good one."""

    def __init__(
        self,
        url: str,
        refresh_seconds: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self._url = url
        self._refresh = refresh_seconds
        self._clock = clock
        self._client = client or httpx.AsyncClient(timeout=FETCH_TIMEOUT_SECONDS)
        self._keys: dict[str, jwt.PyJWK] = {}
        self._last_try = -float("inf")
        self._inflight: asyncio.Task[bool] | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._fetch()
        self._task = asyncio.create_task(self._loop(), name="metald-jwks-refresh")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._client.aclose()

    def keys(self) -> Mapping[str, jwt.PyJWK]:
        return self._keys

    async def refresh_for_unknown_kid(self) -> bool:
        if self._inflight is None:
            if self._clock() - self._last_try < min(ON_DEMAND_MIN_SECONDS, self._refresh):
                return False
            self._inflight = asyncio.ensure_future(self._fetch())
            self._inflight.add_done_callback(self._done)
        return await asyncio.shield(self._inflight)

    def _done(self, _: asyncio.Task[bool]) -> None:
        self._inflight = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._refresh)
            try:
                await self._fetch()
            except Exception:  # never let the refresh task die: the keys would go stale
                log.exception("JWKS %s: the refresh failed", self._url)

    async def _fetch(self) -> bool:
        self._last_try = self._clock()
        try:
            response = await self._client.get(self._url)
            response.raise_for_status()
            if len(response.content) > MAX_JWKS_BYTES:
                raise JwksError(f"larger than {MAX_JWKS_BYTES} bytes")
            keys = parse_jwks(response.content)
        except (httpx.HTTPError, JwksError) as exc:
            log.error(
                "JWKS %s could not be fetched: %s (the last keys stay in use)", self._url, exc
            )
            return False
        changed = set(keys) != set(self._keys)
        self._keys = keys
        if changed:
            log.info("JWKS %s: %d key(s): %s", self._url, len(keys), ", ".join(sorted(keys)))
        return changed


class JwtTokens:
    """JWTs (three base64url parts, a JSON header) verified against `source`."""

    def __init__(
        self,
        source: KeySource,
        *,
        issuer: str,
        audience: str,
        leeway_seconds: float = 30.0,
        customer_claim: str = "sub",
        role_claim: str = "role",
    ) -> None:
        self._source = source
        self._issuer = issuer
        self._audience = audience
        self._leeway = leeway_seconds
        self._customer_claim = customer_claim
        self._role_claim = role_claim

    async def authenticate(self, token: str) -> Caller | None:
        if token.count(".") != 2 or not token.startswith("ey"):
            return None  # not a JWT (its header is base64url of '{"...')
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenRefused("malformed", "invalid token") from None
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise TokenRefused("invalid", "the token's algorithm is not accepted")
        key = await self._key(header.get("kid"))
        if key.algorithm_name != alg:
            raise TokenRefused("invalid", "the token's algorithm is not its key's")
        try:
            claims = jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise TokenRefused("expired", "the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise TokenRefused("invalid", "the token is not valid yet") from None
        except jwt.PyJWTError as exc:
            log.debug("JWT refused: %s", exc)
            raise TokenRefused("invalid", "invalid token") from None
        return self._caller(claims)

    async def _key(self, kid: Any) -> jwt.PyJWK:
        for attempt in range(2):
            keys = self._source.keys()
            if kid is None and len(keys) == 1:
                return next(iter(keys.values()))
            if isinstance(kid, str) and kid in keys:
                return keys[kid]
            if attempt == 0 and not await self._source.refresh_for_unknown_kid():
                break
        raise TokenRefused("invalid", "the token's key is not known")

    def _caller(self, claims: Mapping[str, Any]) -> Caller:
        role_value = claims.get(self._role_claim, Role.CUSTOMER.value)
        try:
            role = Role(role_value)
        except ValueError:
            raise TokenRefused("invalid", f"the token's {self._role_claim!r} is no role") from None
        customer = claims.get(self._customer_claim)
        if not (isinstance(customer, str) and CUSTOMER_ID.fullmatch(customer)):
            if role is Role.CUSTOMER:
                raise TokenRefused(
                    "invalid", f"the token's {self._customer_claim!r} is no customer id"
                )
            customer = None  # an operator or admin may have none (its `sub` a user's name)
        subject = str(claims["sub"])
        return Caller(actor=f"jwt:{self._issuer}#{subject}", role=role, customer_id=customer)

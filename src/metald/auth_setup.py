"""The auth chain as the settings ask for it (app.py and `metald keys` use it).

It is composition, like app.py: it puts the store's ApiKeys adapter behind the api layer's
authenticator, so it lives beside app.py (api may not import an adapter). Everything a
setting names that cannot be used stops start-up with a message naming the setting: a
pepper file that is missing, empty, unreadable or too short with API keys on; a JWKS file
that is unreadable or holds no usable key; a JWKS source without an issuer and audience; a
JWKS URL in plain http to anything but loopback (whoever sits on that path could hand
metald their own keys, and so mint any customer's tokens).
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

from metald.api.auth import ApiKeyTokens, Authenticator, TokenAuthenticator
from metald.api.auth_jwt import JwksError, JwksFile, JwksUrl, JwtTokens, KeySource
from metald.config import Settings
from metald.core.apikeys import MIN_PEPPER_BYTES
from metald.store.api_keys import SqlApiKeys
from metald.store.database import Database


class AuthSetupError(Exception):
    """A bad identity setting; the message names it."""


def read_pepper(path: Path | None) -> bytes:
    if path is None:
        raise AuthSetupError(
            "UNKEY_METALD_AUTH_PEPPER_FILE is not set: API keys need a pepper file "
            f"(at least {MIN_PEPPER_BYTES} random bytes, e.g. `head -c 32 /dev/urandom`)"
        )
    try:
        pepper = path.read_bytes().strip()
    except OSError as exc:
        raise AuthSetupError(
            f"UNKEY_METALD_AUTH_PEPPER_FILE: {path} cannot be read ({exc.strerror or exc})"
        ) from None
    if len(pepper) < MIN_PEPPER_BYTES:
        raise AuthSetupError(
            f"UNKEY_METALD_AUTH_PEPPER_FILE: {path} holds {len(pepper)} bytes; at least "
            f"{MIN_PEPPER_BYTES} are needed"
        )
    return pepper


def check_jwks_url(url: str) -> None:
    """An https URL, or http to a loopback address (a local agent, a test)."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme != "http" or not parts.hostname:
        raise AuthSetupError(f"UNKEY_METALD_AUTH_JWKS_URL: {url!r} is not an https URL")
    host = parts.hostname
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise AuthSetupError(
            f"UNKEY_METALD_AUTH_JWKS_URL: {url!r} is plain http to {host}: use https (plain "
            "http only to loopback), or the keys could be swapped on the way"
        )


@contextlib.asynccontextmanager
async def authenticator(
    settings: Settings, database: Database
) -> AsyncIterator[TokenAuthenticator]:
    """The chain (static tokens, dev tokens, API keys, JWT), running while in the block
    (a JWKS URL is fetched in the background until it ends)."""
    more: list[Authenticator] = []
    if settings.auth_api_keys:
        more.append(ApiKeyTokens(SqlApiKeys(database), read_pepper(settings.auth_pepper_file)))
    url_source: JwksUrl | None = None
    source: KeySource | None = None
    if settings.auth_jwks_file is not None and settings.auth_jwks_url:
        raise AuthSetupError("set UNKEY_METALD_AUTH_JWKS_FILE or _JWKS_URL, not both")
    if settings.auth_jwks_file is not None:
        try:
            source = JwksFile(settings.auth_jwks_file)
        except JwksError as exc:
            raise AuthSetupError(f"UNKEY_METALD_AUTH_JWKS_FILE: {exc}") from None
    elif settings.auth_jwks_url:
        check_jwks_url(settings.auth_jwks_url)
        source = url_source = JwksUrl(settings.auth_jwks_url, settings.auth_jwks_refresh_seconds)
    if source is not None:
        if not settings.auth_jwt_issuer or not settings.auth_jwt_audience:
            raise AuthSetupError(
                "UNKEY_METALD_AUTH_JWT_ISSUER and _JWT_AUDIENCE are required with a JWKS"
            )
        more.append(
            JwtTokens(
                source,
                issuer=settings.auth_jwt_issuer,
                audience=settings.auth_jwt_audience,
                leeway_seconds=settings.auth_jwt_leeway_seconds,
                customer_claim=settings.auth_jwt_customer_claim,
                role_claim=settings.auth_jwt_role_claim,
            )
        )
    chain = TokenAuthenticator(
        dev_tokens=settings.auth_dev_tokens, tokens_file=settings.auth_tokens_file, more=more
    )
    if url_source is not None:
        await url_source.start()
    try:
        yield chain
    finally:
        if url_source is not None:
            await url_source.close()

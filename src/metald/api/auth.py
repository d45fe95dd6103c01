"""Bearer credentials to a Caller: the auth chain, and where development tokens may be
accepted.

Every credential becomes one core.identity.Caller. Each kind is a small class behind one
`Authenticator` protocol: it answers None for a token that is not of its kind (the next
one is asked), a Caller for a good one, and raises TokenRefused(reason) for one of its kind
that fails (an expired key is refused, not handed to the next). The chain, in order:
static tokens (a file), development tokens (only when enabled), API keys from the store
(`mk_...`, api/auth.py ApiKeyTokens), JWTs (api/auth_jwt.py). A token none claims is
`invalid`. The interceptor adds the peer address and the X-Tenant-ID header.

A development token `dev_customer_<id>` (or `dev_user_<id>`, the name older clients use)
makes its bearer customer <id>: anyone who can reach the port can be anyone. So they are
for an API that only this host can reach (loopback; app.py refuses them elsewhere).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import socket
import time
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Protocol

from metald.core import apikeys
from metald.core.errors import Unauthenticated
from metald.core.identity import Caller, Role
from metald.core.ports import ApiKeys
from metald.core.validation import CUSTOMER_ID

log = logging.getLogger(__name__)

DEV_PREFIX = "dev_customer_"
DEV_PREFIXES = (DEV_PREFIX, "dev_user_")

# The authenticated customer of the RPC being served (set by the auth interceptor; "" for an
# operator without a customer). Kept for code that predates Caller (bench/trivial.py).
current_customer: ContextVar[str] = ContextVar("current_customer")
# The authenticated caller of the RPC being served (core/identity.py; the auth interceptor).
current_caller: ContextVar[Caller] = ContextVar("current_caller")


class TokenRefused(Unauthenticated):
    """A refused token, with why (for metald_auth_refusals_total): missing, malformed,
    invalid, expired or revoked. The caller sees only the message."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Authenticator(Protocol):
    async def authenticate(self, token: str) -> Caller | None:
        """The token's Caller; None when the token is not of this kind; TokenRefused when
        it is and fails."""


class StaticTokens:
    """Static tokens from a file: one `<customer_id> <token>` pair per line; `#` starts a
    comment. Every entry is compared in constant time, so timing reveals nothing."""

    def __init__(self, tokens_file: Path) -> None:
        self._static: list[tuple[bytes, str]] = []
        for number, line in enumerate(tokens_file.read_text().splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2 or not CUSTOMER_ID.fullmatch(parts[0]):
                raise ValueError(f"{tokens_file}:{number}: expected '<customer_id> <token>'")
            self._static.append((parts[1].encode(), parts[0]))

    async def authenticate(self, token: str) -> Caller | None:
        customer = None
        for known, owner in self._static:
            if hmac.compare_digest(known, token.encode()):
                customer = owner
        if customer is None:
            return None
        return Caller(actor=f"token:{customer}", role=Role.CUSTOMER, customer_id=customer)


class DevTokens:
    """`dev_customer_<id>` and `dev_user_<id>`: customer <id> (only when enabled)."""

    async def authenticate(self, token: str) -> Caller | None:
        for prefix in DEV_PREFIXES:
            if token.startswith(prefix):
                candidate = token.removeprefix(prefix)
                if CUSTOMER_ID.fullmatch(candidate):
                    return Caller(
                        actor=f"dev:{candidate}", role=Role.CUSTOMER, customer_id=candidate
                    )
        return None


class ApiKeyTokens:
    """`mk_<key id>_<secret>` against the store: one indexed lookup per call, no cache, so
    expiry and revocation hold on the next call of every connection."""

    def __init__(
        self, keys: ApiKeys, pepper: bytes, clock: Callable[[], float] = time.time
    ) -> None:
        self._keys = keys
        self._pepper = pepper
        self._clock = clock

    async def authenticate(self, token: str) -> Caller | None:
        if not token.startswith(apikeys.PREFIX):
            return None
        parsed = apikeys.parse(token)
        if parsed is None:
            raise TokenRefused("malformed", "invalid token")
        key_id, secret = parsed
        key = await self._keys.by_key_id(key_id)
        # A missing key and a wrong secret answer alike (the secret is compared anyway).
        good = apikeys.matches(key, self._pepper, secret) if key is not None else False
        if key is None or not good:
            raise TokenRefused("invalid", "invalid token")
        refusal = key.refusal(self._clock())
        if refusal is not None:
            raise TokenRefused(refusal, f"the API key is {refusal}")
        return Caller(actor=f"key:{key.key_id}", role=key.role, customer_id=key.customer_id)


class TokenAuthenticator:
    """The chain: static tokens, development tokens (when enabled), then `more` in order
    (API keys, JWTs). The first that claims the token decides."""

    def __init__(
        self,
        *,
        dev_tokens: bool,
        tokens_file: Path | None = None,
        more: Sequence[Authenticator] = (),
    ) -> None:
        chain: list[Authenticator] = []
        if tokens_file is not None:
            chain.append(StaticTokens(tokens_file))
        if dev_tokens:
            chain.append(DevTokens())
        chain.extend(more)
        self._chain = chain

    async def caller_for(self, authorization: str | None) -> Caller:
        """The Caller of an Authorization header (without source and tenant header)."""
        if not authorization:
            raise TokenRefused("missing", "missing Authorization: Bearer <token> header")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise TokenRefused("malformed", "the Authorization header must be 'Bearer <token>'")
        for authenticator in self._chain:
            caller = await authenticator.authenticate(token)
            if caller is not None:
                return caller
        raise TokenRefused("invalid", "invalid token")


def is_loopback_only(address: str) -> bool:
    """Whether listening on `address` (UNKEY_METALD_ADDRESS) exposes the API only to this
    host: a loopback IP literal, or a name all of whose addresses are loopback. The
    wildcards (0.0.0.0, ::) and names that do not resolve are not."""
    host = address.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return False
    addresses = {str(info[4][0]) for info in infos}
    return bool(addresses) and all(ipaddress.ip_address(a).is_loopback for a in addresses)

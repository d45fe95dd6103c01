"""Bearer tokens to customer ids, and where development tokens may be accepted.

A development token `dev_customer_<id>` makes its bearer customer <id>: anyone who can reach
the port can be anyone. So they are for an API that only this host can reach (loopback).
"""

from __future__ import annotations

import hmac
import ipaddress
import socket
from contextvars import ContextVar
from pathlib import Path

from metald.core.errors import Unauthenticated
from metald.core.identity import Caller
from metald.core.validation import CUSTOMER_ID

DEV_PREFIX = "dev_customer_"

# The authenticated customer of the RPC being served (set by the auth interceptor).
current_customer: ContextVar[str] = ContextVar("current_customer")
# The authenticated caller of the RPC being served (core/identity.py; the auth interceptor).
current_caller: ContextVar[Caller] = ContextVar("current_caller")


class TokenRefused(Unauthenticated):
    """A refused token, with why (for metald_auth_refusals_total): missing, malformed or
    invalid. The caller sees only the message."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class TokenAuthenticator:
    """Development tokens (only when enabled) and static tokens from a file.

    The tokens file has one `<customer_id> <token>` pair per line; `#` starts a comment.
    """

    def __init__(self, *, dev_tokens: bool, tokens_file: Path | None = None) -> None:
        self._dev_tokens = dev_tokens
        self._static: list[tuple[bytes, str]] = []
        if tokens_file is not None:
            for number, line in enumerate(tokens_file.read_text().splitlines(), 1):
                line = line.split("#", 1)[0].strip()
                if not line:
                    continue
                parts = line.split()
                if len(parts) != 2 or not CUSTOMER_ID.fullmatch(parts[0]):
                    raise ValueError(f"{tokens_file}:{number}: expected '<customer_id> <token>'")
                self._static.append((parts[1].encode(), parts[0]))

    def customer_for(self, authorization: str | None) -> str:
        if not authorization:
            raise TokenRefused("missing", "missing Authorization: Bearer <token> header")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise TokenRefused("malformed", "the Authorization header must be 'Bearer <token>'")
        customer = None
        for known, owner in self._static:
            # Compare every entry in constant time so timing reveals nothing.
            if hmac.compare_digest(known, token.encode()):
                customer = owner
        if customer is not None:
            return customer
        if self._dev_tokens and token.startswith(DEV_PREFIX):
            candidate = token.removeprefix(DEV_PREFIX)
            if CUSTOMER_ID.fullmatch(candidate):
                return candidate
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

"""Bearer tokens to customer ids."""

from __future__ import annotations

import hmac
from contextvars import ContextVar
from pathlib import Path

from metald.core.errors import Unauthenticated
from metald.core.validation import CUSTOMER_ID

DEV_PREFIX = "dev_customer_"

# The authenticated customer of the RPC being served (set by the auth interceptor).
current_customer: ContextVar[str] = ContextVar("current_customer")


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
            raise Unauthenticated("missing Authorization: Bearer <token> header")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("the Authorization header must be 'Bearer <token>'")
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
        raise Unauthenticated("invalid token")

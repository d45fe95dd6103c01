"""Opaque, stable page tokens for ListVms: a cursor on (created_at, id)."""

from __future__ import annotations

import base64
import json

from metald.core.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


def page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidArgument("page_size", "must not be negative")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def encode_token(created_at: float, vm_id: str) -> str:
    raw = json.dumps([created_at, vm_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str) -> tuple[float, str] | None:
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        created_at, vm_id = json.loads(raw)
        if not isinstance(created_at, int | float) or not isinstance(vm_id, str):
            raise ValueError
    except (ValueError, TypeError):
        raise InvalidArgument("page_token", "is not a token returned by ListVms") from None
    return float(created_at), vm_id

"""Opaque, stable page tokens for ListVms: a cursor on (created_at, id)."""

from __future__ import annotations

import base64
import binascii
import json
import math

from metald.core.errors import InvalidArgument
from metald.core.ids import is_vm_id

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
# A token holds a timestamp and a VM id (at most 64 characters): ~120 characters encoded.
MAX_TOKEN = 256


def page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidArgument("page_size", "must not be negative")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def encode_token(created_at: float, vm_id: str) -> str:
    raw = json.dumps([created_at, vm_id], separators=(",", ":")).encode()
    return encode_raw(raw)


def decode_token(token: str) -> tuple[float, str] | None:
    """The cursor in a token encode_token made; InvalidArgument for anything else (strict
    base64, a finite non-negative time, a well-formed VM id)."""
    if not token:
        return None
    try:
        if len(token) > MAX_TOKEN or not token.isascii():
            raise ValueError
        padded = token + "=" * (-len(token) % 4)
        raw = base64.b64decode(padded, altchars=b"-_", validate=True)
        if encode_raw(raw) != token:
            raise ValueError  # not the canonical encoding of its bytes
        value = json.loads(raw, parse_constant=_refuse_constant)
        if not isinstance(value, list) or len(value) != 2:
            raise ValueError
        created_at, vm_id = value
        if isinstance(created_at, bool) or not isinstance(created_at, int | float):
            raise ValueError
        if not math.isfinite(created_at) or created_at < 0:
            raise ValueError
        if not isinstance(vm_id, str) or not is_vm_id(vm_id):
            raise ValueError
    except (ValueError, TypeError, binascii.Error, RecursionError):
        raise InvalidArgument("page_token", "is not a token returned by ListVms") from None
    return float(created_at), vm_id


def encode_raw(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not allowed")

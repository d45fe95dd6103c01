"""Domain errors to Connect errors; anything unexpected becomes a bare `internal`.

A caller is shown a domain error's message (they are written to be safe), passed once more
through core.redaction.tenant_message: one bounded line, any absolute path cut to its file
name, in case a message carries text from below (a VMM, the kernel). `internal` errors,
BackendError included (a VMM's words, host paths, pids), show only a reference to the log
line that holds the details."""

from __future__ import annotations

import logging
import uuid

from connectrpc.code import Code
from connectrpc.errors import ConnectError

from metald.core.errors import MetaldError
from metald.core.redaction import tenant_message

log = logging.getLogger(__name__)

_CODES = {
    "invalid_argument": Code.INVALID_ARGUMENT,
    "not_found": Code.NOT_FOUND,
    "already_exists": Code.ALREADY_EXISTS,
    "permission_denied": Code.PERMISSION_DENIED,
    "unauthenticated": Code.UNAUTHENTICATED,
    "failed_precondition": Code.FAILED_PRECONDITION,
    "resource_exhausted": Code.RESOURCE_EXHAUSTED,
    "unimplemented": Code.UNIMPLEMENTED,
    "unavailable": Code.UNAVAILABLE,
    "internal": Code.INTERNAL,
}


def to_connect_error(exc: Exception) -> ConnectError:
    if isinstance(exc, ConnectError):
        return exc
    if isinstance(exc, MetaldError):
        if exc.code == "internal":
            return _internal(exc)
        shown = tenant_message(exc.message)
        if shown != exc.message:
            log.info("%s error shown cleaned; in full: %s", exc.code, exc.message)
        return ConnectError(_CODES[exc.code], shown)
    return _internal(exc)


def _internal(exc: Exception) -> ConnectError:
    # The caller gets a reference to quote; the details stay in our log.
    ref = uuid.uuid4().hex[:12]
    log.error("internal error %s", ref, exc_info=exc)
    return ConnectError(Code.INTERNAL, f"internal error (reference {ref})")

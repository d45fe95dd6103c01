"""What the API puts in the audit log (core/audit.py), and the one security log line per row.

Recorded, once the call's result is known: every mutating RPC (MUTATING), every call of an
operator or admin caller, every refused authentication (actor "anonymous", or what
`presented_actor` makes of the credential, never the secret) and every refused access
(permission_denied, and NotYours, which the caller sees as not_found). Not recorded: calls
refused by a rate limit (a flood would become a flood of rows; they are counted in
/metrics), and reads of a customer's own VMs.

How the pieces meet. `AuditInterceptor` is a leading metadata interceptor just before the
auth interceptor: its on_end runs after everything behind it, refused authentication
included, and sees the final error. It leaves a core.audit.CallNote in a context variable
that the layers behind it fill in: `AuditCaller` (right after auth and the rate limit) the
authenticated caller, the errors interceptor (api/interceptors.py) the request's VM id and
why an access was refused (which the Connect code alone does not say), the service
(core.audit.note) the id a create picked and whose VM it was. The row's customer is that
owner when the service got so far (an operator's row names the customer it acted for), else
the caller's.

Each row is also exactly one line on the `metald.security` logger (api/security.py):
`event=security` with its `reason` at WARNING for refusals, `event=audit` at INFO for the
rest, with the row's fields as extras, written when the call ends (the row itself is
queued: store/audit_log.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextvars import Token
from typing import Any

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext

from metald.api import security
from metald.api.auth import current_caller
from metald.core import apikeys, callcontext, tracing
from metald.core.audit import AuditEvent, CallNote, call_note
from metald.core.ports import Audit

MUTATING = frozenset(
    {"CreateVm", "DeleteVm", "BootVm", "ShutdownVm", "PauseVm", "ResumeVm", "RebootVm"}
    | {"CreateApiKey", "RevokeApiKey", "SetQuota"}  # metald.admin.v1.AdminService
)
TENANT_HEADER_MAX = 256


def presented_actor(authorization: str | None) -> str:
    """Who a refused credential claimed to be, for the audit row: never the secret. An API
    key names its key id ("key:<id>", as its bearer sent it: the key may not exist); static,
    development and JWT tokens name nobody but themselves: "anonymous"."""
    scheme, _, token = (authorization or "").partition(" ")
    parsed = apikeys.parse(token.strip()) if scheme.lower() == "bearer" else None
    return f"key:{parsed[0]}" if parsed is not None else "anonymous"


class NoAudit:
    """The Audit port that keeps nothing (audit off: the log lines stay)."""

    async def record(self, event: AuditEvent) -> None:
        pass


def _code(error: Exception | None) -> str:
    if error is None:
        return "ok"
    return error.code.name.lower() if isinstance(error, ConnectError) else "unknown"


class AuditInterceptor:
    """Records the call when it ends, if it is one the audit log keeps (module docstring)."""

    def __init__(self, audit: Audit | None = None, clock: Callable[[], int] = time.time_ns):
        self._audit: Audit = audit if audit is not None else NoAudit()
        self._clock = clock

    async def on_start(self, ctx: RequestContext[Any, Any]) -> tuple[Token[CallNote], CallNote]:
        note = CallNote()
        return call_note.set(note), note

    async def on_end(
        self,
        started: tuple[Token[CallNote], CallNote],
        ctx: RequestContext[Any, Any],
        error: Exception | None,
        /,
    ) -> None:
        token, note = started
        call_note.reset(token)
        caller = note.caller
        unauthenticated = isinstance(error, ConnectError) and error.code is Code.UNAUTHENTICATED
        if caller is None:
            if not unauthenticated:
                return  # refused before authentication finished for another reason (a limit)
            reason: str | None = security.UNAUTHENTICATED
        elif note.refused is not None:
            reason = note.refused
        elif unauthenticated:
            reason = security.UNAUTHENTICATED
        elif ctx.method.name in MUTATING or caller.is_operator:
            reason = None
        else:
            return
        tenant = ctx.request_headers.get("x-tenant-id")
        event = AuditEvent(
            at_ns=self._clock(),
            actor=caller.actor
            if caller
            else presented_actor(ctx.request_headers.get("authorization")),
            role=caller.role.value if caller else "",
            customer_id=(note.owner or caller.customer_id) if caller else None,
            method=f"{ctx.method.service_name}/{ctx.method.name}",
            vm_id=note.vm_id,
            code=_code(error),
            source=ctx.client_address,
            trace_id=_trace_id(),
            tenant_header=tenant[:TENANT_HEADER_MAX] if tenant is not None else None,
        )
        detail = error.message if isinstance(error, ConnectError) and reason else ""
        security.audited(event, reason, detail)
        await self._audit.record(event)


def _trace_id() -> str:
    ids = tracing.current_ids()
    return ids[0] if ids is not None else callcontext.fields().get("trace_id", "")


class AuditCaller:
    """Notes the authenticated caller for the audit interceptor (placed after auth)."""

    async def on_start(self, ctx: RequestContext[Any, Any]) -> None:
        note = call_note.get(None)
        if note is not None:
            note.caller = current_caller.get(None)

    async def on_end(
        self, started: None, ctx: RequestContext[Any, Any], error: Exception | None, /
    ) -> None:
        pass

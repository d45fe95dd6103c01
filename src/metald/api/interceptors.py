"""Connect interceptors: tracing, request metrics, authentication, error mapping, and
their order.

Refusals are counted where they happen (core/telemetry.py): a refused token in the auth
interceptor (by reason), a refused access in the errors interceptor (permission_denied, and
another customer's VM, which the caller is told is not_found: core.errors.NotYours).

The order is the point. connectrpc runs the *leading* metadata interceptors (those that see
only headers) before it reads or decodes the request body, and everything from the first
message interceptor on after decoding. Metrics and authentication are metadata
interceptors at the front, so a call without a valid bearer token is answered from its
headers alone: its body is never read, buffered or parsed, whatever it claims to hold.
(Rejecting before the body is read used to drop the whole HTTP/2 connection under
hypercorn; api/h2_fixes.py makes the frames still arriving for the answered stream harmless.)

Tracing is first, so the RPC's server span covers every call, refused ones included; it
talks to the tracing port (core/tracing.py), and with tracing off it only notes the caller's
trace id for the log lines. The customer (auth) and the request's VM id (after decoding) are
bound for the call's log lines and span (core/callcontext.py). Every refused authentication
or access is a security event (api/security.py).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextvars import Token
from dataclasses import dataclass, replace
from typing import Any

from connectrpc.errors import ConnectError
from connectrpc.interceptor import Interceptor
from connectrpc.request import RequestContext

from metald.api import security
from metald.api.audit import AuditCaller, AuditInterceptor
from metald.api.auth import TokenAuthenticator, TokenRefused, current_caller, current_customer
from metald.api.errors import to_connect_error
from metald.api.mtls import CertificateAuthenticator, current_peer
from metald.api.ratelimit import CustomerRateLimit, SourceThrottle
from metald.core import callcontext, identity, tracing
from metald.core.audit import call_note
from metald.core.errors import NotYours, PermissionDenied, Unauthenticated
from metald.core.ids import is_vm_id
from metald.core.ports import Audit
from metald.core.ratelimit import CustomerLimits, FailedAuthLimits
from metald.core.telemetry import ApiTelemetry

CallFields = Token[Mapping[str, str]]


def _code(error: Exception | None) -> str:
    if error is None:
        return "ok"
    return error.code.name.lower() if isinstance(error, ConnectError) else "unknown"


def _trace_id(traceparent: str | None) -> str:
    """The trace id of a W3C traceparent (`00-<32 hex>-<16 hex>-<2 hex>`), or ''."""
    if not traceparent or len(traceparent) < 55 or traceparent[2] != "-":
        return ""
    trace_id = traceparent[3:35].lower()
    if trace_id == "0" * 32 or any(c not in "0123456789abcdef" for c in trace_id):
        return ""
    return trace_id


class TracingInterceptor:
    """The RPC's server span (a child of the caller's traceparent), ended with its code."""

    async def on_start(
        self, ctx: RequestContext[Any, Any]
    ) -> tuple[tracing.RpcSpan | None, CallFields | None]:
        tracer = tracing.active()
        if tracer is None:
            trace_id = _trace_id(ctx.request_headers.get("traceparent"))
            return None, callcontext.bind(trace_id=trace_id) if trace_id else None
        span = tracer.start_rpc(
            ctx.method.service_name, ctx.method.name, ctx.request_headers, ctx.client_address
        )
        return span, None

    async def on_end(
        self,
        started: tuple[tracing.RpcSpan | None, CallFields | None],
        ctx: RequestContext[Any, Any],
        error: Exception | None,
        /,
    ) -> None:
        span, fields = started
        if fields is not None:
            callcontext.reset(fields)
        if span is not None:
            span.end(None if error is None else _code(error))


class MetricsInterceptor:
    """Counts every call, including those refused before decoding, by method and code."""

    def __init__(self, metrics: ApiTelemetry) -> None:
        self._metrics = metrics

    async def on_start(self, ctx: RequestContext[Any, Any]) -> float:
        return time.perf_counter()

    async def on_end(
        self, started: float, ctx: RequestContext[Any, Any], error: Exception | None, /
    ) -> None:
        code = "ok"
        if error is not None:
            code = error.code.name.lower() if isinstance(error, ConnectError) else "unknown"
        self._metrics.rpc_served(ctx.method.name, code, time.perf_counter() - started)


class AuthInterceptor:
    """The bearer token to the Caller of the call (api/auth.py's chain), from the headers,
    before the body. The peer address and X-Tenant-ID (recorded, never trusted) are added
    here and bound for the call's log lines."""

    def __init__(
        self,
        authenticator: TokenAuthenticator,
        metrics: ApiTelemetry,
        certificates: CertificateAuthenticator | None = None,
    ) -> None:
        self._auth = authenticator
        self._metrics = metrics
        # With mTLS the client certificate names the caller (api/mtls.py).
        self._certificates = certificates

    async def on_start(
        self, ctx: RequestContext[Any, Any]
    ) -> tuple[Token[str], Token[identity.Caller], CallFields]:
        authorization = ctx.request_headers.get("authorization")
        tenant = ctx.request_headers.get("x-tenant-id")
        try:
            if self._certificates is not None:
                found = await self._certificates.caller(
                    current_peer.get(), authorization, self._auth
                )
            else:
                found = await self._auth.caller_for(authorization)
        except Exception as exc:
            if isinstance(exc, TokenRefused):
                self._metrics.auth_refused(exc.reason)
            # Its security line and audit row: api/audit.py's AuditInterceptor.
            raise to_connect_error(exc) from None
        # Set in the request's own task: the handler, awaited by the same task, sees it.
        caller = replace(found, source=ctx.client_address, tenant_header=tenant)
        fields = {"customer_id": caller.customer_id or "", "actor": caller.actor}
        if tenant:
            fields["tenant"] = tenant[:128]  # as sent: bounded in the log line
        return (
            current_customer.set(caller.customer_id or ""),
            current_caller.set(caller),
            callcontext.bind(**fields),
        )

    async def on_end(
        self,
        tokens: tuple[Token[str], Token[identity.Caller], CallFields],
        ctx: RequestContext[Any, Any],
        error: Exception | None,
        /,
    ) -> None:
        callcontext.reset(tokens[2])
        current_caller.reset(tokens[1])
        current_customer.reset(tokens[0])


class ErrorsInterceptor:
    """Every exception of a handler becomes its Connect code (`internal` with no detail for
    anything that is not a MetaldError); a refused access is counted and is a security
    event. The request's VM id is bound for the call's log lines and span."""

    def __init__(self, metrics: ApiTelemetry) -> None:
        self._metrics = metrics

    async def intercept_unary(
        self,
        call_next: Callable[[Any, RequestContext[Any, Any]], Awaitable[Any]],
        request: Any,
        ctx: RequestContext[Any, Any],
        /,
    ) -> Any:
        vm_id = getattr(request, "vm_id", "")
        # Only a well-formed id goes into every log line of the call (not a caller's 1 MiB).
        fields = (
            callcontext.bind(vm_id=vm_id) if isinstance(vm_id, str) and is_vm_id(vm_id) else None
        )
        note = call_note.get(None)
        if note is not None and fields is not None:
            note.vm_id = vm_id
        try:
            return await call_next(request, ctx)
        except Exception as exc:
            if isinstance(exc, PermissionDenied | NotYours):
                self._metrics.access_refused(ctx.method.name)
            if note is None:
                _security_event(exc, ctx)
            elif isinstance(exc, NotYours | PermissionDenied):
                # The audit interceptor writes the row and its one security line.
                is_mine = isinstance(exc, NotYours)
                note.refused = security.NOT_YOURS if is_mine else security.PERMISSION_DENIED
            raise to_connect_error(exc) from None
        finally:
            if fields is not None:
                callcontext.reset(fields)


def _security_event(exc: Exception, ctx: RequestContext[Any, Any]) -> None:
    """A refused access's security line, for a chain without the audit interceptor (whose
    row writes the line otherwise: api/audit.py)."""
    if isinstance(exc, NotYours):
        reason = security.NOT_YOURS
    elif isinstance(exc, PermissionDenied):
        reason = security.PERMISSION_DENIED
    elif isinstance(exc, Unauthenticated):
        reason = security.UNAUTHENTICATED
    else:
        return
    caller = current_caller.get(None)
    security.refused(
        reason,
        ctx,
        exc.message,
        current_customer.get(None),
        actor=caller.actor if caller else None,
        tenant=caller.tenant_header if caller else None,
    )


def api_interceptors(
    authenticator: TokenAuthenticator,
    metrics: ApiTelemetry,
    after_auth: Sequence[Interceptor] = (),
    guard: Guard | None = None,
    certificates: CertificateAuthenticator | None = None,
) -> list[Interceptor]:
    """The chain app.py serves: tracing, metrics and auth before the body, then `after_auth`
    (tests record decoded requests there), then error mapping around the handler. `guard`:
    the audit log and the rate limits, placed around auth."""
    guard = guard or Guard()
    return [
        TracingInterceptor(),
        MetricsInterceptor(metrics),
        # failed-auth throttle, audit, auth, customer rate limit, the caller for the audit
        *([SourceThrottle(guard.failed_auth, metrics)] if guard.failed_auth is not None else []),
        AuditInterceptor(guard.audit),
        AuthInterceptor(authenticator, metrics, certificates),
        *([CustomerRateLimit(guard.customers, metrics)] if guard.customers is not None else []),
        AuditCaller(),
        *after_auth,
        ErrorsInterceptor(metrics),
    ]


@dataclass(frozen=True)
class Guard:
    """Where audit rows go, and the rate limits (None: off)."""

    audit: Audit | None = None
    customers: CustomerLimits | None = None
    failed_auth: FailedAuthLimits | None = None

"""Connect interceptors: request metrics, authentication, error mapping, and their order.

Refusals are counted where they happen (core/telemetry.py): a refused token in the auth
interceptor (by reason), a refused access in the errors interceptor (permission_denied, and
another customer's VM, which the caller is told is not_found: core.errors.NotOwned).

The order is the point. connectrpc runs the *leading* metadata interceptors (those that see
only headers) before it reads or decodes the request body, and everything from the first
message interceptor on after decoding. Metrics and authentication are metadata
interceptors at the front, so a call without a valid bearer token is answered from its
headers alone: its body is never read, buffered or parsed, whatever it claims to hold.
(Rejecting before the body is read used to drop the whole HTTP/2 connection under
hypercorn; api/h2_fixes.py makes the frames still arriving for the answered stream harmless.)
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from contextvars import Token
from typing import Any

from connectrpc.errors import ConnectError
from connectrpc.interceptor import Interceptor
from connectrpc.request import RequestContext

from metald.api.auth import TokenAuthenticator, TokenRefused, current_customer
from metald.api.errors import to_connect_error
from metald.core.errors import NotOwned, PermissionDenied
from metald.core.telemetry import ApiTelemetry


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
    """The bearer token to the customer of the call, from the headers, before the body."""

    def __init__(self, authenticator: TokenAuthenticator, metrics: ApiTelemetry) -> None:
        self._auth = authenticator
        self._metrics = metrics

    async def on_start(self, ctx: RequestContext[Any, Any]) -> Token[str]:
        try:
            customer = self._auth.customer_for(ctx.request_headers.get("authorization"))
        except Exception as exc:
            if isinstance(exc, TokenRefused):
                self._metrics.auth_refused(exc.reason)
            raise to_connect_error(exc) from None
        # Set in the request's own task: the handler, awaited by the same task, sees it.
        return current_customer.set(customer)

    async def on_end(
        self, token: Token[str], ctx: RequestContext[Any, Any], error: Exception | None, /
    ) -> None:
        current_customer.reset(token)


class ErrorsInterceptor:
    """Every exception of a handler becomes its Connect code (`internal` with no detail for
    anything that is not a MetaldError); refused accesses are counted."""

    def __init__(self, metrics: ApiTelemetry) -> None:
        self._metrics = metrics

    async def intercept_unary(
        self,
        call_next: Callable[[Any, RequestContext[Any, Any]], Awaitable[Any]],
        request: Any,
        ctx: RequestContext[Any, Any],
        /,
    ) -> Any:
        try:
            return await call_next(request, ctx)
        except Exception as exc:
            if isinstance(exc, PermissionDenied | NotOwned):
                self._metrics.access_refused(ctx.method.name)
            raise to_connect_error(exc) from None


def api_interceptors(
    authenticator: TokenAuthenticator,
    metrics: ApiTelemetry,
    after_auth: Sequence[Interceptor] = (),
) -> list[Interceptor]:
    """The chain app.py serves: metrics and auth before the body, then `after_auth` (tests
    record decoded requests there), then error mapping around the handler."""
    return [
        MetricsInterceptor(metrics),
        AuthInterceptor(authenticator, metrics),
        *after_auth,
        ErrorsInterceptor(metrics),
    ]

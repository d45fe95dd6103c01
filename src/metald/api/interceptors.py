"""Connect interceptors: request metrics, authentication, error mapping, and their order.

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

from metald.api.auth import TokenAuthenticator, current_customer
from metald.api.errors import to_connect_error
from metald.api.metrics import ApiMetrics


class MetricsInterceptor:
    """Counts every call, including those refused before decoding, by method and code."""

    def __init__(self, metrics: ApiMetrics) -> None:
        self._metrics = metrics

    async def on_start(self, ctx: RequestContext[Any, Any]) -> float:
        return time.perf_counter()

    async def on_end(
        self, started: float, ctx: RequestContext[Any, Any], error: Exception | None, /
    ) -> None:
        code = "ok"
        if error is not None:
            code = error.code.name.lower() if isinstance(error, ConnectError) else "unknown"
        self._metrics.observe_request(ctx.method.name, code, time.perf_counter() - started)


class AuthInterceptor:
    """The bearer token to the customer of the call, from the headers, before the body."""

    def __init__(self, authenticator: TokenAuthenticator) -> None:
        self._auth = authenticator

    async def on_start(self, ctx: RequestContext[Any, Any]) -> Token[str]:
        try:
            customer = self._auth.customer_for(ctx.request_headers.get("authorization"))
        except Exception as exc:
            raise to_connect_error(exc) from None
        # Set in the request's own task: the handler, awaited by the same task, sees it.
        return current_customer.set(customer)

    async def on_end(
        self, token: Token[str], ctx: RequestContext[Any, Any], error: Exception | None, /
    ) -> None:
        current_customer.reset(token)


class ErrorsInterceptor:
    """Every exception of a handler becomes its Connect code (`internal` with no detail for
    anything that is not a MetaldError)."""

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
            raise to_connect_error(exc) from None


def api_interceptors(
    authenticator: TokenAuthenticator,
    metrics: ApiMetrics,
    after_auth: Sequence[Interceptor] = (),
) -> list[Interceptor]:
    """The chain app.py serves: metrics and auth before the body, then `after_auth` (tests
    record decoded requests there), then error mapping around the handler."""
    return [
        MetricsInterceptor(metrics),
        AuthInterceptor(authenticator),
        *after_auth,
        ErrorsInterceptor(),
    ]

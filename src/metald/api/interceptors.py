"""Connect interceptors: authentication, error mapping, request metrics."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext

from metald.api.auth import TokenAuthenticator, current_customer
from metald.api.errors import to_connect_error
from metald.api.metrics import ApiMetrics


class AuthAndErrorsInterceptor:
    """Runs after the request is decoded.

    Authentication happens here rather than in a metadata interceptor because rejecting a
    call before its body is read drops the whole HTTP/2 connection under hypercorn
    (notes/connect-stack.md); the body is bounded by read_max_bytes either way.
    """

    def __init__(self, authenticator: TokenAuthenticator) -> None:
        self._auth = authenticator

    async def intercept_unary(
        self,
        call_next: Callable[[Any, RequestContext[Any, Any]], Awaitable[Any]],
        request: Any,
        ctx: RequestContext[Any, Any],
        /,
    ) -> Any:
        try:
            customer = self._auth.customer_for(ctx.request_headers.get("authorization"))
            token = current_customer.set(customer)
            try:
                return await call_next(request, ctx)
            finally:
                current_customer.reset(token)
        except Exception as exc:
            raise to_connect_error(exc) from None


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

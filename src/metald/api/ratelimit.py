"""Rate limits at the API's door: per-customer token buckets and per-source throttling of
failed authentication (core/ratelimit.py holds the buckets).

Both are leading metadata interceptors, so a refused call is answered from its headers: its
body is never read. `SourceThrottle` runs before authentication: a source address (an IPv4
address, an IPv6 /64) that has used up its failed-authentication bucket is refused before
its token is even looked at; every call that then fails authentication takes a token from
its source's bucket. `CustomerRateLimit` runs right after authentication: the caller's
customer (an operator without one: its actor) takes a token per call, `mutating_cost` for
a mutating call.

Over a limit the answer is `resource_exhausted` with when to retry, given three ways (the
Connect error details are what clients that speak them read; the header what plain HTTP
clients do): the message ("... retry in 0.35 s"), a `google.rpc.RetryInfo` error detail
(Connect's `details`, gRPC's `grpc-status-details-bin`), and a `Retry-After` response
header in whole seconds, rounded up. Refusals are counted in
metald_rate_limit_refusals_total by reason (customer, auth_failures), never by customer.
"""

from __future__ import annotations

import math
from typing import Any

from connectrpc.code import Code
from connectrpc.errors import ConnectError, ErrorDetail
from connectrpc.request import RequestContext
from google.protobuf.duration_pb2 import Duration
from google.rpc.error_details_pb2 import RetryInfo
from protobuf.wkt import Any as AnyMessage

from metald.api import security
from metald.api.audit import MUTATING
from metald.api.auth import current_caller
from metald.core.ratelimit import CustomerLimits, FailedAuthLimits, source_key
from metald.core.telemetry import ApiTelemetry

CUSTOMER = "customer"
AUTH_FAILURES = "auth_failures"
REASONS = (CUSTOMER, AUTH_FAILURES)


def exhausted(ctx: RequestContext[Any, Any], wait: float, what: str) -> ConnectError:
    """resource_exhausted with the retry hint (message, RetryInfo, Retry-After)."""
    nanos = max(1, math.ceil(wait * 1e9))
    delay = Duration(seconds=nanos // 10**9, nanos=nanos % 10**9)
    ctx.response_headers["retry-after"] = str(max(1, math.ceil(wait)))
    return ConnectError(
        Code.RESOURCE_EXHAUSTED,
        f"{what}: retry in {wait:.2f} s",
        details=[_retry_info(delay)],
    )


def _retry_info(delay: Duration) -> ErrorDetail:
    # connectrpc's details are protobuf-py messages; RetryInfo is google.protobuf's, so it
    # goes in as the Any that carries its bytes (what the wire holds either way).
    packed = RetryInfo(retry_delay=delay).SerializeToString()
    return ErrorDetail(
        AnyMessage(type_url="type.googleapis.com/google.rpc.RetryInfo", value=packed)
    )


class SourceThrottle:
    """Failed authentication per source address (before the auth interceptor)."""

    def __init__(self, limits: FailedAuthLimits, metrics: ApiTelemetry) -> None:
        self._limits = limits
        self._metrics = metrics

    async def on_start(self, ctx: RequestContext[Any, Any]) -> str:
        source = source_key(ctx.client_address)
        wait = self._limits.blocked(source)
        if wait > 0:
            self._metrics.rate_limited(AUTH_FAILURES)
            raise exhausted(ctx, wait, "too many failed authentications from this address")
        return source

    async def on_end(
        self, source: str, ctx: RequestContext[Any, Any], error: Exception | None, /
    ) -> None:
        unauthenticated = isinstance(error, ConnectError) and error.code is Code.UNAUTHENTICATED
        if unauthenticated and self._limits.failed(source):
            # Once per episode (its calls are refused before auth until it refills).
            security.throttled(source, ctx)


class CustomerRateLimit:
    """Calls per customer (right after the auth interceptor)."""

    def __init__(self, limits: CustomerLimits, metrics: ApiTelemetry) -> None:
        self._limits = limits
        self._metrics = metrics

    async def on_start(self, ctx: RequestContext[Any, Any]) -> None:
        caller = current_caller.get(None)
        if caller is None:
            return
        key = caller.customer_id or caller.actor
        wait = self._limits.take(key, ctx.method.name in MUTATING)
        if wait > 0:
            self._metrics.rate_limited(CUSTOMER)
            raise exhausted(ctx, wait, "rate limit exceeded")

    async def on_end(
        self, started: None, ctx: RequestContext[Any, Any], error: Exception | None, /
    ) -> None:
        pass

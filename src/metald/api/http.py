"""The one ASGI application: the Connect service plus GET /health and GET /metrics.

Every RPC's body must arrive within a deadline counted from its headers. Without one, a
client that sends headers and then a byte now and then holds a request (and, on HTTP/2, a
stream of its connection, with what it sent so far) open for ever; hypercorn's own timeouts
cover only idle connections. An unauthenticated call never gets this far into its body:
the auth interceptor answers it from its headers (api/interceptors.py).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from connectrpc.code import Code
from connectrpc.errors import ConnectError

from metald.api.health import Health
from metald.api.metrics import ApiMetrics
from metald.core.ports import Store

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


DEFAULT_BODY_TIMEOUT = 10.0


class MetaldASGI:
    def __init__(
        self,
        connect_app: ASGIApp,
        health: Health,
        metrics: ApiMetrics,
        store: Store,
        body_timeout: float = DEFAULT_BODY_TIMEOUT,
    ):
        self._connect = connect_app
        self._health = health
        self._metrics = metrics
        self._store = store
        self._body_timeout = body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            # Start-up and shutdown are done by app.py around the server, not here.
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        path = scope.get("path", "")
        if scope["type"] == "http" and path in ("/health", "/metrics"):
            if scope["method"] not in ("GET", "HEAD"):
                await _respond(send, 405, b"method not allowed\n", "text/plain")
            elif path == "/health":
                report = await self._health.report()
                body = json.dumps(report.body).encode()
                await _respond(send, 200 if report.ok else 503, body, "application/json")
            else:
                counts = await self._store.count_by_state()
                await _respond(
                    send,
                    200,
                    self._metrics.render(counts),
                    "text/plain; version=0.0.4; charset=utf-8",
                )
            return
        if scope["type"] == "http":
            receive = BodyDeadline(receive, self._body_timeout)
        await self._connect(scope, receive, send)


class BodyDeadline:
    """receive() for one request whose body must be complete within `seconds` of now.

    A body still incomplete at the deadline fails the read with `deadline_exceeded`, which
    connectrpc answers in the call's own protocol; what the client sends after that is
    dropped (HTTP/2: api/h2_fixes.py) or ends the connection (HTTP/1.1). Once the body is
    complete (or the client gone), messages pass through untouched: connectrpc keeps
    reading to notice a disconnect while the handler runs.
    """

    def __init__(self, receive: Receive, seconds: float) -> None:
        self._receive = receive
        self._seconds = seconds
        self._deadline = asyncio.get_running_loop().time() + seconds
        self._done = False

    async def __call__(self) -> dict[str, Any]:
        if self._done:
            return await self._receive()
        try:
            async with asyncio.timeout_at(self._deadline):
                message = await self._receive()
        except TimeoutError:
            raise ConnectError(
                Code.DEADLINE_EXCEEDED,
                f"the request body did not arrive within {self._seconds:g} s",
            ) from None
        if message["type"] != "http.request" or not message.get("more_body", False):
            self._done = True
        return message


async def _respond(send: Send, status: int, body: bytes, content_type: str) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type.encode()),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})

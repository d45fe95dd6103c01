"""The one ASGI application: the Connect service plus GET /health and GET /metrics."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from metald.api.health import Health
from metald.api.metrics import ApiMetrics
from metald.core.ports import Store

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class MetaldASGI:
    def __init__(self, connect_app: ASGIApp, health: Health, metrics: ApiMetrics, store: Store):
        self._connect = connect_app
        self._health = health
        self._metrics = metrics
        self._store = store

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
        await self._connect(scope, receive, send)


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

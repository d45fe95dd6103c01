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
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from connectrpc.code import Code
from connectrpc.errors import ConnectError

from metald.api import mtls
from metald.api.health import Health
from metald.core.telemetry import EXPOSITION_CONTENT_TYPE, ApiTelemetry

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = logging.getLogger(__name__)


DEFAULT_BODY_TIMEOUT = 10.0


class MetaldASGI:
    def __init__(
        self,
        connect_app: ASGIApp,
        health: Health,
        metrics: ApiTelemetry,
        body_timeout: float = DEFAULT_BODY_TIMEOUT,
        more_services: Mapping[str, ASGIApp] | None = None,
    ):
        """`connect_app` serves VmService (and answers any other path); `more_services`:
        another Connect application by its path (`/metald.admin.v1.AdminService`)."""
        self._connect = connect_app
        self._services = {f"{path}/": app for path, app in (more_services or {}).items()}
        self._health = health
        self._metrics = metrics
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
        if scope["type"] == "http":
            # The client certificate, for the auth interceptor (this request's own task).
            if (peer := mtls.peer_from_scope(scope)) is not None:
                mtls.current_peer.set(peer)
            # Every HTTP request, /health too: none of them may leave a body unread.
            http1 = scope.get("http_version", "1.1") in ("1.0", "1.1")
            guarded = GuardedRequest(receive, send, self._body_timeout, http1=http1)
            receive, send = guarded.receive, guarded.send
        path = scope.get("path", "")
        if scope["type"] == "http" and path in ("/health", "/metrics"):
            if scope["method"] not in ("GET", "HEAD"):
                await _respond(send, 405, b"method not allowed\n", "text/plain")
            elif path == "/health":
                report = await self._health.report()
                body = json.dumps(report.body).encode()
                await _respond(send, 200 if report.ok else 503, body, "application/json")
            else:
                body = await self._metrics.exposition()
                await _respond(send, 200, body, EXPOSITION_CONTENT_TYPE)
            return
        for prefix, app in self._services.items():
            if path.startswith(prefix):
                await app(scope, receive, send)
                return
        await self._connect(scope, receive, send)


class GuardedRequest:
    """receive() and send() of one HTTP request: a deadline on its body, and no stall on a
    body the answer did not wait for.

    Deadline: a body still incomplete `seconds` after the headers fails the read with
    `deadline_exceeded`, which connectrpc answers in the call's own protocol.

    Drain: hypercorn hands the body over through a queue of ten messages per call, and
    blocks the connection's reader when it is full. A call answered before its body was
    read (no valid token, the deadline, a body over the size limit) leaves nobody to empty
    that queue: the reader, and with it every call of the connection, waits for ever, and
    so does the answer's own end (hypercorn queues a disconnect message there too). So
    once an answer starts while the body is unread, a task reads the rest of the body and
    drops it, until the body ends or hypercorn reports the call closed (always, at the end
    of the answer or of the connection). On HTTP/2 what arrives after that is dropped by
    api/h2_fixes.py. HTTP/1.1 cannot take a next request on a connection whose request
    body was not read to its end, so hypercorn closes it after such an answer: the answer
    says so (`connection: close`), or a client that keeps connections alive sends its next
    request into the closing connection and loses it ("server disconnected without a
    response", one refused call in five in tests/unit/test_prometheus_metrics.py).

    metald's RPCs are unary: connectrpc reads a unary body to its end before the handler
    runs, so an answer that starts before the body ended never reads the rest of it.
    """

    def __init__(
        self, receive: Receive, send: Send, seconds: float, *, http1: bool = False
    ) -> None:
        self._receive = receive
        self._http1 = http1
        self._send = send
        self._seconds = seconds
        self._deadline = asyncio.get_running_loop().time() + seconds
        self._body_done = False
        self._closed = False  # hypercorn reported the call closed; nothing more will come
        self._reading = False
        self._draining = False

    async def receive(self) -> dict[str, Any]:
        if self._closed:
            return {"type": "http.disconnect"}
        if self._body_done:
            return await self._receive()
        self._reading = True
        try:
            async with asyncio.timeout_at(self._deadline):
                message = await self._receive()
        except TimeoutError:
            raise ConnectError(
                Code.DEADLINE_EXCEEDED,
                f"the request body did not arrive within {self._seconds:g} s",
            ) from None
        finally:
            self._reading = False
        self._note(message)
        return message

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start" and not (
            self._body_done or self._reading or self._draining
        ):
            self._draining = True
            task = asyncio.create_task(self._drain())
            _DRAINS.add(task)
            task.add_done_callback(_DRAINS.discard)
            if self._http1:
                headers = list(message.get("headers", ()))
                headers.append((b"connection", b"close"))
                message = {**message, "headers": headers}
        await self._send(message)

    def _note(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.disconnect":
            self._closed = self._body_done = True
        elif not message.get("more_body", False):
            self._body_done = True

    async def _drain(self) -> None:
        try:
            while not self._body_done:
                self._note(await self._receive())
        except Exception:  # nothing to report to: the call is answered
            log.debug("draining an answered request failed", exc_info=True)


# Drain tasks in flight (asyncio keeps only weak references to tasks).
_DRAINS: set[asyncio.Task[None]] = set()


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

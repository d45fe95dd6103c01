"""The dedicated Prometheus listener: GET /metrics on UNKEY_METALD_OTEL_PROMETHEUS_INTERFACE
and _PORT (127.0.0.1:9464 by default, the existing metald's), beside the API port.

Why a listener of its own: operators scrape a fixed local port that does not move with the
API's address, TLS or auth, as with the existing metald. Why not hypercorn: this serves one
small document to one scraper; a few lines of plain HTTP/1.1 on asyncio's streams in the
daemon's own loop cost nothing and cannot disturb the API server's settings. No auth, so
start-up refuses a non-loopback interface unless the operator allows it (app.check_exposure).

Every connection gets one answer and is closed. What it may cost is bounded: a request
head of at most 8 KiB that must arrive within a few seconds, a body is never read, an
exchange ends within half a minute, and at most a few connections are served at once (the
rest are closed at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from metald.core.telemetry import EXPOSITION_CONTENT_TYPE

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 8192
HEAD_TIMEOUT = 5.0  # for the request head to arrive
ANSWER_TIMEOUT = 30.0  # for the whole exchange (a client that never reads its answer)
MAX_CONNECTIONS = 16

Render = Callable[[], Awaitable[bytes]]


class MetricsListener:
    def __init__(self, render: Render) -> None:
        self._render = render
        self._server: asyncio.Server | None = None
        self._active: set[asyncio.StreamWriter] = set()  # connections being served

    @property
    def port(self) -> int:
        """The port listened on (the one asked for, or the one given for port 0)."""
        assert self._server is not None and self._server.sockets
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self, host: str, port: int) -> None:
        """Listen (OSError if the address cannot be had: the caller reports it)."""
        self._server = await asyncio.start_server(
            self._serve, host, port, limit=MAX_HEAD_BYTES, backlog=32
        )

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        # Not cancelled (asyncio 3.11 logs a cancelled connection task as an error): their
        # connections closed, each ends at its next read or write.
        for writer in list(self._active):
            writer.close()
        await self._server.wait_closed()
        self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if len(self._active) >= MAX_CONNECTIONS:
                return
            self._active.add(writer)
            async with asyncio.timeout(ANSWER_TIMEOUT):
                await self._answer(reader, writer)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass  # a client that went away or sent too much: nothing to tell it
        except Exception:
            log.exception("the metrics listener failed to answer")
        finally:
            self._active.discard(writer)
            writer.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with asyncio.timeout(HEAD_TIMEOUT):
            head = await reader.readuntil(b"\r\n\r\n")
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            await _send(writer, 400, b"bad request\n", "text/plain", head_only=False)
            return
        method, target = parts[0], parts[1]
        path = target.split("?", 1)[0]
        if path != "/metrics":
            await _send(writer, 404, b"only /metrics here\n", "text/plain", method == "HEAD")
        elif method not in ("GET", "HEAD"):
            await _send(writer, 405, b"method not allowed\n", "text/plain", head_only=False)
        else:
            body = await self._render()
            await _send(writer, 200, body, EXPOSITION_CONTENT_TYPE, method == "HEAD")


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}


async def _send(
    writer: asyncio.StreamWriter, status: int, body: bytes, content_type: str, head_only: bool
) -> None:
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    writer.write(head if head_only else head + body)
    await writer.drain()

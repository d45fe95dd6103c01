"""Two per-request costs of hypercorn 0.18's connection handler, removed at start-up.

Profiled with py-spy under wrk (docs/performance.md, "The server"); neither changes what goes
on the wire or when a connection is closed.

1. Writes. Every piece of an answer is written to the socket as hypercorn makes it: on
   HTTP/1.1 the status line and headers, then the body (two send() syscalls per answer);
   on HTTP/2 each batch of frames. Here the bytes a connection produces during one turn of
   the event loop are gathered and written once, at the end of that turn (call_soon), in
   order. Back-pressure is kept: once what is gathered and what the transport holds pass
   its high-water mark, it is written and the sender waits for the socket, as before. A
   close first writes what is gathered.

2. The idle timeout. hypercorn restarts a task per connection at the end of every request
   (and cancels it, waiting for the cancellation, at the start of the next): two task
   switches and a task per request, and on HTTP/2 per stream. Here one timer per connection
   is moved instead (loop.call_later), and one task per connection closes it when the server
   shuts down while it is idle, as hypercorn's task did.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from hypercorn.asyncio.tcp_server import TCPServer
from hypercorn.events import Closed, Event, RawData, Updated

_applied = False


def apply() -> None:
    global _applied
    if _applied:
        return
    protocol_send_original: Callable[[Any, Event], Awaitable[None]] = TCPServer.protocol_send
    close_original: Callable[[Any], Awaitable[None]] = TCPServer._close

    async def protocol_send(self: Any, event: Event) -> None:
        if isinstance(event, RawData):
            pending = _gather(self, event.data)
            if len(pending) + self.writer.transport.get_write_buffer_size() > _HIGH_WATER:
                _flush(self)
                try:
                    await self.writer.drain()
                except (ConnectionError, RuntimeError):
                    await self.protocol.handle(Closed())
        elif isinstance(event, Updated):
            if not getattr(self, "_metald_timing", False):
                # hypercorn's own idle task, started with the connection, stops here for good.
                self._metald_timing = True
                await self.idle_task.stop()
            _idle(self, event.idle)
        else:
            if isinstance(event, Closed):
                _flush(self)
            await protocol_send_original(self, event)

    async def close(self: Any) -> None:
        _flush(self)
        _cancel_timer(self)
        watcher = getattr(self, "_metald_shutdown_watch", None)
        if watcher is not None:
            watcher.cancel()
        await close_original(self)

    TCPServer.protocol_send = protocol_send  # type: ignore[method-assign]
    TCPServer._close = close  # type: ignore[method-assign]
    _applied = True


# A transport holding more than this waits for the socket before more is produced (the
# asyncio default high-water mark).
_HIGH_WATER = 64 * 1024


def _gather(server: Any, data: bytes) -> bytearray:
    pending: bytearray | None = getattr(server, "_metald_pending", None)
    if pending is None:
        pending = server._metald_pending = bytearray()
    if not pending:
        server.loop.call_soon(_flush, server)
    pending += data
    return pending


def _flush(server: Any) -> None:
    pending: bytearray | None = getattr(server, "_metald_pending", None)
    if pending:
        data = bytes(pending)
        pending.clear()
        try:
            server.writer.write(data)
        except (ConnectionError, RuntimeError):  # closed meanwhile: nobody to send it to
            return


def _idle(server: Any, idle: bool) -> None:
    _cancel_timer(server)
    if not idle:
        return
    if server.context.terminated.is_set():
        _spawn_close(server)
        return
    if getattr(server, "_metald_shutdown_watch", None) is None:
        server._metald_shutdown_watch = server.loop.create_task(_close_at_shutdown(server))
    server._metald_idle_timer = server.loop.call_later(
        server.config.keep_alive_timeout, _close_idle, server
    )


def _cancel_timer(server: Any) -> None:
    timer: asyncio.TimerHandle | None = getattr(server, "_metald_idle_timer", None)
    if timer is not None:
        timer.cancel()
        server._metald_idle_timer = None


def _close_idle(server: Any) -> None:
    server._metald_idle_timer = None
    _spawn_close(server)


def _spawn_close(server: Any) -> None:
    task = server.loop.create_task(server._initiate_server_close())
    _CLOSING.add(task)
    task.add_done_callback(_CLOSING.discard)


async def _close_at_shutdown(server: Any) -> None:
    """hypercorn's idle task also closed an idle connection as soon as the server shut down."""
    await server.context.terminated.wait()
    if getattr(server, "_metald_idle_timer", None) is not None:  # idle now
        _cancel_timer(server)
        _spawn_close(server)


_CLOSING: set[asyncio.Task[None]] = set()

"""api/server.py with api/hypercorn_tuning.py: what the connection handling must still do
now that an answer's writes are gathered and the idle timeout is a timer. A real hypercorn
on a free loopback port, a raw socket as the client."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from metald.api import server

BIG = 1024 * 1024  # well over the transport's high-water mark: the back-pressure path
CHUNKS = 64


def _chunk(i: int) -> bytes:
    return bytes([i]) * 16384


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    path = scope["path"]
    if path == "/chunks":  # many pieces in one event-loop turn, more than the high-water mark
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for i in range(CHUNKS):
            await send({"type": "http.response.body", "body": _chunk(i), "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    if path == "/slow":
        await asyncio.sleep(1.5)  # longer than the idle timeout below
    body = b"x" * BIG if path == "/big" else path.encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def serving(
    idle_timeout: float,
) -> AsyncIterator[tuple[int, asyncio.Event, asyncio.Task[None]]]:
    port = _port()
    stop = asyncio.Event()
    options = server.ServerOptions(address="127.0.0.1", port=port, idle_timeout=idle_timeout)
    task = asyncio.create_task(server.serve(app, options, stop.wait))
    for _ in range(200):
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        w.close()
        break
    try:
        yield port, stop, task
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def _get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str) -> bytes:
    writer.write(f"GET {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    assert head.startswith(b"HTTP/1.1 200"), head
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return await asyncio.wait_for(reader.readexactly(length), 30)


async def test_answers_on_one_connection_arrive_whole_and_in_order() -> None:
    async with serving(idle_timeout=30) as (port, _, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for path in ("/a", "/big", "/b", "/big", "/c"):
            body = await _get(reader, writer, path)
            assert body == (b"x" * BIG if path == "/big" else path.encode())
        writer.close()


async def test_a_chunked_answer_sent_in_one_turn_arrives_whole() -> None:
    async with serving(idle_timeout=30) as (port, _, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /chunks HTTP/1.1\r\nhost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        assert b"transfer-encoding: chunked" in head.lower(), head
        body = b""
        while True:
            size = int((await asyncio.wait_for(reader.readuntil(b"\r\n"), 30)).strip(), 16)
            body += await asyncio.wait_for(reader.readexactly(size + 2), 30)
            body = body[:-2]
            if size == 0:
                break
        assert body == b"".join(_chunk(i) for i in range(CHUNKS))
        assert await _get(reader, writer, "/after") == b"/after"
        writer.close()


async def test_an_idle_connection_is_closed_after_the_idle_timeout() -> None:
    async with serving(idle_timeout=0.5) as (port, _, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await _get(reader, writer, "/a") == b"/a"
        # Closed by the server: EOF (the bound is generous; the point is that it comes).
        assert await asyncio.wait_for(reader.read(), 30) == b""
        writer.close()


async def test_a_call_in_flight_outlasts_the_idle_timeout() -> None:
    async with serving(idle_timeout=0.5) as (port, _, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await _get(reader, writer, "/a") == b"/a"
        assert await _get(reader, writer, "/slow") == b"/slow"  # the connection stayed open
        assert await _get(reader, writer, "/b") == b"/b"
        writer.close()


async def test_shutdown_closes_idle_connections() -> None:
    async with serving(idle_timeout=3600) as (port, stop, task):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await _get(reader, writer, "/a") == b"/a"
        stop.set()
        assert await asyncio.wait_for(reader.read(), 30) == b""
        await asyncio.wait_for(task, 30)  # and the server ends without waiting for the hour
        writer.close()

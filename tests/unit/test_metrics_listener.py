"""The dedicated metrics listener (api/metrics_listener.py) on a free loopback port: GET and
HEAD /metrics, everything else refused, one answer per connection, bounded heads, and
start-up refusals for a taken port or a non-loopback interface (app.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import pytest

from metald.api import metrics_listener
from metald.api.metrics_listener import MAX_HEAD_BYTES, MetricsListener
from metald.app import StartupError, check_exposure, start_metrics_listener
from metald.config import load_settings

BODY = b"# HELP metald_x x\n# TYPE metald_x gauge\nmetald_x 1.0\n"


async def _render() -> bytes:
    return BODY


async def _ask(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        answer = await reader.read()  # until the listener closes the connection
    except ConnectionResetError:
        answer = b""  # closed with our request unread: no answer
    writer.close()
    with contextlib.suppress(ConnectionResetError):
        await writer.wait_closed()
    return answer


async def _with_listener(*requests: bytes) -> list[bytes]:
    listener = MetricsListener(_render)
    await listener.start("127.0.0.1", 0)
    try:
        return [await _ask(listener.port, r) for r in requests]
    finally:
        await listener.close()


def test_get_and_head_metrics() -> None:
    get, head, query = asyncio.run(
        _with_listener(
            b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
            b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /metrics?name[]=x HTTP/1.0\r\n\r\n",
        )
    )
    status, _, body = get.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Content-Type: text/plain; version=0.0.4; charset=utf-8" in status
    assert f"Content-Length: {len(BODY)}".encode() in status
    assert b"Connection: close" in status
    assert body == BODY
    assert head.startswith(b"HTTP/1.1 200 OK") and head.endswith(b"\r\n\r\n")
    assert query.partition(b"\r\n\r\n")[2] == BODY


def test_anything_else_is_refused() -> None:
    answers = asyncio.run(
        _with_listener(
            b"POST /metrics HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
            b"GET /health HTTP/1.1\r\n\r\n",
            b"GET /vmprovisioner.v1.VmService/ListVms HTTP/1.1\r\n\r\n",
            b"nonsense\r\n\r\n",
        )
    )
    assert [a.split(b"\r\n", 1)[0] for a in answers] == [
        b"HTTP/1.1 405 Method Not Allowed",
        b"HTTP/1.1 404 Not Found",
        b"HTTP/1.1 404 Not Found",
        b"HTTP/1.1 400 Bad Request",
    ]


def test_an_oversized_head_is_dropped_and_the_listener_serves_on() -> None:
    huge = b"GET /metrics HTTP/1.1\r\nX: " + b"a" * (2 * MAX_HEAD_BYTES) + b"\r\n\r\n"
    dropped, served = asyncio.run(_with_listener(huge, b"GET /metrics HTTP/1.1\r\n\r\n"))
    assert dropped == b""
    assert served.partition(b"\r\n\r\n")[2] == BODY


def test_a_taken_port_stops_start_up_naming_the_settings() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = load_settings(otel_prometheus_port=port)
        with pytest.raises(StartupError) as refused:
            asyncio.run(start_metrics_listener(settings, _render))
    message = str(refused.value)
    assert f"127.0.0.1:{port}" in message
    assert "UNKEY_METALD_OTEL_PROMETHEUS_ENABLED=false" in message


def test_a_non_loopback_interface_is_refused_unless_allowed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with pytest.raises(StartupError) as refused:
        check_exposure(load_settings(otel_prometheus_interface="0.0.0.0"))
    assert "UNKEY_METALD_OTEL_PROMETHEUS_INTERFACE=0.0.0.0 is not loopback" in str(refused.value)
    assert "UNKEY_METALD_OTEL_PROMETHEUS_ALLOW_REMOTE=true" in str(refused.value)
    # Disabled, nothing listens: nothing to refuse.
    check_exposure(
        load_settings(otel_prometheus_interface="0.0.0.0", otel_prometheus_enabled=False)
    )
    with caplog.at_level(logging.WARNING, logger="metald"):
        check_exposure(
            load_settings(otel_prometheus_interface="0.0.0.0", otel_prometheus_allow_remote=True)
        )
    assert any("metrics listener on 0.0.0.0 is not loopback" in r.message for r in caplog.records)
    check_exposure(load_settings(otel_prometheus_interface="::1"))


def test_silent_clients_are_dropped_and_their_number_is_capped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(metrics_listener, "HEAD_TIMEOUT", 0.5)
    monkeypatch.setattr(metrics_listener, "MAX_CONNECTIONS", 3)

    async def run() -> tuple[list[bytes], bytes, bytes]:
        listener = MetricsListener(_render)
        await listener.start("127.0.0.1", 0)
        try:
            silent = [await asyncio.open_connection("127.0.0.1", listener.port) for _ in range(3)]
            for _ in range(3000):  # until all three are accepted and waited for
                if len(listener._active) == 3:
                    break
                await asyncio.sleep(0.01)
            over = await _ask(listener.port, b"GET /metrics HTTP/1.1\r\n\r\n")
            # The silent ones are closed by the listener once their head is late.
            dropped = [await reader.read() for reader, _ in silent]
            for _, writer in silent:
                writer.close()
            served = await _ask(listener.port, b"GET /metrics HTTP/1.1\r\n\r\n")
            return dropped, over, served
        finally:
            await listener.close()

    dropped, over, served = asyncio.run(run())
    assert dropped == [b"", b"", b""]
    assert over == b""  # over the cap: closed without an answer
    assert served.partition(b"\r\n\r\n")[2] == BODY

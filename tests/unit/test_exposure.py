"""Start-up refuses what would hand the host to whoever reaches the port (app.check_exposure),
unless an explicit insecure setting allows it, logged as a warning at every start; and a
request's body has a deadline and is drained once answered (api/http.GuardedRequest)."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError

from metald.api.auth import is_loopback_only
from metald.api.http import GuardedRequest
from metald.app import StartupError, check_exposure
from metald.config import load_settings


@pytest.mark.parametrize(
    "address", ["127.0.0.1", "127.3.2.1", "::1", "[::1]", " 127.0.0.1 ", "localhost"]
)
def test_loopback_addresses(address: str) -> None:
    assert is_loopback_only(address)


@pytest.mark.parametrize(
    "address",
    ["0.0.0.0", "::", "[::]", "10.0.0.1", "192.0.2.1", "fd00::1", "::ffff:10.0.0.1"],
)
def test_addresses_other_hosts_may_reach(address: str) -> None:
    assert not is_loopback_only(address)


def test_dev_tokens_off_loopback_are_refused_naming_what_to_set() -> None:
    settings = load_settings(address="0.0.0.0", auth_dev_tokens=True)
    with pytest.raises(StartupError) as refused:
        check_exposure(settings)
    message = str(refused.value)
    assert "UNKEY_METALD_ADDRESS=0.0.0.0 is not loopback" in message
    for setting in ("UNKEY_METALD_AUTH_TOKENS_FILE", "UNKEY_METALD_AUTH_DEV_TOKENS_INSECURE=true"):
        assert setting in message


def test_dev_tokens_off_loopback_when_allowed_warn(caplog: pytest.LogCaptureFixture) -> None:
    settings = load_settings(address="0.0.0.0", auth_dev_tokens=True, auth_dev_tokens_insecure=True)
    with caplog.at_level(logging.WARNING, logger="metald"):
        check_exposure(settings)
        check_exposure(settings)  # every start
    warnings = [r for r in caplog.records if "development tokens are accepted" in r.message]
    assert len(warnings) == 2 and all(r.levelno == logging.WARNING for r in warnings)


def test_nothing_to_refuse(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="metald"):
        check_exposure(load_settings(address="127.0.0.1", auth_dev_tokens=True))
        check_exposure(load_settings(address="0.0.0.0", auth_dev_tokens=False))
    assert caplog.records == []


@pytest.mark.skipif(os.geteuid() != 0, reason="about running as root")
def test_unjailed_as_root_is_refused_unless_allowed(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(StartupError, match="UNKEY_METALD_ALLOW_UNJAILED_ROOT=true"):
        check_exposure(load_settings(address="127.0.0.1", jailer_enabled=False))
    with caplog.at_level(logging.WARNING, logger="metald"):
        check_exposure(
            load_settings(address="127.0.0.1", jailer_enabled=False, allow_unjailed_root=True)
        )
    assert any("every VMM runs as root" in r.message for r in caplog.records)


class FakeConnection:
    """hypercorn's side of one call: the body messages it has, and what was sent."""

    def __init__(self, *messages: dict[str, Any]) -> None:
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        for message in messages:
            self.queue.put_nowait(message)
        self.sent: list[dict[str, Any]] = []
        self.emptied = asyncio.Event()  # every message was taken

    async def receive(self) -> dict[str, Any]:
        message = await self.queue.get()
        if self.queue.empty():
            self.emptied.set()
        return message

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)


def _part(body: bytes, more: bool = True) -> dict[str, Any]:
    return {"type": "http.request", "body": body, "more_body": more}


def test_a_body_that_does_not_arrive_in_time_is_deadline_exceeded() -> None:
    async def run() -> ConnectError:
        connection = FakeConnection(_part(b"a"))  # and then nothing
        guarded = GuardedRequest(connection.receive, connection.send, 0.05)
        assert (await guarded.receive())["body"] == b"a"
        with pytest.raises(ConnectError) as cut:
            await guarded.receive()
        return cut.value

    error = asyncio.run(run())
    assert error.code is Code.DEADLINE_EXCEEDED
    assert "did not arrive within 0.05 s" in error.message


def test_an_answer_before_the_body_drains_the_rest() -> None:
    async def run() -> FakeConnection:
        connection = FakeConnection(*[_part(b"x")] * 20, _part(b"", more=False))
        guarded = GuardedRequest(connection.receive, connection.send, 60)
        await guarded.send({"type": "http.response.start", "status": 401, "headers": []})
        await guarded.send({"type": "http.response.body", "body": b"{}"})
        await asyncio.wait_for(connection.emptied.wait(), 30)
        return connection

    connection = asyncio.run(run())
    assert [m["type"] for m in connection.sent] == ["http.response.start", "http.response.body"]


def test_a_drain_ends_with_the_call_and_later_reads_see_it_closed() -> None:
    async def run() -> dict[str, Any]:
        connection = FakeConnection(_part(b"x"), {"type": "http.disconnect"})
        guarded = GuardedRequest(connection.receive, connection.send, 60)
        await guarded.send({"type": "http.response.start", "status": 401, "headers": []})
        await asyncio.wait_for(connection.emptied.wait(), 30)
        return await asyncio.wait_for(guarded.receive(), 30)

    assert asyncio.run(run()) == {"type": "http.disconnect"}


def test_a_body_read_whole_is_not_drained() -> None:
    async def run() -> FakeConnection:
        later = {"type": "http.disconnect"}
        connection = FakeConnection(_part(b"x", more=False), later)
        guarded = GuardedRequest(connection.receive, connection.send, 60)
        assert (await guarded.receive())["more_body"] is False
        await guarded.send({"type": "http.response.start", "status": 200, "headers": []})
        await asyncio.sleep(0)  # a drain task, if one were started, would run here
        assert connection.queue.qsize() == 1  # the disconnect is left for the app
        return connection

    asyncio.run(run())


@pytest.mark.parametrize("http1", [True, False])
def test_an_http1_answer_before_the_body_closes_its_connection_and_says_so(http1: bool) -> None:
    """HTTP/1.1 cannot take the next request on a connection whose body was not read, so
    hypercorn closes it: the answer must say `connection: close`, or a keep-alive client
    sends its next request into the closing connection and loses it. HTTP/2 keeps its
    connection (api/h2_fixes.py drops the stream's late frames)."""

    async def run() -> list[Any]:
        connection = FakeConnection(_part(b"x"), _part(b"", more=False))
        guarded = GuardedRequest(connection.receive, connection.send, 60, http1=http1)
        start = {"type": "http.response.start", "status": 401, "headers": [(b"a", b"b")]}
        await guarded.send(start)
        await asyncio.wait_for(connection.emptied.wait(), 30)
        return list(connection.sent[0]["headers"])

    headers = asyncio.run(run())
    assert ((b"connection", b"close") in headers) is http1
    assert (b"a", b"b") in headers


def test_an_answer_after_the_whole_body_keeps_the_connection() -> None:
    async def run() -> list[Any]:
        connection = FakeConnection(_part(b"x", more=False))
        guarded = GuardedRequest(connection.receive, connection.send, 60, http1=True)
        await guarded.receive()
        await guarded.send({"type": "http.response.start", "status": 200, "headers": []})
        return list(connection.sent[0]["headers"])

    assert (b"connection", b"close") not in asyncio.run(run())

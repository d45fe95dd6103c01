"""The API against clients that do not play fair: unauthenticated requests whose bodies never
finish, authenticated ones that stall, too many streams on one connection, and start-up
settings that would expose the host.

The memory bound. An unauthenticated call is answered from its headers (the auth
interceptor runs before connectrpc reads the body), so what it sends afterwards is dropped
as it arrives (api/h2_fixes.py acknowledges it for flow control) or, on HTTP/1.1, ends its
connection. What metald holds for such a client is then its connection, not its bodies: the
asyncio reader's buffer (hypercorn reads 64 KiB at a time), the h2 connection state
(header tables, at most one frame of 16 KiB being parsed) and, for the instant before the
answer, at most hypercorn's app queue of the stream (10 messages of at most one frame).
That is taken here as PER_CONNECTION = 256 KiB, so N connections may grow the daemon by at
most N x 256 KiB, however much they send and for however long. Without auth-before-body the
same flood is read into memory: every stream's body up to UNKEY_METALD_MAX_REQUEST_BYTES, held
until it finishes (here: never), which this test's flood puts at 800 x 256 KiB = 200 MiB.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import h2.errors
import h2.settings
import pytest

from metald.gen.vmprovisioner.v1 import vm_pb2 as pb

from ._hostile import Answer, H2Client, SlowStream, envelope, envelope_prefix, h1_slow_request
from ._support import METALD, MIB, CurlConnect, Daemon, client_env, free_port

KIB = 1024
H1_CONNECTIONS = 100
H2_CONNECTIONS = 100
STREAMS = 8  # per HTTP/2 connection: UNKEY_METALD_HTTP2_MAX_CONCURRENT_STREAMS here
BURST = 256 * KIB  # body bytes each HTTP/2 stream pushes before it stalls for ever
PER_CONNECTION = 256 * KIB
BOUND = (H1_CONNECTIONS + H2_CONNECTIONS) * PER_CONNECTION  # 50 MiB
TOKEN = "dev_customer_acme"
UNAUTHENTICATED = {"connect": "unauthenticated", "grpc": "16"}
H2_PROTOCOLS = ("connect", "grpc", "grpcweb", "connect-json")
H1_PROTOCOLS = ("connect-json", "connect", "grpcweb")


def rss(pid: int) -> int:
    """The daemon's resident set, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def _unauthenticated_code(protocol: str) -> str:
    return UNAUTHENTICATED["grpc" if protocol.startswith("grpc") else "connect"]


def _slow_body(protocol: str, size: int) -> bytes:
    """`size` bytes of a body that claims to be longer (a gRPC message of ~1 MB)."""
    if protocol.startswith("grpc"):
        return envelope_prefix(MIB - 64) + bytes(size - 5)
    return bytes(size)


class Flood:
    """h1 HTTP/1.1 connections and h2 HTTP/2 connections of STREAMS streams each, every
    request unauthenticated (CreateVm) with a body that never ends."""

    def __init__(self, port: int, h1: int, h2: int) -> None:
        self.port, self.h1, self.h2 = port, h1, h2
        self.clients = [H2Client(port) for _ in range(h2)]
        self.answers: list[tuple[str, Answer]] = []
        self._h1_tasks: list[asyncio.Task[Answer]] = []

    async def start(self) -> None:
        """Every request sent; returns once every HTTP/2 burst is on the wire (so the
        daemon has taken it: flow control) or its stream was reset, with every connection
        still open."""
        await asyncio.gather(*(c.connect() for c in self.clients))
        for c in self.clients:
            for i in range(STREAMS):
                protocol = H2_PROTOCOLS[i % len(H2_PROTOCOLS)]
                stream = SlowStream(protocol, "CreateVm", None, _slow_body(protocol, BURST))
                await c.open(stream)
                self.answers.append((protocol, stream.answer))
        for i in range(self.h1):
            protocol = H1_PROTOCOLS[i % len(H1_PROTOCOLS)]
            call = h1_slow_request(
                self.port, protocol, "CreateVm", None, _slow_body(protocol, 4 * KIB), MIB
            )
            self._h1_tasks.append(asyncio.create_task(call))
        await asyncio.gather(*(c.wait(c.burst_done, "end of the burst") for c in self.clients))

    async def answered(self) -> list[tuple[str, Answer]]:
        """Every request's answer (AssertionError if one does not come)."""
        await asyncio.gather(*(c.wait(c.answered, "answer to every stream") for c in self.clients))
        h1 = await asyncio.wait_for(asyncio.gather(*self._h1_tasks), 120)
        protocols = [H1_PROTOCOLS[i % len(H1_PROTOCOLS)] for i in range(self.h1)]
        return self.answers + list(zip(protocols, h1, strict=True))

    async def close(self) -> None:
        for task in self._h1_tasks:
            task.cancel()
        await asyncio.gather(*self._h1_tasks, return_exceptions=True)
        await asyncio.gather(*(c.close() for c in self.clients))


def test_unauthenticated_slow_requests_do_not_grow_memory_beyond_the_bound(
    metald_factory: Callable[..., Daemon],
) -> None:
    daemon = metald_factory(
        UNKEY_METALD_HTTP2_MAX_CONCURRENT_STREAMS=str(STREAMS),
        # Neither deadline is what bounds this: the answered connections stay open while
        # measured, and no unauthenticated body is ever waited for.
        UNKEY_METALD_REQUEST_BODY_TIMEOUT_SECONDS="600",
        UNKEY_METALD_HTTP_IDLE_TIMEOUT_SECONDS="600",
    )
    legit = CurlConnect(daemon.url, TOKEN)

    async def warm_up() -> None:
        # Every code path once (imports, caches, the allocator's first arenas).
        flood = Flood(daemon.port, 6, 4)
        try:
            await flood.start()
        finally:
            await flood.close()

    asyncio.run(warm_up())
    before = rss(daemon.pid)

    async def run() -> tuple[int, bool, list[tuple[str, Answer]] | AssertionError]:
        flood = Flood(daemon.port, H1_CONNECTIONS, H2_CONNECTIONS)
        try:
            await flood.start()
            during = rss(daemon.pid)
            # Still held open: the daemon serves a well-behaved caller all the same.
            reply = await asyncio.to_thread(legit, "ListVms", {}, timeout=60)
            assert reply.ok, reply
            still_open = all(not c.closed for c in flood.clients)
            try:
                return during, still_open, await flood.answered()
            except AssertionError as exc:
                return during, still_open, exc
        finally:
            await flood.close()

    during, still_open, answers = asyncio.run(run())
    growth = during - before
    print(f"RSS before {before / MIB:.1f} MiB, during the flood {during / MIB:.1f} MiB")
    assert growth <= BOUND, (
        f"{H1_CONNECTIONS + H2_CONNECTIONS} unauthenticated connections grew the daemon by "
        f"{growth / MIB:.1f} MiB; the bound is {BOUND / MIB:.0f} MiB"
    )
    assert still_open, "the daemon dropped a flooding HTTP/2 connection"
    if isinstance(answers, AssertionError):
        raise answers
    wrong = [
        (protocol, a.status, a.code(), a.reset, a.body[:200])
        for protocol, a in answers
        if a.code() != _unauthenticated_code(protocol)
    ]
    assert not wrong, f"{len(wrong)} of {len(answers)} answered wrongly, e.g. {wrong[:5]}"
    assert all(a.status == 401 for p, a in answers if p.startswith("connect")), answers[:3]
    assert daemon.db_rows() == {}


def test_a_slow_authenticated_body_is_cut_at_the_deadline(
    metald_factory: Callable[..., Daemon],
) -> None:
    daemon = metald_factory(UNKEY_METALD_REQUEST_BODY_TIMEOUT_SECONDS="3")
    request = pb.ListVmsRequest(page_size=5).SerializeToString()

    async def run() -> tuple[list[tuple[str, Answer]], Answer]:
        h1 = [
            (
                protocol,
                h1_slow_request(daemon.port, protocol, "ListVms", TOKEN, b"\x08", 100),
            )
            for protocol in ("connect-json", "connect", "grpcweb")
        ]
        client = H2Client(daemon.port)
        await client.connect()
        h2_streams = []
        for protocol in ("grpc", "connect", "grpcweb"):
            body = envelope_prefix(100) + b"\x08" if protocol.startswith("grpc") else b"\x08"
            stream = SlowStream(protocol, "ListVms", TOKEN, body)
            await client.open(stream)
            h2_streams.append((protocol, stream.answer))
        done = await asyncio.gather(*(call for _, call in h1))
        h1_answers = [(p, a) for (p, _), a in zip(h1, done, strict=True)]
        await client.wait(client.answered, "answer after the deadline")
        # The connection still serves a call that sends its whole body.
        after = SlowStream("grpc", "ListVms", TOKEN, envelope(request), finish=True)
        await client.open(after)
        await client.wait(client.answered, "answer to a whole call")
        await client.close()
        return h1_answers + h2_streams, after.answer

    cut, after = asyncio.run(run())
    for protocol, answer in cut:
        expected = "4" if protocol.startswith("grpc") else "deadline_exceeded"
        assert answer.code() == expected, (protocol, answer)
        if protocol.startswith("connect"):
            assert b"did not arrive within 3 s" in answer.body, (protocol, answer)
    assert after.code() == "0", after


def test_an_answer_that_did_not_wait_for_its_body_leaves_the_connection_working(
    metald_factory: Callable[..., Daemon],
) -> None:
    """Seen failing: hypercorn queues at most ten body messages per call and then blocks the
    connection's reader; a call answered without reading its body (here: no token) left
    them unread, and the answer's own end queues one more. Headers and many small DATA
    frames in one write then hung the connection for ever: no other call on it was
    answered, and an HTTP/1.1 connection was never closed."""
    daemon = metald_factory()
    request = pb.ListVmsRequest(page_size=5).SerializeToString()

    async def run() -> tuple[list[Answer], Answer, Answer, Answer]:
        client = H2Client(daemon.port)
        await client.connect()
        refused = []
        for protocol in ("grpc", "connect"):
            body = _slow_body(protocol, 6000)
            stream = SlowStream(protocol, "CreateVm", None, body, frame_size=100)
            await client.open(stream)  # headers and 60 DATA frames in one write
            refused.append(stream.answer)
        after = SlowStream("grpc", "ListVms", TOKEN, envelope(request), finish=True)
        await client.open(after)
        try:
            await client.wait(client.answered, "answer to every call on the connection", 60)
        finally:
            await client.close()
        h1 = await asyncio.wait_for(
            h1_slow_request(
                daemon.port, "connect-json", "CreateVm", None, bytes(6000), None,
                chunk=100, until_closed=True,
            ),
            60,
        )  # fmt: skip
        health = await asyncio.wait_for(
            h1_slow_request(
                daemon.port, "connect-json", "", None, bytes(6000), None,
                chunk=100, until_closed=True, path="/health",
            ),
            60,
        )  # fmt: skip
        return refused, after.answer, h1, health

    refused, after, h1, health = asyncio.run(run())
    assert [a.code() for a in refused] == ["16", "unauthenticated"], refused
    assert after.code() == "0", after
    assert h1.code() == "unauthenticated" and h1.closed_by_server, h1
    assert health.status == 405 and health.closed_by_server, health


def test_an_answer_before_the_body_ends_resets_the_stream_without_error(
    metald_factory: Callable[..., Daemon],
) -> None:
    """Seen failing in e2e/test_protocols.py: grpcio, still sending a message over the size
    limit, reported its refused call as "RST_STREAM with error code 5" instead of the
    trailers' resource_exhausted. hypercorn ends a gRPC stream twice, and h2 then answers
    the client's next DATA frame with RST_STREAM(STREAM_CLOSED). Once an answer is complete
    while the request is not, the stream must be reset with NO_ERROR (RFC 9113 §8.1), before
    any other reset, and the connection must go on serving."""
    daemon = metald_factory()
    over = 2 * MIB
    cases = {
        # (protocol, token, body): refused by the envelope's length prefix / the body's size
        # / the missing token, while the client still has most of the body to send
        "grpc over the limit": ("grpc", TOKEN, envelope_prefix(over) + bytes(over)),
        "grpc unauthenticated": ("grpc", None, envelope_prefix(over) + bytes(over)),
        "connect over the limit": ("connect", TOKEN, bytes(over)),
        "connect unauthenticated": ("connect", None, bytes(over)),
    }
    request = pb.ListVmsRequest(page_size=5).SerializeToString()

    async def run() -> tuple[dict[str, Answer], Answer, bool]:
        client = H2Client(daemon.port)
        await client.connect()
        answers = {}
        try:
            for name, (protocol, token, body) in cases.items():
                stream = SlowStream(protocol, "CreateVm", token, body, finish=True)
                await client.open(stream)
                await client.wait(
                    lambda s=stream: client.closed or s.answer.reset is not None,  # type: ignore[misc]
                    f"the reset of {name}",
                    60,
                )
                answers[name] = stream.answer
            after = SlowStream("grpc", "ListVms", TOKEN, envelope(request), finish=True)
            await client.open(after)
            await client.wait(client.answered, "the answer to ListVms", 60)
        finally:
            await client.close()
        return answers, after.answer, client.terminated is not None

    answers, after, terminated = asyncio.run(run())
    expected = {
        "grpc over the limit": "8",
        "grpc unauthenticated": "16",
        "connect over the limit": "resource_exhausted",
        "connect unauthenticated": "unauthenticated",
    }
    codes = {name: a.code() for name, a in answers.items()}
    assert codes == expected, answers
    resets = {name: a.reset for name, a in answers.items()}
    assert resets == dict.fromkeys(cases, h2.errors.ErrorCodes.NO_ERROR), answers
    assert all(a.ended for a in answers.values()), "a reset came before the answer's end"
    assert not terminated and after.code() == "0", after


def test_streams_per_connection_are_bounded(metald_factory: Callable[..., Daemon]) -> None:
    daemon = metald_factory(
        UNKEY_METALD_HTTP2_MAX_CONCURRENT_STREAMS="4",
        UNKEY_METALD_REQUEST_BODY_TIMEOUT_SECONDS="600",
    )

    async def run() -> tuple[H2Client, SlowStream]:
        client = H2Client(daemon.port)
        await client.connect()
        held = [
            SlowStream("grpc", "ListVms", TOKEN, envelope_prefix(100) + b"\x08") for _ in range(4)
        ]
        for stream in held:
            await client.open(stream)
        await client.wait(client.burst_done, "the held streams' bodies on the wire")
        extra = SlowStream("grpc", "ListVms", TOKEN, envelope_prefix(100) + b"\x08")
        await client.open(extra, ignore_limit=True)
        await client.wait(
            lambda: client.closed or extra.answer.reset is not None, "refusal of the 5th stream"
        )
        await client.close()
        return client, extra

    client, extra = asyncio.run(run())
    assert client.server_settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] == 4
    refused = client.terminated is not None or extra.answer.reset in (
        h2.errors.ErrorCodes.REFUSED_STREAM,
        h2.errors.ErrorCodes.PROTOCOL_ERROR,
    )
    assert refused, (client.terminated, extra.answer)
    assert extra.answer.status is None, "the stream over the limit was served"
    assert CurlConnect(daemon.url, TOKEN)("ListVms", {}).ok  # others are served as ever


def _serve_once(root: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`metald serve` with `env` that must refuse to start (it is killed otherwise)."""
    data = root / "data"
    full = {
        **client_env(),
        "UNKEY_METALD_PORT": str(free_port()),
        "UNKEY_METALD_DATA_DIR": str(data),
        "UNKEY_METALD_ASSETMANAGER_CACHE_DIR": str(root / "assets"),
        **env,
    }
    out = subprocess.run(
        [str(METALD), "serve"], env=full, capture_output=True, text=True, timeout=60, check=False
    )
    assert not data.exists(), "a refused start-up made its data directory"
    return out


@pytest.mark.parametrize("address", ["0.0.0.0", "::", "192.0.2.1"])
def test_dev_tokens_off_loopback_are_refused_at_start_up(e2e_root: Path, address: str) -> None:
    root = Path(tempfile.mkdtemp(prefix="x", dir=e2e_root))
    out = _serve_once(root, UNKEY_METALD_ADDRESS=address, UNKEY_METALD_AUTH_DEV_TOKENS="true")
    os.rmdir(root)
    assert out.returncode == 2, out
    assert "UNKEY_METALD_AUTH_DEV_TOKENS_INSECURE=true" in out.stderr, out.stderr
    assert f"UNKEY_METALD_ADDRESS={address} is not loopback" in out.stderr, out.stderr


def test_unjailed_vmms_as_root_are_refused_unless_allowed(
    e2e_root: Path, metald_factory: Callable[..., Daemon]
) -> None:
    if os.geteuid() != 0:
        pytest.skip("about running as root")
    root = Path(tempfile.mkdtemp(prefix="x", dir=e2e_root))
    out = _serve_once(
        root,
        UNKEY_METALD_ADDRESS="127.0.0.1",
        UNKEY_METALD_JAILER_ENABLED="false",
        UNKEY_METALD_NETWORK_ENABLED="false",
    )
    os.rmdir(root)
    assert out.returncode == 2, out
    assert "UNKEY_METALD_ALLOW_UNJAILED_ROOT=true" in out.stderr, out.stderr

    allowed = metald_factory(
        UNKEY_METALD_JAILER_ENABLED="false",
        UNKEY_METALD_NETWORK_ENABLED="false",
        UNKEY_METALD_ALLOW_UNJAILED_ROOT="true",
    )
    assert allowed.stop() == 0
    allowed.start_again()
    warnings = allowed.log_tail(500).count("INSECURE: the jailer is disabled")
    assert warnings == 2, f"the warning is logged at every start:\n{allowed.log_tail()}"

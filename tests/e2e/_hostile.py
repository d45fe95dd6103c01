"""Clients that misbehave on purpose, for tests/e2e/test_api_abuse.py: requests whose bodies
never finish, over HTTP/1.1 (h11) and HTTP/2 (h2), one asyncio task per connection.

No well-behaved client (curl, grpcio, buf) can hold a body open, so these speak the wire
protocols themselves with the h11 and h2 state machines (hypercorn's own dependencies),
in the client role.
"""

from __future__ import annotations

import asyncio
import json
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import h11

from ._support import SERVICE

CONTENT_TYPES = {
    "connect": "application/proto",
    "connect-json": "application/json",
    "grpc": "application/grpc",
    "grpcweb": "application/grpc-web+proto",
}


def request_headers(protocol: str, method: str, token: str | None) -> list[tuple[str, str]]:
    """The headers of one POST; gRPC and gRPC-Web bodies are enveloped messages."""
    headers = [("content-type", CONTENT_TYPES[protocol])]
    if protocol == "grpc":
        headers.append(("te", "trailers"))
    if token is not None:
        headers.append(("authorization", f"Bearer {token}"))
    return headers


def envelope_prefix(length: int) -> bytes:
    """The 5-byte prefix of a gRPC / gRPC-Web message of `length` bytes (uncompressed)."""
    return struct.pack(">BI", 0, length)


def envelope(message: bytes) -> bytes:
    return envelope_prefix(len(message)) + message


@dataclass
class Answer:
    """What the server answered one request, as far as it got."""

    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    trailers: dict[str, str] = field(default_factory=dict)
    ended: bool = False  # the server ended its side of the stream (HTTP/2) or the message
    reset: int | None = None  # RST_STREAM error code
    sent: int = 0  # body bytes the client got onto the wire
    closed_by_server: bool = False  # HTTP/1.1: the server ended the connection after it

    def code(self) -> str | None:
        """The call's status as its protocol encodes it: a Connect error's JSON `code`, or
        `grpc-status` from the headers (trailers-only), the trailers, or gRPC-Web's trailer
        frame."""
        for where in (self.headers, self.trailers):
            if "grpc-status" in where:
                return where["grpc-status"]
        if self.headers.get("content-type", "").startswith("application/grpc-web"):
            data = self.body
            while len(data) >= 5:
                flags, length = struct.unpack(">BI", data[:5])
                frame, data = data[5 : 5 + length], data[5 + length :]
                if flags & 0x80:
                    for line in frame.decode(errors="replace").split("\r\n"):
                        name, _, value = line.partition(":")
                        if name.strip().lower() == "grpc-status":
                            return value.strip()
            return None
        if self.headers.get("content-type", "") == "application/json" and self.body:
            code = json.loads(self.body).get("code")
            return str(code) if code is not None else None
        return None


# -- HTTP/2 ------------------------------------------------------------------------------------


@dataclass
class SlowStream:
    """One request on an HTTP/2 connection: its headers, `burst` body bytes sent as fast as
    flow control lets them go, then nothing: the body never ends (unless `finish`)."""

    protocol: str
    method: str
    token: str | None
    burst: bytes
    finish: bool = False
    frame_size: int = 16384  # body bytes per DATA frame
    stream_id: int = 0
    answer: Answer = field(default_factory=Answer)


class H2Client:
    """One HTTP/2 (h2c, prior knowledge) connection driven by hand."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self.streams: dict[int, SlowStream] = {}
        self.terminated: h2.events.ConnectionTerminated | None = None
        self.server_settings: dict[int, int] = {}
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[int, deque[bytes]] = {}
        self._changed = asyncio.Event()
        self._pump: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        self._reader, self._writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.conn.initiate_connection()
        await self._flush()
        self._pump = asyncio.create_task(self._read_loop())
        await self.wait(lambda: bool(self.server_settings) or self.closed, "the server's SETTINGS")

    @property
    def closed(self) -> bool:
        return self.terminated is not None or self._reader is None or self._reader.at_eof()

    async def open(self, stream: SlowStream, *, ignore_limit: bool = False) -> None:
        """Send a request's headers and queue its body. `ignore_limit`: open it even when the
        server's SETTINGS_MAX_CONCURRENT_STREAMS says no (as a hostile client would)."""
        if ignore_limit:
            limits = self.conn.remote_settings._settings  # h2 enforces it on our side too
            limits[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = deque([2**31 - 1])
        stream.stream_id = self.conn.get_next_available_stream_id()
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":authority", f"127.0.0.1:{self.port}"),
            (":path", f"/{SERVICE}/{stream.method}"),
            *request_headers(stream.protocol, stream.method, stream.token),
        ]
        self.conn.send_headers(
            stream.stream_id, headers, end_stream=stream.finish and not stream.burst
        )
        self.streams[stream.stream_id] = stream
        size = stream.frame_size
        self._pending[stream.stream_id] = deque(
            stream.burst[i : i + size] for i in range(0, len(stream.burst), size)
        )
        self._send_pending()
        await self._flush()

    def burst_done(self) -> bool:
        """Every stream's burst is on the wire (or the stream or connection is gone)."""
        return self.closed or all(not chunks for chunks in self._pending.values())

    def answered(self) -> bool:
        """Every stream got its whole answer (or was reset, or the connection ended)."""
        return self.closed or all(
            s.answer.ended or s.answer.reset is not None for s in self.streams.values()
        )

    async def wait(self, done: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
        async def until() -> None:
            while not done():
                self._changed.clear()
                await self._changed.wait()

        try:
            await asyncio.wait_for(until(), timeout)
        except TimeoutError:
            raise AssertionError(f"HTTP/2 client: no {what} within {timeout} s") from None

    async def close(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            with _suppress():
                await self._pump
        if self._writer is not None:
            self._writer.close()
            with _suppress():
                await self._writer.wait_closed()

    def _send_pending(self) -> None:
        for stream_id, chunks in self._pending.items():
            stream = self.streams[stream_id]
            while chunks:
                try:
                    window = self.conn.local_flow_control_window(stream_id)
                except h2.exceptions.StreamClosedError:
                    chunks.clear()
                    break
                chunk = chunks[0]
                if window <= 0:
                    break
                if len(chunk) > window:
                    chunks[0], chunk = chunk[window:], chunk[:window]
                else:
                    chunks.popleft()
                end = stream.finish and not chunks
                try:
                    self.conn.send_data(stream_id, chunk, end_stream=end)
                except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                    chunks.clear()
                    break
                stream.answer.sent += len(chunk)

    async def _flush(self) -> None:
        assert self._writer is not None
        data = self.conn.data_to_send()
        if data:
            self._writer.write(data)
            await self._writer.drain()

    async def _read_loop(self) -> None:
        assert self._reader is not None
        try:
            while True:
                data = await self._reader.read(65536)
                if not data:
                    break
                for event in self.conn.receive_data(data):
                    self._handle(event)
                self._send_pending()
                await self._flush()
                self._changed.set()
        except (ConnectionError, h2.exceptions.ProtocolError):
            pass
        finally:
            self._changed.set()

    def _handle(self, event: h2.events.Event) -> None:
        stream = self.streams.get(getattr(event, "stream_id", 0) or 0)
        if isinstance(event, h2.events.RemoteSettingsChanged):
            self.server_settings.update(
                {int(k): v.new_value for k, v in event.changed_settings.items()}
            )
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.terminated = event
        elif stream is None:
            return
        elif isinstance(event, h2.events.ResponseReceived):
            headers = dict(event.headers)
            stream.answer.status = int(headers.pop(":status"))
            stream.answer.headers = headers
        elif isinstance(event, h2.events.DataReceived):
            stream.answer.body += event.data
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.TrailersReceived):
            stream.answer.trailers = dict(event.headers)
        elif isinstance(event, h2.events.StreamEnded):
            stream.answer.ended = True
        elif isinstance(event, h2.events.StreamReset):
            stream.answer.reset = int(event.error_code)
            self._pending[event.stream_id].clear()  # nothing more goes out on it


# -- HTTP/1.1 ----------------------------------------------------------------------------------


async def h1_slow_request(
    port: int,
    protocol: str,
    method: str,
    token: str | None,
    first: bytes,
    length: int | None,
    *,
    chunk: int = 0,
    until_closed: bool = False,
    path: str | None = None,
) -> Answer:
    """POST with `Content-Length: length` (None: chunked, in chunks of `chunk` bytes), send
    `first` (shorter) in one write, then nothing more; the answer the server gives while
    the body is still incomplete. `until_closed`: then wait for the server to end the
    connection (it cannot be used again: the body never finished). `path`: another target
    than the RPC's."""
    answer = Answer()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    conn = h11.Connection(h11.CLIENT)
    try:
        framing = (
            ("transfer-encoding", "chunked") if length is None else ("content-length", str(length))
        )
        headers = [
            ("host", f"127.0.0.1:{port}"),
            framing,
            *request_headers(protocol, method, token),
        ]
        target = path or f"/{SERVICE}/{method}"
        request = h11.Request(method="POST", target=target, headers=headers)
        size = chunk or len(first) or 1
        pieces = [first[i : i + size] for i in range(0, len(first), size)]
        writer.write(conn.send(request) + b"".join(conn.send(h11.Data(data=p)) for p in pieces))
        await writer.drain()
        answer.sent = len(first)
        while not answer.ended:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(65536)
                conn.receive_data(data)
                if not data:
                    break
            elif isinstance(event, h11.Response):
                answer.status = event.status_code
                answer.headers = {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                answer.body += event.data
            elif isinstance(event, h11.EndOfMessage):
                answer.trailers = {k.decode(): v.decode() for k, v in event.headers}
                answer.ended = True
            elif isinstance(event, h11.ConnectionClosed):
                break
        if until_closed:
            while await reader.read(65536):
                pass
            answer.closed_by_server = True
    except (ConnectionError, h11.RemoteProtocolError):
        answer.closed_by_server = until_closed
    finally:
        writer.close()
        with _suppress():
            await writer.wait_closed()
    return answer


class _suppress:
    """contextlib.suppress for the errors a connection torn down under us raises."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> bool:
        return kind is not None and issubclass(
            kind, (ConnectionError, OSError, asyncio.CancelledError, h2.exceptions.H2Error)
        )

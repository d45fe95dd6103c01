"""Fixes for hypercorn's HTTP/2 handler, applied once at start-up.

All three concern a call answered before its whole body arrived (no valid token, a body
over read_max_bytes, the body deadline): the client may still be sending DATA for it.

1. hypercorn 0.18 forgets such a stream once answered; DATA frames still arriving for it
   raise KeyError in H2Protocol._handle_events, which kills the whole connection and every
   other call on it. Those frames have nowhere to go: acknowledge them for flow control and
   drop them.

2. The handler ends by sending what h2 has queued, even for a read that produced no events:
   DATA frames on a stream h2 itself has closed produce no events, but h2 queues a
   WINDOW_UPDATE for the connection for them. Left unsent, the connection's flow-control
   window runs dry and every call on it stalls, as seen with a client that kept sending the
   body of a call already answered `unauthenticated`.

3. Once the answer has ended the server's side of the stream while the client's is still
   open, the stream is reset with NO_ERROR (RFC 9113 §8.1: "a server can send a complete
   response prior to the client sending an entire request ... the server MAY request that
   the client abort transmission of a request without error by sending a RST_STREAM with
   an error code of NO_ERROR"). Without it, hypercorn ends the stream a second time after a
   gRPC answer's trailers, which leaves h2's stream CLOSED with no reason, and the client's
   next DATA frame is answered RST_STREAM(STREAM_CLOSED). grpcio, still sending, lets that
   reset override the status it had already received in the trailers: a call refused
   `resource_exhausted` (a message over the size limit) was seen reported as "RST_STREAM
   with error code 5" under load. With NO_ERROR the client stops sending and keeps the
   trailers' status; the DATA frames already in flight are acknowledged and dropped by h2.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import h2.errors
import h2.events
import h2.exceptions
import h2.stream
from hypercorn.protocol.events import Event, Trailers
from hypercorn.protocol.h2 import H2Protocol

_applied = False


def apply() -> None:
    global _applied
    if _applied:
        return
    handle_original: Callable[[Any, list[h2.events.Event]], Awaitable[None]] = (
        H2Protocol._handle_events
    )
    stream_send_original: Callable[[Any, Event], Awaitable[None]] = H2Protocol.stream_send
    send_data_original: Callable[[Any, int], Awaitable[None]] = H2Protocol._send_data

    async def handle_events(self: Any, events: list[h2.events.Event]) -> None:
        # One event at a time: an earlier event of the batch may open the stream.
        for event in events:
            if isinstance(event, h2.events.DataReceived) and event.stream_id not in self.streams:
                self.connection.acknowledge_received_data(
                    event.flow_controlled_length, event.stream_id
                )
                continue
            await handle_original(self, [event])
        await self._flush()

    async def stream_send(self: Any, event: Event) -> None:
        await stream_send_original(self, event)
        if isinstance(event, Trailers):  # a gRPC answer ends with its trailers
            await _stop_unread_body(self, event.stream_id)

    async def send_data(self: Any, stream_id: int) -> None:
        await send_data_original(self, stream_id)  # ends the stream after an answer's body
        await _stop_unread_body(self, stream_id)

    H2Protocol._handle_events = handle_events  # type: ignore[method-assign]
    H2Protocol.stream_send = stream_send  # type: ignore[method-assign]
    H2Protocol._send_data = send_data  # type: ignore[method-assign]
    _applied = True


async def _stop_unread_body(protocol: Any, stream_id: int) -> None:
    """Reset with NO_ERROR a stream whose answer is complete while its request is not."""
    stream = protocol.connection.streams.get(stream_id)
    if stream is None or stream.state_machine.state != h2.stream.StreamState.HALF_CLOSED_LOCAL:
        return
    try:
        protocol.connection.reset_stream(stream_id, h2.errors.ErrorCodes.NO_ERROR)
    except h2.exceptions.ProtocolError:  # the connection is closing: nothing to stop
        return
    await protocol._flush()

"""A fix for hypercorn's HTTP/2 handler, applied once at start-up.

hypercorn 0.18 answers a call before its whole body has arrived when the body is refused
(over read_max_bytes) and then forgets the stream; DATA frames still arriving for it raise
KeyError in H2Protocol._handle_events, which kills the whole connection and every other call
on it. Those frames have nowhere to go: acknowledge them for flow control and drop them.

The handler ends by sending what h2 has queued, even for a read that produced no events:
DATA frames on a stream h2 itself has closed (hypercorn closes a gRPC stream's h2 state
when it ends the stream a second time after the trailers) produce no events, but h2 queues
a WINDOW_UPDATE for the connection and a RST_STREAM for them. Left unsent, the connection's
flow-control window runs dry and every call on it stalls, as seen with a client that kept
sending the body of a call already answered `unauthenticated`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import h2.events
from hypercorn.protocol.h2 import H2Protocol

_applied = False


def apply() -> None:
    global _applied
    if _applied:
        return
    original: Callable[[Any, list[h2.events.Event]], Awaitable[None]] = H2Protocol._handle_events

    async def handle_events(self: Any, events: list[h2.events.Event]) -> None:
        # One event at a time: an earlier event of the batch may open the stream.
        for event in events:
            if isinstance(event, h2.events.DataReceived) and event.stream_id not in self.streams:
                self.connection.acknowledge_received_data(
                    event.flow_controlled_length, event.stream_id
                )
                continue
            await original(self, [event])
        await self._flush()

    H2Protocol._handle_events = handle_events  # type: ignore[method-assign]
    _applied = True

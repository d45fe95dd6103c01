"""Running the sink: its ASGI app (the generated BillingService app, plus GET /health) on
api/server.py's hypercorn start-up, so it serves Connect, gRPC and gRPC-Web over HTTP/1.1
and h2c with exactly the daemon's server fixes (api/h2_fixes.py), none repeated here."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from metald.api import server
from metald.billing_sink.service import BillingSink
from metald.billing_sink.store import SinkStore
from metald.gen.billing.v1.billing_connect import BillingServiceASGIApplication

log = logging.getLogger("metald.billing_sink")

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
MAX_REQUEST_BYTES = 16 * 1024 * 1024  # a batch of ~250k samples


class SinkASGI:
    """The Connect app, and GET /health (`{"status": "ok"}`: the sink answers and its
    database takes reads) for whoever waits for it to be up."""

    def __init__(self, store: SinkStore) -> None:
        self._store = store
        self._connect = BillingServiceASGIApplication(
            BillingSink(store), read_max_bytes=MAX_REQUEST_BYTES
        )

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("path") == "/health":
            await self._store.run(self._store.heartbeats)  # the database answers
            body = json.dumps({"status": "ok", "service": "billing.v1.BillingService"})
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": body.encode()})
            return
        await self._connect(scope, receive, send)


async def serve(db: Path, address: str, port: int) -> None:
    """Serve until SIGINT or SIGTERM, then let calls in flight finish."""
    store = SinkStore(db)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info("billing sink: billing.v1 on %s:%d, records in %s", address, port, db)
    try:
        await server.serve(
            SinkASGI(store), server.ServerOptions(address=address, port=port), stop.wait
        )
    finally:
        store.close()


def run(db: Path, address: str, port: int) -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(serve(db, address, port))

"""The HTTP server under the one ASGI app: how it is configured and run.

One place, so that `metald serve` and the server benchmark (bench/servers.py) run exactly the
same server with the same settings: a figure measured there is the daemon's.

hypercorn is the server: of the ASGI servers measured (docs/performance.md, "The server") it
is the one that passes the three-protocol e2e suite (Connect, gRPC and gRPC-Web over HTTP/1.1
and h2c, with early answers and hostile clients) with the fixes of api/h2_fixes.py.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config as HypercornConfig

from metald.api import h2_fixes, hypercorn_tuning

ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


@dataclass(frozen=True)
class ServerOptions:
    address: str
    port: int
    # Calls in flight on one HTTP/2 connection (SETTINGS_MAX_CONCURRENT_STREAMS).
    h2_max_concurrent_streams: int = 32
    # Seconds a connection may sit without a call in flight (also bounds slow headers).
    idle_timeout: float = 5.0
    # Seconds calls in flight get to finish at shutdown.
    graceful_timeout: float = 5.0
    # api/hypercorn_tuning.py (off only to measure what it saves: bench/servers.py).
    tuned: bool = True


def hypercorn_config(options: ServerOptions) -> HypercornConfig:
    config = HypercornConfig()
    host = f"[{options.address}]" if ":" in options.address else options.address
    config.bind = [f"{host}:{options.port}"]
    config.accesslog = None
    # hypercorn closes a connection after 1000 requests by default; gRPC clients keep
    # one connection for everything (notes/connect-stack.md).
    config.keep_alive_max_requests = 2**31
    # Bounded work per connection: calls in flight on one HTTP/2 connection, and how long
    # a connection may sit without one (this also bounds slow request headers).
    config.h2_max_concurrent_streams = options.h2_max_concurrent_streams
    config.keep_alive_timeout = options.idle_timeout
    config.graceful_timeout = options.graceful_timeout
    return config


async def serve(
    app: ASGIApp, options: ServerOptions, shutdown: Callable[[], Awaitable[Any]]
) -> None:
    """Serve `app` until `shutdown()` returns, then let calls in flight finish."""
    h2_fixes.apply()
    if options.tuned:
        hypercorn_tuning.apply()
    await hypercorn_serve(app, hypercorn_config(options), shutdown_trigger=shutdown)  # type: ignore[arg-type]

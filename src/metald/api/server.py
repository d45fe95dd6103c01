"""The HTTP server under the one ASGI app: how it is configured and run.

One place, so that `metald serve` and the server benchmark (bench/servers.py) run exactly the
same server with the same settings: a figure measured there is the daemon's.

hypercorn is the server: of the ASGI servers measured (docs/performance.md, "The server") it
is the one that passes the three-protocol e2e suite (Connect, gRPC and gRPC-Web over HTTP/1.1
and h2c, with early answers and hostile clients) with the fixes of api/h2_fixes.py.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config as HypercornConfig

from metald.api import h2_fixes, hypercorn_tls, hypercorn_tuning

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
    # hypercorn, or one of the servers measured against it (SERVERS).
    server: str = "hypercorn"
    # TLS (api/tls.py): the listener's context; None serves plaintext (h2c and HTTP/1.1).
    tls: ssl.SSLContext | None = None


class _TlsConfig(HypercornConfig):
    """hypercorn with a context of ours (api/tls.py: reloaded material, ALPN, client CAs)
    instead of one it builds from file names once."""

    def __init__(self, context: ssl.SSLContext) -> None:
        super().__init__()
        self._metald_context = context

    @property
    def ssl_enabled(self) -> bool:
        return True

    def create_ssl_context(self) -> ssl.SSLContext:
        return self._metald_context


def hypercorn_config(options: ServerOptions) -> HypercornConfig:
    config = HypercornConfig() if options.tls is None else _TlsConfig(options.tls)
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
    # A TLS handshake that does not finish holds a connection like slow headers do.
    config.ssl_handshake_timeout = max(options.idle_timeout, 10.0)
    return config


Shutdown = Callable[[], Awaitable[Any]]


async def serve(app: ASGIApp, options: ServerOptions, shutdown: Shutdown) -> None:
    """Serve `app` until `shutdown()` returns, then let calls in flight finish."""
    await SERVERS[options.server](app, options, shutdown)


async def _hypercorn(app: ASGIApp, options: ServerOptions, shutdown: Shutdown) -> None:
    h2_fixes.apply()
    if options.tls is not None:
        hypercorn_tls.apply()
    if options.tuned:
        hypercorn_tuning.apply()
    await hypercorn_serve(app, hypercorn_config(options), shutdown_trigger=shutdown)  # type: ignore[arg-type]


async def _uvicorn(app: ASGIApp, options: ServerOptions, shutdown: Shutdown) -> None:
    """uvicorn with zttp, its parser for HTTP/1.1 and h2c (the only one with trailers)."""
    import uvicorn

    config = uvicorn.Config(
        app, host=options.address, port=options.port, http="zttp", http2=True, loop="none",
        lifespan="off", access_log=False, log_level="warning",
        timeout_keep_alive=max(1, round(options.idle_timeout)),
        timeout_graceful_shutdown=max(1, round(options.graceful_timeout)),
    )  # fmt: skip
    server = uvicorn.Server(config)
    serving = asyncio.ensure_future(server.serve())
    stopping = asyncio.ensure_future(shutdown())
    try:
        await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        server.should_exit = True
        await serving
    finally:
        stopping.cancel()


async def _granian(app: ASGIApp, options: ServerOptions, shutdown: Shutdown) -> None:
    """granian's embedded server (its Rust HTTP/1.1 and h2c; it has no ASGI trailers)."""
    from granian.constants import HTTPModes, Interfaces
    from granian.http import HTTP2Settings
    from granian.server.embed import Server

    server = Server(
        app, address=options.address, port=options.port, interface=Interfaces.ASGINL,
        http=HTTPModes.auto, websockets=False, log_access=False,
        http2_settings=HTTP2Settings(max_concurrent_streams=options.h2_max_concurrent_streams),
    )  # fmt: skip
    serving = asyncio.ensure_future(server.serve())
    stopping = asyncio.ensure_future(shutdown())
    try:
        await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        server.stop()
        await serving
    finally:
        stopping.cancel()


async def serve_in_envoy(app_path: str, options: ServerOptions, shutdown: Shutdown) -> int:
    """pyvoy: Envoy serves, with the Python app (`module:attr`, an app that starts the daemon
    in its lifespan) inside Envoy's own process. Returns Envoy's exit status."""
    from pyvoy import PyvoyServer

    class Server(PyvoyServer):  # type: ignore[misc]
        def get_envoy_config(self) -> dict[str, Any]:
            config: dict[str, Any] = super().get_envoy_config()
            for manager in _http_managers(config):
                manager.setdefault("http2_protocol_options", {})["max_concurrent_streams"] = (
                    options.h2_max_concurrent_streams
                )
                manager.setdefault("common_http_protocol_options", {})["idle_timeout"] = (
                    f"{options.idle_timeout}s"
                )
            return config

    server = Server(
        app_path, address=options.address, port=options.port, lifespan=True,
        log_level="warning", worker_threads=1, stdout=None, stderr=None,
    )  # fmt: skip
    await server.start()
    exited = asyncio.ensure_future(server.wait())
    stopping = asyncio.ensure_future(shutdown())
    try:
        await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
        await server.stop()
        return int(await exited or 0)
    finally:
        stopping.cancel()


def _http_managers(node: Any) -> list[dict[str, Any]]:
    found = []
    if isinstance(node, dict):
        if str(node.get("@type", "")).endswith("HttpConnectionManager"):
            found.append(node)
        for value in node.values():
            found += _http_managers(value)
    elif isinstance(node, list):
        for value in node:
            found += _http_managers(value)
    return found


SERVERS: dict[str, Callable[[ASGIApp, ServerOptions, Shutdown], Awaitable[None]]] = {
    "hypercorn": _hypercorn,
    "uvicorn": _uvicorn,
    "granian": _granian,
}

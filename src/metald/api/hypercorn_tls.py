"""The ASGI TLS extension for hypercorn: the client certificate in the request's scope.

hypercorn 0.18 serves TLS but tells the app nothing about it beyond `scheme: https`: its
scope's extensions hold only trailers, push and early hints, and connectrpc's
RequestContext has no way to the connection either. mTLS needs the peer certificate per
call, so this fills scope["extensions"]["tls"] as the ASGI TLS extension specifies it
(client_cert_chain as PEM strings, leaf first; client_cert_name as RFC 4514; tls_version;
client_cert_error None, since the handshake already refused a bad certificate).

How it gets there: each connection is served by one task (TCPServer.run), and every request
task of the connection is spawned from it (TaskGroup.spawn_app), so the connection's TLS facts
are set in a context variable at the start of that task and copied into each request's scope
as it is spawned. Only the leaf is available (Python 3.11's ssl has no verified chain).
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any

from cryptography import x509
from hypercorn.asyncio.task_group import TaskGroup
from hypercorn.asyncio.tcp_server import TCPServer

_TLS_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}

_connection_tls: ContextVar[dict[str, Any] | None] = ContextVar("_connection_tls", default=None)
_applied = False


def connection_tls(ssl_object: ssl.SSLObject) -> dict[str, Any]:
    """The ASGI TLS extension's fields for one TLS connection."""
    der = ssl_object.getpeercert(binary_form=True)
    chain: list[str] = []
    name = None
    if der:
        chain = [ssl.DER_cert_to_PEM_cert(der)]
        name = x509.load_der_x509_certificate(der).subject.rfc4514_string()
    return {
        "server_cert": None,
        "client_cert_chain": chain,
        "client_cert_name": name,
        "client_cert_error": None,
        "tls_version": _TLS_VERSIONS.get(ssl_object.version() or ""),
        "cipher_suite": None,
    }


def apply() -> None:
    global _applied
    if _applied:
        return
    run_original: Callable[[Any], Awaitable[None]] = TCPServer.run
    spawn_app_original: Callable[..., Awaitable[Any]] = TaskGroup.spawn_app

    async def run(self: Any) -> None:
        ssl_object = self.writer.get_extra_info("ssl_object")
        if ssl_object is not None:
            # This task serves only this connection: the variable is its own.
            _connection_tls.set(connection_tls(ssl_object))
        await run_original(self)

    async def spawn_app(self: Any, app: Any, config: Any, scope: dict[str, Any], send: Any) -> Any:
        tls = _connection_tls.get()
        if tls is not None and scope.get("type") == "http":
            scope.setdefault("extensions", {})["tls"] = tls
        return await spawn_app_original(self, app, config, scope, send)

    TCPServer.run = run  # type: ignore[method-assign]
    TaskGroup.spawn_app = spawn_app  # type: ignore[method-assign,assignment]
    _applied = True

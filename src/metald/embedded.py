"""metald as an ASGI app that starts the daemon in its lifespan: how a server that runs the
app in a process of its own (UNKEY_METALD_HTTP_SERVER=pyvoy: inside Envoy) runs metald.

`metald serve` starts that server and passes METALD_PYTHON, its own interpreter: inside
Envoy sys.executable is the interpreter pyvoy loaded, not metald's, and the jailer and the
other helpers run `python -m metald...` with sys.executable (some bind it at import time, so
it is set before anything of metald is imported).
"""

from __future__ import annotations

import os
import sys

sys.executable = os.environ.get("METALD_PYTHON", sys.executable)

import logging  # noqa: E402
from contextlib import AsyncExitStack  # noqa: E402
from typing import Any  # noqa: E402

from metald.api.http import MetaldASGI  # noqa: E402
from metald.app import configure_logging, running_daemon  # noqa: E402
from metald.config import load_settings  # noqa: E402

log = logging.getLogger("metald")


class EmbeddedDaemon:
    def __init__(self) -> None:
        self._stack: AsyncExitStack | None = None
        self._asgi: MetaldASGI | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            assert self._asgi is not None, "served before its lifespan started"
            await self._asgi(scope, receive, send)
            return
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                logging.basicConfig(
                    level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
                )
                self._stack = AsyncExitStack()
                try:
                    settings = load_settings()
                    configure_logging(settings)
                    daemon = await self._stack.enter_async_context(running_daemon(settings))
                except Exception as exc:
                    log.error("metald: %s", exc)
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                self._asgi = daemon.asgi
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._stack is not None:
                    await self._stack.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return


app = EmbeddedDaemon()

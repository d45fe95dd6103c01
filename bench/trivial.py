"""The API benchmark's ceiling: metald's own server with a handler that does nothing.

`python -m bench.trivial ANSWERS.json` serves, with the settings of the environment (the
benchmark daemon's, on another port), exactly what `metald serve` serves in front of its
handlers: the server (api/server.py: hypercorn with metald's config, tuning and h2 fixes), the
ASGI wrapper (api/http.py: body deadline, /health, /metrics), the generated VmService
application with metald's interceptors (metrics, bearer auth, error mapping) and its read
limit. Only the handler differs: GetVmInfo and ListVms answer a constant message, picked
by (method, caller) from ANSWERS.json (protobuf JSON, written by bench/api.py from the real
daemon's answers, so both sides serialise the same message). No store, VMM, /proc or
netlink is touched. What the real daemon does beyond this is metald's read path.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from metald.api import server
from metald.api.auth import TokenAuthenticator, current_customer
from metald.api.health import Health
from metald.api.http import MetaldASGI
from metald.app import connect_application, server_options
from metald.config import load_settings
from metald.core.states import VmState
from metald.gen.vmprovisioner.v1 import vm_pb2 as pb
from metald.gen.vmprovisioner.v1.vm_connect import VmService
from metald.observability.prometheus import MetricSources, PrometheusMetrics


class ConstantHandlers(VmService):  # type: ignore[misc]
    """GetVmInfo and ListVms answer the constant of (method, caller), a dict lookup; the
    other RPCs are the generated `unimplemented`."""

    def __init__(self, answers: dict[str, dict[str, Any]]) -> None:
        self._info = {
            customer: json_format.ParseDict(body, pb.GetVmInfoResponse())
            for customer, body in answers.get("GetVmInfo", {}).items()
        }
        self._list = {
            customer: json_format.ParseDict(body, pb.ListVmsResponse())
            for customer, body in answers.get("ListVms", {}).items()
        }

    async def get_vm_info(self, request: pb.GetVmInfoRequest, ctx: Any, /) -> pb.GetVmInfoResponse:
        return self._info[current_customer.get()]

    async def list_vms(self, request: pb.ListVmsRequest, ctx: Any, /) -> pb.ListVmsResponse:
        return self._list[current_customer.get()]


class NoStore:
    """What MetaldASGI asks of a store (/metrics): nothing stored."""

    async def count_by_state_and_backend(self) -> dict[tuple[VmState, str], int]:
        return {}

    async def ping(self) -> None:
        return None


async def serve(answers: dict[str, dict[str, Any]]) -> None:
    settings = load_settings()
    metrics = PrometheusMetrics(MetricSources(NoStore(), ["trivial"]))  # type: ignore[arg-type]
    authenticator = TokenAuthenticator(
        dev_tokens=settings.auth_dev_tokens, tokens_file=settings.auth_tokens_file
    )
    connect_app = connect_application(
        ConstantHandlers(answers), authenticator, metrics, settings.max_request_bytes
    )

    async def nothing() -> None:
        return None

    health = Health(backend="trivial", accelerator=lambda: "none", checks={"store": nothing})
    asgi = MetaldASGI(
        connect_app,
        health,
        metrics,
        body_timeout=settings.request_body_timeout_seconds,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await server.serve(asgi, server_options(settings), stop.wait)


def main() -> None:
    answers = json.loads(Path(sys.argv[1]).read_text())
    asyncio.run(serve(answers))


if __name__ == "__main__":
    main()

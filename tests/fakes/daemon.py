"""The real API over the fakes: VmService (the real one) on in-memory ports, behind the real
Connect handlers, auth and error interceptors as app.py wires them, served by hypercorn on a
free loopback port in a thread. SDK and CLI tests talk to it over the real wire protocol, so
they exercise the service's own rules (states, ownership, validation), not a copy of them.

    with serve_fake_daemon() as daemon:
        MetaldClient(daemon.address, "dev_customer_acme").list_vms()
        daemon.backend.vmms  # what the "VMMs" are doing

Development tokens are on: `dev_customer_<id>` is customer <id>.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from connectrpc.request import RequestContext
from hypercorn.asyncio import serve
from hypercorn.config import Config

from metald.api import h2_fixes
from metald.api.auth import TokenAuthenticator
from metald.api.handlers import VmHandlers
from metald.api.health import Health
from metald.api.http import MetaldASGI
from metald.api.interceptors import api_interceptors
from metald.core.validation import Limits
from metald.gen.vmprovisioner.v1.vm_connect import VmServiceASGIApplication
from metald.observability.prometheus import MetricSources, PrometheusMetrics
from metald.service.vm_service import VmService

from .assets import FakeAssets
from .backend import FakeBackend
from .network import FakeNetwork
from .quotas import MemoryQuotas, fake_admission
from .store import MemoryStore

LIMITS = Limits(max_vcpus=8, max_memory_bytes=16 * 1024**3)
# References the fake asset store holds, for tests that pass kernels and disks.
ASSET_FILES = ("vmlinux", "initrd.img", "/r.ext4", "/root.ext4", "/data.img")
FIRST_TIMESTAMP = 1_700_000_000


@dataclass(frozen=True)
class RecordedCall:
    method: str  # the RPC's name: "CreateVm", "ShutdownVm", ...
    request: Any
    authorization: str


class RecordingInterceptor:
    """Right after authentication: records every authenticated, decoded request and its
    Authorization header."""

    def __init__(self, calls: list[RecordedCall]) -> None:
        self._calls = calls

    async def intercept_unary(
        self,
        call_next: Callable[[Any, RequestContext[Any, Any]], Awaitable[Any]],
        request: Any,
        ctx: RequestContext[Any, Any],
        /,
    ) -> Any:
        authorization = ctx.request_headers.get("authorization", "")
        self._calls.append(RecordedCall(ctx.method.name, request, authorization))
        return await call_next(request, ctx)


@dataclass
class FakeDaemon:
    service: VmService
    store: MemoryStore
    backend: FakeBackend
    assets: FakeAssets
    network: FakeNetwork
    calls: list[RecordedCall] = field(default_factory=list)
    address: str = ""

    def requests(self, method: str) -> list[Any]:
        """The requests of one RPC (e.g. "ShutdownVm") the server received, in order."""
        return [c.request for c in self.calls if c.method == method]


def build_fake_daemon(asset_files: Iterable[str] = ASSET_FILES) -> FakeDaemon:
    store, backend = MemoryStore(), FakeBackend("qemu")
    assets, network = FakeAssets(asset_files), FakeNetwork()
    clock = itertools.count(FIRST_TIMESTAMP)  # one second per change: stable list orders
    service = VmService(
        store,
        {backend.name: backend},
        assets,
        network,
        LIMITS,
        admission=fake_admission(MemoryQuotas(store)),
        default_shutdown_timeout=30.0,
        clock=lambda: float(next(clock)),
    )
    return FakeDaemon(service, store, backend, assets, network)


@contextlib.contextmanager
def serve_fake_daemon(
    handlers: Callable[[VmService], Any] = VmHandlers,
    daemon: FakeDaemon | None = None,
) -> Iterator[FakeDaemon]:
    """Serve the real service over fakes; `handlers` may be a VmHandlers subclass for a
    test that needs an answer the real service never gives."""
    daemon = daemon or build_fake_daemon()
    h2_fixes.apply()  # as app.serve does
    metrics = PrometheusMetrics(
        MetricSources(
            daemon.store,
            [daemon.backend.name],
            live_vms=lambda: daemon.service.registry.snapshot().values(),
        )
    )
    connect_app = VmServiceASGIApplication(
        handlers(daemon.service),
        interceptors=api_interceptors(
            TokenAuthenticator(dev_tokens=True),
            metrics,
            after_auth=[RecordingInterceptor(daemon.calls)],
        ),
    )
    health = Health(
        backend=daemon.backend.name,
        accelerator=daemon.backend.accelerator,
        checks={"store": daemon.store.ping},
    )
    app = MetaldASGI(connect_app, health, metrics)
    with serve_in_thread(app, startup=daemon.service.start) as address:
        daemon.address = address
        yield daemon


@contextlib.contextmanager
def serve_in_thread(
    app: Any, startup: Callable[[], Awaitable[None]] | None = None
) -> Iterator[str]:
    """Serve an ASGI app with hypercorn on 127.0.0.1 (a free port) in a background thread,
    after running `startup` in the server's event loop.

    Yields the base address (`http://127.0.0.1:<port>`); stops the server on exit.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)  # connections queue from here on, so no wait for start-up is needed
    port = sock.getsockname()[1]

    config = Config()
    config.bind = [f"fd://{sock.detach()}"]  # hypercorn owns (and closes) the socket now
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = 1.0

    loop = asyncio.new_event_loop()
    stop = threading.Event()
    stopped = asyncio.Event()
    failure: list[BaseException] = []

    async def main() -> None:
        async def wait_for_stop() -> None:
            await stopped.wait()

        if startup is not None:
            await startup()
        await serve(app, config, shutdown_trigger=wait_for_stop)

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(main())
        except BaseException as err:  # reported to the test thread below
            failure.append(err)
        finally:
            loop.close()
            stop.set()

    thread = threading.Thread(target=run, name=f"fake-metald-{port}", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        if not stop.is_set():
            loop.call_soon_threadsafe(stopped.set)
        thread.join(timeout=10)
        if thread.is_alive():
            raise RuntimeError("fake metald server did not stop")
        if failure:
            raise RuntimeError("fake metald server failed") from failure[0]

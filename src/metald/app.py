"""The one place that reads the settings and wires adapters into the service."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config as HypercornConfig

from metald.api import h2_fixes
from metald.api.auth import TokenAuthenticator
from metald.api.handlers import VmHandlers
from metald.api.http import MetaldASGI
from metald.api.interceptors import AuthAndErrorsInterceptor, MetricsInterceptor
from metald.assets.store import LocalAssetStore
from metald.backends.qemu.backend import QemuBackend
from metald.config import BackendKind, ConfigError, Settings, load_settings
from metald.core.ports import Backend
from metald.core.validation import Limits
from metald.gen.vmprovisioner.v1.vm_connect import VmServiceASGIApplication
from metald.observability.health import Health
from metald.observability.metrics import ApiMetrics
from metald.service.vm_service import VmService
from metald.store.sqlite import SqlStore

log = logging.getLogger("metald")


class StartupError(Exception):
    """metald cannot start; the message says what to install or set."""


@dataclass
class Daemon:
    settings: Settings
    asgi: MetaldASGI
    service: VmService


def build_backend(settings: Settings) -> Backend:
    if settings.backend is BackendKind.FIRECRACKER:
        raise StartupError(
            "UNKEY_METALD_BACKEND=firecracker: the Firecracker backend is not part of this "
            "version yet; set UNKEY_METALD_BACKEND=qemu"
        )
    return QemuBackend(
        settings.vm_dir, qemu_binary=settings.qemu_binary, accelerator=settings.qemu_accel.value
    )


@asynccontextmanager
async def running_daemon(settings: Settings) -> AsyncIterator[Daemon]:
    """Everything started and reconciled; on exit, control connections closed (VMs live on)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    settings.vm_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = SqlStore(settings.effective_database_url)
    backend = build_backend(settings)
    try:
        await store.migrate()
        await backend.start()
        assets = LocalAssetStore(settings.assetmanager_cache_dir)
        service = VmService(
            store,
            backend,
            assets,
            Limits(max_vcpus=settings.vcpu_limit, max_memory_bytes=settings.memory_limit),
            default_shutdown_timeout=float(settings.shutdown_timeout_seconds),
        )
        await service.start()
        metrics = ApiMetrics()
        authenticator = TokenAuthenticator(
            dev_tokens=settings.auth_dev_tokens, tokens_file=settings.auth_tokens_file
        )
        connect_app = VmServiceASGIApplication(
            VmHandlers(service),
            interceptors=[MetricsInterceptor(metrics), AuthAndErrorsInterceptor(authenticator)],
            read_max_bytes=settings.max_request_bytes,
        )

        async def check_assets() -> None:
            assets.ping()

        health = Health(
            backend=backend.name,
            accelerator=backend.accelerator,
            checks={"store": store.ping, "assets": check_assets},
        )
        yield Daemon(settings, MetaldASGI(connect_app, health, metrics, store), service)
    finally:
        await backend.close()
        await store.close()


async def serve(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    h2_fixes.apply()
    async with running_daemon(settings) as daemon:
        config = HypercornConfig()
        host = f"[{settings.address}]" if ":" in settings.address else settings.address
        config.bind = [f"{host}:{settings.port}"]
        config.accesslog = None
        # hypercorn closes a connection after 1000 requests by default; gRPC clients keep
        # one connection for everything (notes/connect-stack.md).
        config.keep_alive_max_requests = 2**31
        config.graceful_timeout = 5.0
        log.info(
            "metald serving on %s:%s (backend %s, dev tokens %s); state in %s, assets in %s",
            settings.address,
            settings.port,
            settings.backend.value,
            "on" if settings.auth_dev_tokens else "off",
            settings.data_dir,
            settings.assetmanager_cache_dir,
        )
        await hypercorn_serve(daemon.asgi, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]
    log.info("metald stopped; VMs keep running and are adopted at the next start")


def run() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = load_settings()
        asyncio.run(serve(settings))
    except (ConfigError, StartupError) as exc:
        print(f"metald: {exc}", file=sys.stderr)
        raise SystemExit(2) from None

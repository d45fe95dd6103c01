"""The one place that reads the settings and wires adapters into the service."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import grp
import logging
import os
import pwd
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from metald import __version__, auth_setup
from metald.api import server
from metald.api.admin_handlers import AdminHandlers
from metald.api.auth import TokenAuthenticator, is_loopback_only
from metald.api.codecs import api_codecs
from metald.api.handlers import VmHandlers
from metald.api.health import Health
from metald.api.http import MetaldASGI
from metald.api.interceptors import Guard, api_interceptors
from metald.api.metrics_listener import MetricsListener
from metald.api.mtls import CertificateAuthenticator
from metald.api.tls import TlsError
from metald.assets.store import LocalAssetStore
from metald.backends.firecracker.driver import FirecrackerDriver
from metald.backends.qemu.driver import QemuDriver
from metald.backends.vmm.context import LogCaps
from metald.backends.vmm.driver import VmmDriver
from metald.backends.vmm.jail import JailSettings
from metald.backends.vmm.runtime import VmmRuntime
from metald.billing.client import ConnectBilling
from metald.billing.mock import MockBilling
from metald.config import BackendKind, ConfigError, HttpServer, Settings, load_settings
from metald.core import tracing
from metald.core.errors import MetaldError
from metald.core.metering import MeteringStats
from metald.core.models import VmRecord
from metald.core.ports import Audit, Backend, Billing, JailIds, Network, Store
from metald.core.quotas import HostCeiling, QuotaDefaults, Resource, VmMaxima
from metald.core.ratelimit import CustomerLimits, FailedAuthLimits, Limit, parse_overrides
from metald.core.telemetry import ApiTelemetry
from metald.core.validation import Limits
from metald.gen.metald.admin.v1.admin_connect import AdminServiceASGIApplication
from metald.gen.vmprovisioner.v1 import vm_connect
from metald.gen.vmprovisioner.v1.vm_connect import VmServiceASGIApplication
from metald.host import caps
from metald.jailer.cgroup_check import cgroup_limit_problems
from metald.jailer.needs import JAILER_CAPABILITIES
from metald.network.manager import NetworkManager
from metald.network.models import NetworkMode, NetworkSettings
from metald.network.port import NetlinkNetwork, NoNetwork
from metald.observability import logs
from metald.observability.billing import TracedBilling
from metald.observability.prometheus import MetricSources, PrometheusMetrics
from metald.service.admin_service import AdminService
from metald.service.admission import Admission
from metald.service.delivery import Delivery, DeliverySettings
from metald.service.metering import METERED_STATES, Collector, CollectorSettings
from metald.service.metering_loops import MeteringLoops
from metald.service.vm_service import VmService
from metald.store.addresses import SqlAddressBook
from metald.store.api_keys import SqlApiKeys
from metald.store.audit_log import SqlAuditLog
from metald.store.database import Database
from metald.store.jail_ids import SqlJailIds
from metald.store.quotas import SqlQuotas
from metald.store.sqlite import SqlStore
from metald.store.usage_log import SqlUsageLog
from metald.tls_setup import TlsSetup, tls_setup

if TYPE_CHECKING:
    from metald.observability.tracing import OtelTracer

log = logging.getLogger("metald")


class StartupError(Exception):
    """metald cannot start; the message says what to install or set."""


@dataclass
class Daemon:
    settings: Settings
    asgi: MetaldASGI
    service: VmService
    metering: MeteringStats | None = None  # None: billing is off, nothing is metered
    tls: TlsSetup | None = None  # None: plaintext (UNKEY_METALD_TLS_MODE=disabled)


def build_tls(settings: Settings) -> TlsSetup | None:
    """The API port's TLS (tls_setup.py): bad or missing material stops start-up."""
    try:
        return tls_setup(settings)
    except TlsError as exc:
        raise StartupError(str(exc)) from None


def check_exposure(settings: Settings) -> None:
    """Refuse what would hand the host to whoever reaches the port: development tokens on
    an address other hosts can reach, and VMMs run unjailed as root. Each has an explicit
    setting that allows it anyway, logged as a warning at every start."""
    if settings.auth_dev_tokens and not is_loopback_only(settings.address):
        if not settings.auth_dev_tokens_insecure:
            raise StartupError(
                f"UNKEY_METALD_AUTH_DEV_TOKENS=true lets anyone who reaches the API act as any "
                f"customer, and UNKEY_METALD_ADDRESS={settings.address} is not loopback: set "
                "UNKEY_METALD_ADDRESS=127.0.0.1 (or ::1), or give real tokens with "
                "UNKEY_METALD_AUTH_TOKENS_FILE and UNKEY_METALD_AUTH_DEV_TOKENS=false, or (never "
                "in production) UNKEY_METALD_AUTH_DEV_TOKENS_INSECURE=true"
            )
        log.warning(
            "INSECURE: development tokens are accepted on %s, which is not loopback: anyone "
            "who reaches the API can act as any customer (UNKEY_METALD_AUTH_DEV_TOKENS_INSECURE"
            "=true)",
            settings.address,
        )
    interface = settings.otel_prometheus_interface
    if settings.otel_prometheus_enabled and not is_loopback_only(interface):
        if not settings.otel_prometheus_allow_remote:
            raise StartupError(
                f"UNKEY_METALD_OTEL_PROMETHEUS_INTERFACE={interface} is not loopback, and the "
                "metrics listener has no auth and no TLS: set it to 127.0.0.1 (and scrape "
                "through a local agent or the API port's /metrics), or set "
                "UNKEY_METALD_OTEL_PROMETHEUS_ALLOW_REMOTE=true to serve it there anyway"
            )
        log.warning(
            "the metrics listener on %s is not loopback: anyone who reaches it reads metald's "
            "metrics (UNKEY_METALD_OTEL_PROMETHEUS_ALLOW_REMOTE=true)",
            interface,
        )
    if not settings.jailer_enabled and os.geteuid() == 0:
        if not settings.allow_unjailed_root:
            raise StartupError(
                "UNKEY_METALD_JAILER_ENABLED=false while metald runs as root would run every "
                "VMM as root on the host: enable the jailer, or run metald as an unprivileged "
                "user, or (development only) set UNKEY_METALD_ALLOW_UNJAILED_ROOT=true"
            )
        log.warning(
            "INSECURE: the jailer is disabled and metald runs as root: every VMM runs as root "
            "on the host (UNKEY_METALD_ALLOW_UNJAILED_ROOT=true)"
        )


def jail_settings(settings: Settings) -> JailSettings | None:
    if not settings.jailer_enabled:
        log.warning("jailer disabled: VMMs run as metald's own user, without networking")
        return None
    if not caps.privileged(JAILER_CAPABILITIES):
        raise StartupError(
            "the jailer needs root or the capabilities "
            f"{', '.join(caps.missing(JAILER_CAPABILITIES))} (it enters namespaces, chroots and "
            "drops to an unprivileged user); run metald as root, or as the systemd unit's user "
            "with its capabilities (contrib/systemd/metald.service), or set "
            "UNKEY_METALD_JAILER_ENABLED=false"
        )
    bounds = settings.jailer_uid_bounds
    try:
        if bounds is not None:
            _check_uid_range_unused(*bounds)
            uid = gid = bounds[0]
        else:
            if not settings.jailer_shared_uid_insecure:
                raise StartupError(
                    "UNKEY_METALD_JAILER_UID_RANGE is empty: every VMM would share one uid and "
                    "could reach another; set a range, or UNKEY_METALD_JAILER_SHARED_UID_INSECURE"
                    "=true (development only)"
                )
            log.warning("INSECURE: every VMM runs as one shared uid (no UID range set)")
            shared_uid, shared_gid = settings.jailer_uid, settings.jailer_gid
            if shared_uid is None or shared_gid is None:
                user = JailSettings.for_user("metald-vm")
                shared_uid, shared_gid = shared_uid or user.uid, shared_gid or user.gid
            uid, gid = shared_uid, shared_gid
        jail = JailSettings(
            uid=uid,
            gid=gid,
            chroot_base=settings.jailer_chroot_dir,
            cgroup_parent=settings.jailer_cgroup_parent,
            pids_max=settings.jailer_pids_max,
            required_cgroup=settings.jailer_cgroup_required,
            uid_range=bounds,
            nproc_max=settings.jailer_nproc_max,
            nofile_max=settings.jailer_nofile_max,
            file_size_max=settings.jailer_file_size_max_bytes,
            spare_helpers=settings.jailer_spare_helpers,
        )
    except (ValueError, OSError) as exc:
        raise StartupError(f"UNKEY_METALD_JAILER_*: {exc}") from None
    problems = cgroup_limit_problems(jail.cgroup(memory_bytes=1, vcpu_count=1))
    if problems and settings.jailer_cgroup_required:
        raise StartupError(
            "UNKEY_METALD_JAILER_CGROUP_REQUIRED=true, but this host cannot apply the VM "
            f"cgroup limits: {'; '.join(problems)}"
        )
    if problems:
        log.warning(
            "VM cgroup v2 limits will not (all) apply on this host: %s", "; ".join(problems)
        )
    return jail


def _check_uid_range_unused(first: int, last: int) -> None:
    """No host user or group may hold an id of the VMMs' range (a VMM would be that user)."""
    users = [p.pw_name for p in pwd.getpwall() if first <= p.pw_uid <= last]
    groups = [g.gr_name for g in grp.getgrall() if first <= g.gr_gid <= last]
    if users or groups:
        raise StartupError(
            f"UNKEY_METALD_JAILER_UID_RANGE={first}-{last} holds host ids "
            f"(users: {', '.join(users) or 'none'}; groups: {', '.join(groups) or 'none'}): "
            "choose a range no user or group uses"
        )


def build_backend(
    settings: Settings, kind: BackendKind, jail_ids: JailIds | None = None
) -> VmmRuntime:
    """The runtime of one VMM backend, not started yet. `jail_ids`: where each VM's own
    VMM uid is claimed (needed with a uid range: start_backends passes the store's)."""
    if kind is BackendKind.FIRECRACKER:
        driver: VmmDriver = FirecrackerDriver(
            settings.firecracker_binary,
            skip_kvm_check=settings.firecracker_skip_kvm_check,
            extra_jail_paths=settings.firecracker_extra_jail_paths,
        )
    else:
        driver = QemuDriver(settings.qemu_binary, settings.qemu_accel.value)
    jail = jail_settings(settings)
    return VmmRuntime(
        driver,
        settings.vm_dir,
        jail=jail,
        guest_agent=settings.guest_agent,
        jail_ids=jail_ids if jail is not None and jail.uid_range is not None else None,
        log_caps=LogCaps(
            console_bytes=settings.console_log_max_bytes,
            stderr_bytes=settings.vmm_stderr_max_bytes,
            interval=settings.log_check_seconds,
        ),
    )


async def start_backends(
    settings: Settings, store: Store, jail_ids: JailIds | None = None
) -> dict[str, Backend]:
    """The configured backend (UNKEY_METALD_BACKEND: it must start, or start-up stops with
    what to install or set), and every other backend that VMs in the store still run on, so
    they are adopted; one of those that cannot start is logged and its VMs left alone."""
    default = build_backend(settings, settings.backend, jail_ids)
    try:
        await default.start()
    except MetaldError as e:
        raise StartupError(f"UNKEY_METALD_BACKEND={settings.backend.value}: {e.message}") from None
    backends: dict[str, Backend] = {default.name: default}
    wanted = await store.live_backends() - set(backends)
    for name in sorted(wanted):
        try:
            other = build_backend(settings, BackendKind(name), jail_ids)
            await other.start()
        except (ValueError, MetaldError) as e:
            detail = e.message if isinstance(e, MetaldError) else str(e)
            log.error("VMs on the %s backend cannot be managed by this daemon: %s", name, detail)
            continue
        backends[other.name] = other
    return backends


def build_network(settings: Settings, database: Database) -> Network:
    if not settings.network_enabled:
        return NoNetwork()
    if not settings.jailer_enabled:
        raise StartupError(
            "networking needs the jailer (it makes each VM's TAP inside the VM's namespace): "
            "set UNKEY_METALD_NETWORK_ENABLED=false or enable the jailer"
        )
    rate = default_rate_limit_mbps(settings)
    try:
        net_settings = NetworkSettings(
            bridge=settings.network_bridge,
            ipv4_enabled=settings.network_ipv4_enabled,
            ipv6_enabled=settings.network_ipv6_enabled,
            bridge_ipv4=settings.network_bridge_ipv4,
            vm_subnet_ipv4=settings.network_vm_subnet_ipv4,
            dns_ipv4=_split(settings.network_dns_ipv4),
            bridge_ipv6=settings.network_bridge_ipv6,
            vm_subnet_ipv6=settings.network_vm_subnet_ipv6,
            dns_ipv6=_split(settings.network_dns_ipv6),
            default_mode=NetworkMode(settings.network_ipv6_mode),
            default_rate_limit_mbps=rate,
            netns_prefix=settings.network_netns_prefix,
            host_allow=settings.network_host_allow,
        )
        manager = NetworkManager(
            settings.network_host_netns or None,
            SqlAddressBook(database),
            net_settings,
            segments_netns=settings.network_segments_netns,
        )
    except ValueError as exc:
        raise StartupError(str(exc)) from None
    return NetlinkNetwork(manager)


def build_billing(settings: Settings) -> Billing | None:
    """Where usage goes (UNKEY_METALD_BILLING_*): None when billing is off, a logger in mock
    mode, else the billing.v1 client of the endpoint (it connects on its first call). With
    traces on (UNKEY_METALD_OTEL_ENABLED) every billing call is a span."""
    billing = _billing(settings)
    if billing is not None and settings.otel_enabled:
        return TracedBilling(billing)
    return billing


def _billing(settings: Settings) -> Billing | None:
    if not settings.billing_enabled:
        log.info("billing disabled: usage is not sent anywhere")
        return None
    if settings.billing_mock_mode:
        log.warning("billing mock mode: usage calls are logged, not sent")
        return MockBilling()
    log.info("billing: usage goes to %s", settings.billing_endpoint)
    return ConnectBilling(
        settings.billing_endpoint,
        timeout=settings.billing_timeout_seconds,
        connect_timeout=settings.billing_connect_timeout_seconds,
    )


def default_rate_limit_mbps(settings: Settings) -> int:
    """The rate a VM gets when its request gives none: the configured default, or without
    one the operator's maximum (a tenant cannot pass the cap by asking for nothing)."""
    cap = settings.network_rate_limit_max_mbps
    rate = settings.network_rate_limit_mbps if settings.network_rate_limit else cap
    if cap and rate > cap:
        raise StartupError(
            f"UNKEY_METALD_NETWORK_RATE_LIMIT_MBPS ({rate}) is above "
            f"UNKEY_METALD_NETWORK_RATE_LIMIT_MAX_MBPS ({cap})"
        )
    return rate


def build_admission(settings: Settings, database: Database) -> Admission:
    """Quotas from the settings (defaults) and the database (overrides), the host's ceiling
    and the per-VM maxima; refuses a ceiling that leaves nothing for guests."""
    host = HostCeiling(memory_bytes=settings.host_memory_ceiling, vcpus=settings.host_vcpu_ceiling)
    if host.memory_bytes <= 0:
        raise StartupError(
            "UNKEY_METALD_HOST_MEMORY_RESERVE_BYTES leaves no memory for guests: lower it or "
            "set UNKEY_METALD_HOST_MEMORY_BYTES"
        )
    if host.vcpus <= 0:
        raise StartupError(
            "UNKEY_METALD_HOST_VCPU_RESERVE leaves no vCPUs for guests: lower it or set "
            "UNKEY_METALD_HOST_VCPUS"
        )
    defaults = quota_defaults(settings)
    maxima = VmMaxima(
        disks=settings.max_disks,
        disk_bytes=settings.max_disk_bytes,
        rate_limit_bandwidth=settings.network_rate_limit_max_mbps * 1_000_000 // 8,
    )
    log.info(
        "admission: host ceiling %d vCPUs, %d MiB guest memory; per VM at most %d vCPUs, %d MiB",
        host.vcpus,
        host.memory_bytes // 2**20,
        settings.vcpu_limit,
        settings.memory_limit // 2**20,
    )
    return Admission(SqlQuotas(database), defaults, host, maxima, _file_size)


def quota_defaults(settings: Settings) -> QuotaDefaults:
    """The per-customer quota defaults (UNKEY_METALD_QUOTA_*)."""
    return QuotaDefaults({r: getattr(settings, f"quota_{r.value}") for r in Resource})


def instance_id(data_dir: Path) -> str:
    """This host's billing instance id: made once, kept in the data directory."""
    path = data_dir / "instance_id"
    try:
        found = path.read_text().strip()
        if found:
            return found
    except FileNotFoundError:
        pass
    made = f"metald-{uuid.uuid4().hex}"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(made + "\n")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return made


def build_metering(
    settings: Settings,
    billing: Billing,
    database: Database,
    backends: dict[str, Backend],
    network: Network,
    live_vms: Callable[[], list[VmRecord]],
    stats: MeteringStats,
) -> MeteringLoops:
    """The collector and the delivery of usage to `billing` (service/metering.py,
    delivery.py), keeping their totals in `stats` (what /metrics shows)."""
    usage_log = SqlUsageLog(database)
    delivery = Delivery(
        usage_log,
        billing,
        stats,
        instance_id(settings.data_dir),
        lambda: [vm.id for vm in live_vms() if vm.state in METERED_STATES],
        DeliverySettings(
            batch_size=settings.billing_batch_size,
            flush_interval=settings.billing_flush_interval_ms / 1000,
            retry_initial=settings.billing_retry_initial_ms / 1000,
            retry_max=max(settings.billing_retry_max_ms, settings.billing_retry_initial_ms) / 1000,
            heartbeat_interval=settings.billing_heartbeat_interval_seconds,
            retention=settings.billing_retention_hours * 3600,
        ),
    )
    collector = Collector(
        usage_log,
        backends,
        network,
        live_vms,
        stats,
        CollectorSettings(
            interval=settings.metering_interval_ms / 1000,
            sample_timeout=settings.metering_sample_timeout_ms / 1000,
            backlog_max=settings.billing_backlog_max,
        ),
        on_stored=delivery.wake,
    )
    return MeteringLoops(collector, delivery, billing, settings.billing_shutdown_flush_seconds)


def _file_size(path: Path) -> int:
    return path.stat().st_size


def _split(values: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in values.split(",") if v.strip())


def build_tracer(settings: Settings) -> OtelTracer | None:
    """The OTLP/HTTP trace pipeline when UNKEY_METALD_OTEL_ENABLED is on. OpenTelemetry is
    imported only then (its SDK and exporter cost about 0.2 s and 15 MB to import)."""
    if not settings.otel_enabled:
        return None
    from metald.observability.tracing import OtelTracer

    try:
        tracer = OtelTracer(
            endpoint=settings.otel_endpoint,
            service_name=settings.otel_service_name,
            sampling_rate=settings.otel_sampling_rate,
        )
    except ValueError as exc:
        raise StartupError(f"UNKEY_METALD_OTEL_ENDPOINT: {exc}") from None
    log.info(
        "traces: OTLP/HTTP to %s (service %s, sampling %g, parent-based)",
        tracer.url,
        settings.otel_service_name,
        settings.otel_sampling_rate,
    )
    return tracer


@asynccontextmanager
async def running_daemon(settings: Settings) -> AsyncIterator[Daemon]:
    """Everything started and reconciled; on exit, control connections closed (VMs live on)."""
    check_exposure(settings)
    tls = build_tls(settings)
    tracer = build_tracer(settings)
    with tracing.installed(tracer):
        try:
            async with _running_daemon(settings, tls) as daemon:
                yield daemon
        finally:
            if tracer is not None:
                tracer.shutdown()  # exports what is pending


@asynccontextmanager
async def _running_daemon(settings: Settings, tls: TlsSetup | None) -> AsyncIterator[Daemon]:
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    settings.vm_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    guard = build_guard(settings, None)  # a bad rate-limit file stops start-up here
    database = Database(settings.effective_database_url)  # one engine: store and addresses
    store = SqlStore(database)
    network = build_network(settings, database)
    admission = build_admission(settings, database)
    backends: dict[str, Backend] = {}
    metering: MeteringLoops | None = None
    listener: MetricsListener | None = None
    identity = contextlib.AsyncExitStack()  # the auth chain's life (a JWKS URL's task)
    audit_log: SqlAuditLog | None = None
    try:
        await database.migrate()
        try:  # before anything starts: a bad credential setting stops start-up
            authenticator = await identity.enter_async_context(
                auth_setup.authenticator(settings, database)
            )
        except auth_setup.AuthSetupError as exc:
            raise StartupError(str(exc)) from None
        bounds = settings.jailer_uid_bounds
        jail_ids = None if bounds is None else SqlJailIds(database, *bounds)
        backends = await start_backends(settings, store, jail_ids)
        backend = backends[settings.backend.value]
        await network.start()
        assets = LocalAssetStore(
            settings.assetmanager_cache_dir, legacy_link_dirs=[settings.jailer_chroot_dir]
        )
        # Metering's totals (service/metering.py updates them; /metrics reads them).
        metering_stats = MeteringStats()

        def live_vms() -> Iterable[VmRecord]:
            return service.registry.snapshot().values()

        metrics = PrometheusMetrics(
            MetricSources(
                store=store,
                backends=sorted(backends),
                live_vms=live_vms,
                metering=metering_stats,
                host_vcpus=settings.host_vcpu_ceiling,
                host_memory_bytes=settings.host_memory_ceiling,
                version=__version__,
            )
        )
        billing = build_billing(settings)
        if billing is not None:
            metering = build_metering(
                settings,
                billing,
                database,
                backends,
                network,
                lambda: service.registry.records(),
                metering_stats,
            )
        service = VmService(
            store,
            backends,
            assets,
            network,
            Limits(max_vcpus=settings.vcpu_limit, max_memory_bytes=settings.memory_limit),
            admission=admission,
            default_backend=backend.name,
            default_shutdown_timeout=float(settings.shutdown_timeout_seconds),
            host_details=settings.expose_host_details,
            telemetry=metrics,
            metering=metering.collector if metering is not None else None,
        )
        if settings.expose_host_details:
            log.warning(
                "UNKEY_METALD_EXPOSE_HOST_DETAILS is on: tenants see host pids, paths and "
                "versions in backend_info (development and tests only)"
            )
        await service.start()
        if metering is not None:
            await metering.start()
        # The audit log's writer (the rate limits were read above).
        audit_log = SqlAuditLog(database, queue_max=settings.audit_queue_max)
        if settings.audit_enabled:
            await audit_log.start()
            guard = dataclasses.replace(guard, audit=audit_log)
        tls_certificates = tls.certificates if tls is not None else None
        connect_app = connect_application(
            VmHandlers(service), authenticator, metrics, settings.max_request_bytes,
            guard=guard, certificates=tls_certificates,
        )  # fmt: skip

        async def check_assets() -> None:
            assets.ping()

        health = Health(
            backend=backend.name,
            accelerator=backend.accelerator,
            checks={"store": store.ping, "assets": check_assets},
        )
        admin = AdminService(
            SqlApiKeys(database),
            SqlQuotas(database),
            quota_defaults(settings),
            pepper=auth_setup.read_pepper(settings.auth_pepper_file)
            if settings.auth_api_keys
            else None,
            clock=time.time,
        )
        admin_app = AdminServiceASGIApplication(
            AdminHandlers(admin),
            interceptors=api_interceptors(
                authenticator, metrics, guard=guard, certificates=tls_certificates
            ),
            read_max_bytes=settings.max_request_bytes,
            codecs=api_codecs(),
        )
        asgi = MetaldASGI(
            connect_app,
            health,
            metrics,
            body_timeout=settings.request_body_timeout_seconds,
            more_services={admin_app.path: admin_app},
        )
        if settings.otel_prometheus_enabled:
            listener = await start_metrics_listener(settings, metrics.exposition)
        yield Daemon(settings, asgi, service, metering_stats if metering else None, tls)
    finally:
        if audit_log is not None:
            await audit_log.stop()  # every queued row written (the server has stopped)
        if metering is not None:
            await metering.stop()
        if listener is not None:
            await listener.close()
        for each in backends.values():
            await each.close()
        await network.stop()
        await identity.aclose()
        await database.close()


async def start_metrics_listener(
    settings: Settings, render: Callable[[], Awaitable[bytes]]
) -> MetricsListener:
    listener = MetricsListener(render)
    host, port = settings.otel_prometheus_interface, settings.otel_prometheus_port
    try:
        await listener.start(host, port)
    except OSError as exc:
        raise StartupError(
            f"UNKEY_METALD_OTEL_PROMETHEUS_INTERFACE/_PORT: cannot listen on {host}:{port} "
            f"({exc.strerror or exc}): choose another port, or set "
            "UNKEY_METALD_OTEL_PROMETHEUS_ENABLED=false"
        ) from None
    log.info("Prometheus metrics on http://%s:%d/metrics", host, listener.port)
    return listener


def build_guard(settings: Settings, audit: Audit | None) -> Guard:
    """The audit port and the rate limits (UNKEY_METALD_RATE_LIMIT_*)."""
    if not settings.rate_limit_enabled:
        return Guard(audit=audit)
    try:
        path = settings.rate_limit_file
        overrides = parse_overrides(path.read_text(), str(path)) if path else {}
    except (OSError, ValueError) as exc:
        raise StartupError(f"UNKEY_METALD_RATE_LIMIT_FILE: {exc}") from None
    default = Limit(settings.rate_limit_rate, settings.rate_limit_burst)
    failed = Limit(settings.rate_limit_auth_failures_rate, settings.rate_limit_auth_failures_burst)
    log.info(
        "rate limits: %g calls/s per customer (burst %g, mutating calls cost %g; %d overrides); "
        "failed authentication %g/s per source (burst %g)",
        default.rate, default.burst, settings.rate_limit_mutating_cost, len(overrides),
        failed.rate, failed.burst,
    )  # fmt: skip
    return Guard(
        audit=audit,
        customers=CustomerLimits(
            default, settings.rate_limit_mutating_cost, overrides, time.monotonic
        ),
        failed_auth=FailedAuthLimits(failed, time.monotonic, settings.rate_limit_sources_max),
    )


def connect_application(
    handlers: vm_connect.VmService,
    authenticator: TokenAuthenticator,
    metrics: ApiTelemetry,
    max_bytes: int,
    guard: Guard | None = None,
    certificates: CertificateAuthenticator | None = None,
) -> VmServiceASGIApplication:
    """The Connect/gRPC/gRPC-Web application around `handlers`, as metald serves it (the
    benchmarks' trivial ceilings are built with this too, so they measure the same stack)."""
    return VmServiceASGIApplication(
        handlers,
        interceptors=api_interceptors(
            authenticator, metrics, guard=guard, certificates=certificates
        ),
        read_max_bytes=max_bytes,
        codecs=api_codecs(),
    )


def server_options(settings: Settings, tls: TlsSetup | None = None) -> server.ServerOptions:
    return server.ServerOptions(
        address=settings.address,
        port=settings.port,
        h2_max_concurrent_streams=settings.http2_max_concurrent_streams,
        idle_timeout=settings.http_idle_timeout_seconds,
        server=settings.http_server.value,
        tls=tls.tls.server_context if tls is not None else None,
    )


async def serve(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if settings.http_server is not HttpServer.HYPERCORN:
        log.warning(
            "UNKEY_METALD_HTTP_SERVER=%s does not pass metald's protocol e2e suite "
            "(docs/performance.md, 'The server'): for measurements only",
            settings.http_server.value,
        )
    if settings.http_server is HttpServer.PYVOY:
        logging.disable(logging.WARNING)  # only its refusals here: the daemon logs the rest
        try:
            check_exposure(settings)
            build_tls(settings)  # refuses TLS: only hypercorn serves it
        finally:
            logging.disable(logging.NOTSET)
        os.environ["METALD_PYTHON"] = sys.executable
        options = server_options(settings)
        code = await server.serve_in_envoy("metald.embedded:app", options, stop.wait)
        if code:
            raise SystemExit(code)
        return
    async with running_daemon(settings) as daemon, _tls_reloading(daemon.tls):
        options = server_options(settings, daemon.tls)
        log.info(
            "metald serving on %s://%s:%s (backend %s, dev tokens %s); state in %s, assets in %s",
            "https" if daemon.tls else "http",
            settings.address,
            settings.port,
            settings.backend.value,
            "on" if settings.auth_dev_tokens else "off",
            settings.data_dir,
            settings.assetmanager_cache_dir,
        )
        await server.serve(daemon.asgi, options, stop.wait)
    log.info("metald stopped; VMs keep running and are adopted at the next start")


@asynccontextmanager
async def _tls_reloading(tls: TlsSetup | None) -> AsyncIterator[None]:
    """TLS material and the identities file re-read when their files change (every
    UNKEY_METALD_TLS_RELOAD_SECONDS) and on SIGHUP, while serving."""
    if tls is None:
        yield
        return
    interval = tls.reload_seconds
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, lambda: tls.check(force=True))
    watcher = asyncio.ensure_future(tls.run()) if interval else None
    current = tls.tls.current
    log.info(
        "TLS on the API port: certificate %s serial %x (expires %s), client certificates %s; "
        "the Prometheus listener stays plain HTTP",
        current.subject, current.serial, current.not_after.isoformat(),
        "required" if tls.tls.mutual else "not asked",
    )  # fmt: skip
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
        if watcher is not None:
            watcher.cancel()


def configure_logging(settings: Settings) -> None:
    logs.configure(settings.log_format.value, settings.log_level.value)


def run() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = load_settings()
        configure_logging(settings)
        asyncio.run(serve(settings))
    except (ConfigError, StartupError) as exc:
        print(f"metald: {exc}", file=sys.stderr)
        raise SystemExit(2) from None

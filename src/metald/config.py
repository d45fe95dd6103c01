"""Settings, read once at start-up from UNKEY_METALD_* environment variables (DESIGN §11)."""

from __future__ import annotations

import os
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class BackendKind(StrEnum):
    QEMU = "qemu"
    FIRECRACKER = "firecracker"


class HttpServer(StrEnum):
    """The ASGI server under the API (api/server.py; docs/performance.md, "The server")."""

    HYPERCORN = "hypercorn"
    UVICORN = "uvicorn"
    GRANIAN = "granian"
    PYVOY = "pyvoy"


class TlsMode(StrEnum):
    """UNKEY_METALD_TLS_MODE: plaintext, certificate files, or SPIFFE SVIDs."""

    DISABLED = "disabled"
    FILE = "file"
    SPIFFE = "spiffe"


class Accelerator(StrEnum):
    AUTO = "auto"
    KVM = "kvm"
    TCG = "tcg"


class LogFormat(StrEnum):
    AUTO = "auto"
    JSON = "json"
    TEXT = "text"


class LogLevel(StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


GIB = 1024**3


def _host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="UNKEY_METALD_", extra="ignore")

    # Transport
    port: int = Field(8080, ge=0, le=65535)
    address: str = "0.0.0.0"
    max_request_bytes: int = Field(1024 * 1024, ge=1024)
    # hypercorn; the others were measured against it and fail the protocol suite (startup
    # warns): they are here so that the measurement can be repeated.
    http_server: HttpServer = HttpServer.HYPERCORN

    # Backends
    backend: BackendKind = BackendKind.QEMU
    qemu_binary: str = "qemu-system-x86_64"
    qemu_accel: Accelerator = Accelerator.AUTO
    firecracker_binary: str = "firecracker"
    # Development only: start without proving KVM runs a guest (a stand-in, or a real
    # Firecracker on a host whose KVM cannot run guests). Logged as a warning at every start.
    firecracker_skip_kvm_check: bool = False
    # Read-only host paths a jailed Firecracker needs besides its binary's libraries (a VMM
    # wrapper's interpreter, say), comma-separated absolute paths.
    firecracker_jail_paths: str = ""

    # State
    data_dir: Path = Path("/opt/metald/data")
    database_url: str = ""  # empty: SQLite at <data_dir>/metald.db

    # Assets
    assetmanager_cache_dir: Path = Path("/opt/metald/assets")

    # Auth: development tokens `dev_customer_<id>` are accepted only when this is on.
    auth_dev_tokens: bool = False
    # Static tokens: lines of `<customer_id> <token>`.
    auth_tokens_file: Path | None = None

    shutdown_timeout_seconds: int = Field(30, ge=1, le=3600)

    # Jailer: every VMM runs in its own namespaces, chrooted, as an unprivileged user.
    jailer_enabled: bool = True  # false only for development without root
    jailer_uid: int | None = Field(None, ge=1)  # unset: the metald-vm system user
    jailer_gid: int | None = Field(None, ge=1)
    jailer_chroot_dir: Path = Path("/srv/jailer")
    jailer_cgroup_parent: str = "metald"
    # A shell on a second serial port of each guest, for the host to run commands in guests
    # (tests); off in production.
    guest_agent: bool = False

    # Networking (names and defaults as the existing metald's).
    network_enabled: bool = True
    network_ipv4_enabled: bool = True
    network_ipv6_enabled: bool = True
    network_bridge: str = "br-vms"
    network_bridge_ipv4: str = "10.100.0.1/16"
    network_vm_subnet_ipv4: str = "10.100.0.0/16"
    network_dns_ipv4: str = "8.8.8.8,8.8.4.4"
    network_bridge_ipv6: str = "fd00::1/64"
    network_vm_subnet_ipv6: str = "fd00::/64"
    network_dns_ipv6: str = "2606:4700:4700::1111,2606:4700:4700::1001"
    network_ipv6_mode: str = "dual-stack"
    network_rate_limit: bool = False
    network_rate_limit_mbps: int = Field(1000, ge=1)
    # The namespace that holds the host bridge: empty for metald's own. Tests point it at a
    # namespace they made; the netns prefix keeps two daemons' VMs apart.
    network_host_netns: str = ""
    network_segments_netns: str = "metald-segments"
    network_netns_prefix: str = "mvm-"

    # Guest network guard (issue 7): every guest's port drops spoofed MAC/IP sources, router
    # advertisements and DHCP server replies; guests reach the host's own services only
    # for what this lists: comma-separated tcp:<port>[-<port>], udp:<port>[-<port>], icmp
    # (echo requests); empty for nothing. Checked with the network settings at start-up.
    network_host_allow: str = "icmp"

    # -- Admission and quotas (issue 7; core/quotas.py says which VM states count) --------
    # Per-VM maxima: a request above one is invalid_argument. UNKEY_METALD_MAX_VCPUS and
    # UNKEY_METALD_MAX_MEMORY_BYTES keep their names; their 0 now means "as much as the
    # host's ceiling" (see below), no longer "all of the host's memory minus one byte".
    max_vcpus: int = Field(0, ge=0, le=32)  # 0: the host's core count
    max_memory_bytes: int = Field(0, ge=0)  # 0: the host's guest memory ceiling
    max_disks: int = Field(8, ge=0, le=8)
    max_disk_bytes: int = Field(64 * GIB, ge=1)  # per disk image
    # The host's ceiling on committed guest memory and vCPUs, over every customer's VMs
    # that hold a VMM (CREATED, RUNNING, PAUSED). Beyond it CreateVm/BootVm are refused
    # with resource_exhausted.
    host_memory_bytes: int = Field(0, ge=0)  # 0: physical memory minus the reserve
    host_memory_reserve_bytes: int = Field(1 * GIB, ge=0)  # for metald, VMMs, the system
    host_vcpus: int = Field(0, ge=0)  # 0: (cores - reserve) x overcommit
    host_vcpu_reserve: int = Field(0, ge=0)  # cores kept for metald and the system
    host_vcpu_overcommit: float = Field(4.0, gt=0, le=64)  # vCPUs per remaining core
    # Per-customer defaults (unset: no limit); per-customer overrides live in the database
    # (`metald quota set`). 0 allows none.
    quota_running_vms: int | None = Field(None, ge=0)
    quota_vms: int | None = Field(None, ge=0)
    quota_vcpus: int | None = Field(None, ge=0)
    quota_memory_bytes: int | None = Field(None, ge=0)
    quota_disk_bytes: int | None = Field(None, ge=0)
    # The most a tenant may ask for per direction, Mbit/s (0: no maximum). A request above
    # it is refused; with no default (NETWORK_RATE_LIMIT off) it is also the default.
    network_rate_limit_max_mbps: int = Field(0, ge=0)

    # API exposure and hostile clients (issue 7: the API and the host network).
    # Development tokens (`dev_customer_<id>`: anyone can be anyone) are refused at start-up
    # unless the API listens only on loopback; this accepts them on any address anyway,
    # logged as a warning at every start. Never in production.
    auth_dev_tokens_insecure: bool = False
    # Seconds an RPC's body may take to arrive, counted from its headers; a slower body is
    # answered `deadline_exceeded`. (A call without a valid token is answered from its
    # headers: its body is never read.)
    request_body_timeout_seconds: float = Field(10.0, gt=0, le=600)
    # Calls in flight on one HTTP/2 connection (SETTINGS_MAX_CONCURRENT_STREAMS; HTTP/1.1
    # has one by nature). A client that opens more loses the connection.
    http2_max_concurrent_streams: int = Field(32, ge=1, le=1000)
    # Seconds a connection may stay without a call in flight, including one whose request
    # headers are not complete yet, before it is closed.
    http_idle_timeout_seconds: float = Field(5.0, gt=0, le=3600)
    # Running VMMs without the jailer (UNKEY_METALD_JAILER_ENABLED=false) while metald is
    # root gives every VMM root on the host; start-up refuses that unless this is on.
    allow_unjailed_root: bool = False

    # What a tenant is shown (issue 7, inputs): GetVmInfo's backend_info holds only the
    # accelerator and the exit reason; pid, socket and console paths and the VMM's version
    # are logged for operators. On, tenants see them too: development hosts and tests only
    # (a warning at every start).
    expose_host_details: bool = False

    # VMM isolation (issue 7: one VMM cannot reach another). Each VMM runs as its own uid and
    # gid (one number), claimed from this range and recorded in the store; no host user or
    # group may have an id in it. Empty: every VMM shares UNKEY_METALD_JAILER_UID (or the
    # metald-vm user) and one VMM could reach another (refused unless insecure is allowed).
    jailer_uid_range: str = "200000-265535"
    jailer_shared_uid_insecure: bool = False
    # Start-up refuses when the VMs' cgroup v2 limits (memory.max, cpu.max, pids.max) cannot
    # be applied on this host; false: they are applied where the host offers them (logged).
    jailer_cgroup_required: bool = False
    jailer_pids_max: int = Field(512, ge=16)  # the VM cgroup's pids.max
    # Limits that hold without cgroups (setrlimit on the VMM; NPROC counts the threads of the
    # VMM's uid, i.e. of that VM alone).
    jailer_nproc_max: int = Field(512, ge=16)
    jailer_nofile_max: int = Field(4096, ge=64)
    # RLIMIT_FSIZE: no file the VMM writes grows past this, or past its largest writable
    # disk when that is bigger (a disk must stay writable to its end).
    jailer_file_size_max_bytes: int = Field(64 * 1024 * 1024, ge=1024 * 1024)
    # Jailer helpers started ahead of need (jailer/spares.py): a CreateVm then does not wait
    # for a Python interpreter to start. Each waits at idle CPU priority (about 20 MB); 0:
    # every launch starts its own helper.
    jailer_spare_helpers: int = Field(2, ge=0, le=64)
    # The console log and the VMM's stderr are cut back to their newest half by metald
    # once they pass these sizes (checked every UNKEY_METALD_LOG_CHECK_SECONDS).
    console_log_max_bytes: int = Field(1024 * 1024, ge=4096)
    vmm_stderr_max_bytes: int = Field(256 * 1024, ge=4096)
    log_check_seconds: float = Field(1.0, gt=0, le=60)

    # -- Observability (issue 9, ops): traces and the daemon's log ------------------------
    # OpenTelemetry traces over OTLP/HTTP (observability/tracing.py): the endpoint is
    # host:port (http://host:port/v1/traces) or a URL; parent-based ratio sampling.
    otel_enabled: bool = False
    otel_endpoint: str = "localhost:4318"
    otel_service_name: str = "metald"
    otel_sampling_rate: float = Field(1.0, ge=0.0, le=1.0)
    # `metald serve`'s log: json, text, or auto (JSON unless stderr is a terminal).
    log_format: LogFormat = LogFormat.AUTO
    log_level: LogLevel = LogLevel.INFO

    # Billing client (issue 9, billing-sink): the billing.v1 service usage goes to (the
    # existing billaged, or `metald billing-sink`); off: no billing calls at all; mock: each
    # call is one JSON log line and goes nowhere. A call that does not finish within the
    # timeout (or cannot connect within the connect timeout) counts as not delivered.
    billing_enabled: bool = True
    billing_endpoint: str = "http://localhost:8081"
    billing_mock_mode: bool = False
    billing_timeout_seconds: float = Field(5.0, gt=0, le=300)
    billing_connect_timeout_seconds: float = Field(2.0, gt=0, le=60)

    @field_validator("billing_endpoint")
    @classmethod
    def _billing_url(cls, value: str) -> str:
        scheme, sep, rest = value.partition("://")
        if scheme not in ("http", "https") or not sep or not rest.strip("/"):
            raise ValueError(f"{value!r} is not a URL like http://localhost:8081")
        return value.rstrip("/")

    # -- Prometheus metrics (issue 9, metrics): /metrics on the API port, and on this
    # dedicated plain-HTTP listener (no auth) as the existing metald has it. A non-loopback
    # interface is refused at start-up unless _ALLOW_REMOTE says so (logged at every start).
    otel_prometheus_enabled: bool = True
    otel_prometheus_port: int = Field(9464, ge=0, le=65535)
    otel_prometheus_interface: str = "127.0.0.1"
    otel_prometheus_allow_remote: bool = False

    # -- identity (api/auth.py, api/auth_jwt.py, auth_setup.py) -------------------------------
    # API keys in the store (`metald keys ...`): accepted when on. Their secrets are kept as
    # HMAC-SHA256(pepper, secret); the pepper file (>= 16 bytes, kept outside the data dir's
    # database) must be readable when keys are on, or start-up stops.
    auth_api_keys: bool = False
    auth_pepper_file: Path | None = None
    # JWT bearer tokens: a JWKS file (re-read when it changes) or URL (fetched every
    # _REFRESH_SECONDS); with either, ISSUER and AUDIENCE are required.
    auth_jwks_file: Path | None = None
    auth_jwks_url: str = ""
    auth_jwks_refresh_seconds: float = Field(300.0, ge=1, le=86_400)
    auth_jwt_issuer: str = ""
    auth_jwt_audience: str = ""
    auth_jwt_leeway_seconds: float = Field(30.0, ge=0, le=300)
    auth_jwt_customer_claim: str = "sub"  # the customer id (operators and admins: optional)
    auth_jwt_role_claim: str = "role"  # customer|operator|admin; missing: customer

    # -- metering and delivery to billing (issue 9: service/metering.py, delivery.py) --------
    # Every running VM sampled this often; one VM's sample is given up after the timeout.
    metering_interval_ms: int = Field(100, ge=10, le=60_000)
    metering_sample_timeout_ms: int = Field(1000, ge=10, le=60_000)
    # Records per SendMetricsBatch, and how often the outbox is flushed.
    billing_batch_size: int = Field(100, ge=1, le=10_000)
    billing_flush_interval_ms: int = Field(1000, ge=10, le=600_000)
    # Undelivered entries kept while billing is unreachable; past it each VM's newest
    # undelivered record is replaced by its next (usage kept, resolution lost; loud log).
    billing_backlog_max: int = Field(100_000, ge=10)
    billing_retry_initial_ms: int = Field(500, ge=1)
    billing_retry_max_ms: int = Field(30_000, ge=1)
    billing_heartbeat_interval_seconds: float = Field(30.0, gt=0, le=3600)
    billing_retention_hours: float = Field(24.0, ge=0)  # delivered records kept this long
    billing_shutdown_flush_seconds: float = Field(5.0, ge=0, le=300)

    # -- Rate limits and the audit log (api/ratelimit.py, store/audit_log.py) ---------------
    # Per-customer token buckets: _RATE calls per second, up to _BURST at once; a mutating
    # call (Create/Delete/Boot/Shutdown/Pause/Resume/RebootVm) takes _MUTATING_COST tokens.
    # _FILE: per-customer overrides, lines of `<customer_id> <rate> <burst>`. Failed
    # authentication: each source address (IPv4, IPv6 /64) may fail _AUTH_FAILURES_BURST
    # times, refilled at _AUTH_FAILURES_RATE per second; sources remembered: _SOURCES_MAX.
    rate_limit_enabled: bool = False
    rate_limit_rate: float = Field(20.0, gt=0)
    rate_limit_burst: float = Field(40.0, ge=1)
    rate_limit_mutating_cost: float = Field(5.0, ge=0)
    rate_limit_file: Path | None = None
    rate_limit_auth_failures_rate: float = Field(0.5, gt=0)
    rate_limit_auth_failures_burst: float = Field(10.0, ge=1)
    rate_limit_sources_max: int = Field(10_000, ge=1)
    # The audit log (the `audit_log` table; `metald audit list|verify`). Off: no rows (the
    # security log lines stay). Rows wait in a queue of at most _QUEUE_MAX for the writer.
    audit_enabled: bool = True
    audit_queue_max: int = Field(10_000, ge=1)

    # -- TLS and mTLS (api/tls.py, api/mtls.py; README "TLS and mTLS") -----------------------
    # file: the certificate chain and key below; with a CA file, client certificates are
    # required (mTLS) and name the caller through the identities file. spiffe: an X.509 SVID
    # and trust bundle a SPIFFE agent writes (_SPIFFE_DIR, or the three files below), mTLS
    # always, clients only of _SPIFFE_TRUST_DOMAINS (and _SPIFFE_ALLOWED_IDS if set). Bad
    # or missing material stops start-up; files are re-read when they change (and on SIGHUP).
    tls_mode: TlsMode = TlsMode.DISABLED
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_ca_file: Path | None = None
    # Lines of `<customer_id> <role> <identity>` (api/mtls.py); required with mTLS.
    tls_identities_file: Path | None = None
    tls_reload_seconds: float = Field(5.0, ge=0, le=3600)  # 0: only on SIGHUP
    tls_spiffe_dir: Path | None = None  # svid.pem, svid_key.pem, svid_bundle.pem
    tls_spiffe_trust_domains: str = ""  # comma-separated, e.g. example.org
    tls_spiffe_allowed_ids: str = ""  # comma-separated SPIFFE IDs; empty: any of the domains

    @field_validator("jailer_uid_range")
    @classmethod
    def _uid_range(cls, value: str) -> str:
        if value.strip():
            parse_uid_range(value)
        return value

    @property
    def jailer_uid_bounds(self) -> tuple[int, int] | None:
        return parse_uid_range(self.jailer_uid_range) if self.jailer_uid_range.strip() else None

    @field_validator("address")
    @classmethod
    def _address_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("firecracker_jail_paths")
    @classmethod
    def _absolute_paths(cls, value: str) -> str:
        for path in (p.strip() for p in value.split(",") if p.strip()):
            if not path.startswith("/"):
                raise ValueError(f"{path!r} is not an absolute path")
        return value

    @property
    def firecracker_extra_jail_paths(self) -> tuple[str, ...]:
        return tuple(p.strip() for p in self.firecracker_jail_paths.split(",") if p.strip())

    @property
    def vm_dir(self) -> Path:
        return self.data_dir / "vms"

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{self.data_dir / 'metald.db'}"

    @property
    def host_memory_ceiling(self) -> int:
        """Committed guest memory this host takes (may be <= 0 if the reserve is too big:
        start-up refuses that)."""
        return self.host_memory_bytes or _host_memory_bytes() - self.host_memory_reserve_bytes

    @property
    def host_vcpu_ceiling(self) -> int:
        cores = os.cpu_count() or 1
        return self.host_vcpus or int((cores - self.host_vcpu_reserve) * self.host_vcpu_overcommit)

    @property
    def vcpu_limit(self) -> int:
        """The per-VM vCPU maximum."""
        return self.max_vcpus or (os.cpu_count() or 1)

    @property
    def memory_limit(self) -> int:
        """The per-VM memory maximum."""
        return self.max_memory_bytes or self.host_memory_ceiling


def parse_uid_range(value: str) -> tuple[int, int]:
    """`first-last` (inclusive) of unprivileged ids."""
    first, sep, last = value.strip().partition("-")
    try:
        bounds = (int(first), int(last))
    except ValueError:
        raise ValueError(f"{value!r} is not a range like 200000-265535") from None
    if not sep or not 0 < bounds[0] <= bounds[1] < 2**32 - 1:
        raise ValueError(f"{value!r}: first-last with 1 <= first <= last < 4294967295")
    return bounds


class ConfigError(Exception):
    """A bad setting; the message names the environment variable."""


def load_settings(**overrides: Any) -> Settings:
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = "UNKEY_METALD_" + "_".join(str(p) for p in err["loc"]).upper()
            problems.append(f"{name}: {err['msg']}")
        raise ConfigError("bad configuration: " + "; ".join(problems)) from None

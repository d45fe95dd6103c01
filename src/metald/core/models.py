"""Domain records. Plain dataclasses: no I/O, no protobuf."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from metald.core.states import VmState


@dataclass(frozen=True)
class DiskConfig:
    id: str
    path: str
    read_only: bool = False
    is_root_device: bool = False
    interface_type: str = ""
    options: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class VmConfig:
    """What the caller asked for, as given (paths unresolved). Echoed back by GetVmInfo."""

    vcpu_count: int = 1
    max_vcpu_count: int = 0
    memory_bytes: int = 256 * 1024 * 1024
    kernel_path: str = ""
    initrd_path: str = ""
    kernel_args: str = ""
    boot_options: dict[str, str] = field(default_factory=dict)
    storage: tuple[DiskConfig, ...] = ()
    network: tuple[dict[str, Any], ...] = ()
    console_enabled: bool = True
    metadata: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VmConfig:
        data = dict(data)
        data["storage"] = tuple(DiskConfig(**d) for d in data.get("storage", ()))
        data["network"] = tuple(data.get("network", ()))
        return cls(**data)


@dataclass(frozen=True)
class ResolvedDisk:
    id: str
    path: Path
    read_only: bool
    is_root_device: bool


@dataclass(frozen=True)
class RateLimit:
    """A token bucket, as the API's RateLimit message gives it: ``bandwidth`` bytes per
    second, ``refill_time_ms`` the time the bucket takes to refill (0: one second), ``burst``
    extra bytes allowed at once (0: none beyond the bucket)."""

    bandwidth: int
    refill_time_ms: int = 0
    burst: int = 0


@dataclass(frozen=True)
class NicSpec:
    """The guest's network card: a TAP in the VM's own network namespace."""

    netns: str  # name under /run/netns
    tap: str
    mac: str
    guest_args: str  # metald.ip4=... etc. for the guest's kernel command line
    # Limits a VMM with its own limiter applies (Firecracker); QEMU's are tc on the veth.
    rx_rate_limit: RateLimit | None = None  # toward the guest
    tx_rate_limit: RateLimit | None = None  # from the guest


@dataclass(frozen=True)
class LaunchSpec:
    """Everything a backend needs to start a VMM: validated, paths resolved to real files."""

    vm_id: str
    vcpu_count: int
    memory_bytes: int
    kernel: Path
    initrd: Path | None
    kernel_args: str
    disks: tuple[ResolvedDisk, ...]
    nic: NicSpec | None = None


class ProcessIdentity(NamedTuple):
    """A VMM process, named so that a reused pid is not mistaken for it. A named tuple, so
    it equals the identity metald.host.process finds for the same process."""

    pid: int
    start_time: int  # /proc/<pid>/stat field 22, clock ticks since boot


@dataclass
class VmRecord:
    id: str
    customer_id: str
    config: VmConfig
    state: VmState
    backend: str
    created_at: float
    updated_at: float
    process: ProcessIdentity | None = None
    backend_info: dict[str, str] = field(default_factory=dict)
    deleted_at: float | None = None


@dataclass(frozen=True)
class VmUsage:
    """Live measurements of one VM, for GetVmInfo and metering."""

    cpu_time_ns: int = 0
    cpu_usage_percent: float = 0.0
    memory_bytes: int = 0
    disk_read_bytes: int = 0
    disk_write_bytes: int = 0
    disk_read_ops: int = 0
    disk_write_ops: int = 0
    uptime_seconds: int = 0


@dataclass(frozen=True)
class Page:
    vms: list[VmRecord]
    next_token: str
    total_count: int

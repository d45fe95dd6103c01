"""Domain records. Plain dataclasses: no I/O, no protobuf."""

from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass, field
from enum import StrEnum
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
class RateLimit:
    """A token bucket, as the API's RateLimit message gives it: ``bandwidth`` bytes per
    second, ``refill_time_ms`` the time the bucket takes to refill (0: one second), ``burst``
    extra bytes allowed at once (0: none beyond the bucket)."""

    bandwidth: int
    refill_time_ms: int = 0
    burst: int = 0


class NetworkMode(StrEnum):
    """Which address families a VM's interface gets."""

    DUAL_STACK = "dual-stack"
    IPV4_ONLY = "ipv4-only"
    IPV6_ONLY = "ipv6-only"

    @property
    def ipv4(self) -> bool:
        return self is not NetworkMode.IPV6_ONLY

    @property
    def ipv6(self) -> bool:
        return self is not NetworkMode.IPV4_ONLY


@dataclass(frozen=True)
class IPv4Config:
    """Static IPv4 settings asked for (all optional: metald assigns what is left empty)."""

    address: str = ""  # "10.100.0.5" or "10.100.0.5/16"
    netmask: str = ""
    gateway: str = ""
    dns_servers: tuple[str, ...] = ()
    dhcp: bool = False


@dataclass(frozen=True)
class IPv6Config:
    """Static IPv6 settings asked for (all optional)."""

    address: str = ""  # "fd00::5" or "fd00::5/64"
    prefix_length: int = 0
    gateway: str = ""
    dns_servers: tuple[str, ...] = ()
    slaac: bool = False
    privacy_extensions: bool = False
    link_local: str = ""


@dataclass(frozen=True)
class NetworkInterface:
    """One network card as the caller asked for it (echoed back by GetVmInfo). A sub-config
    is None when the caller did not give it; ``mode`` None means the host's default."""

    id: str = ""
    mode: NetworkMode | None = None
    mac_address: str = ""
    tap_device: str = ""  # ignored: metald names the TAP (GetVmInfo reports it)
    interface_type: str = ""
    options: dict[str, str] = field(default_factory=dict)
    ipv4_config: IPv4Config | None = None
    ipv6_config: IPv6Config | None = None
    rx_rate_limit: RateLimit | None = None  # toward the guest
    tx_rate_limit: RateLimit | None = None  # from the guest

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NetworkInterface:
        """From to_dict()'s JSON form, and from rows written before the config was typed
        (protobuf JSON: enum names, int64 as strings, RateLimit.refill_time)."""
        v4, v6 = data.get("ipv4_config"), data.get("ipv6_config")
        return cls(
            id=str(data.get("id", "")),
            mode=_mode_from_json(data.get("mode")),
            mac_address=str(data.get("mac_address", "")),
            tap_device=str(data.get("tap_device", "")),
            interface_type=str(data.get("interface_type", "")),
            options=dict(data.get("options") or {}),
            ipv4_config=None
            if v4 is None
            else IPv4Config(
                address=str(v4.get("address", "")),
                netmask=str(v4.get("netmask", "")),
                gateway=str(v4.get("gateway", "")),
                dns_servers=tuple(v4.get("dns_servers", ())),
                dhcp=bool(v4.get("dhcp", False)),
            ),
            ipv6_config=None
            if v6 is None
            else IPv6Config(
                address=str(v6.get("address", "")),
                prefix_length=int(v6.get("prefix_length", 0)),
                gateway=str(v6.get("gateway", "")),
                dns_servers=tuple(v6.get("dns_servers", ())),
                slaac=bool(v6.get("slaac", False)),
                privacy_extensions=bool(v6.get("privacy_extensions", False)),
                link_local=str(v6.get("link_local", "")),
            ),
            rx_rate_limit=_rate_limit_from_json(data.get("rx_rate_limit")),
            tx_rate_limit=_rate_limit_from_json(data.get("tx_rate_limit")),
        )


_OLD_MODE_NAMES = {
    "NETWORK_MODE_DUAL_STACK": NetworkMode.DUAL_STACK,
    "NETWORK_MODE_IPV4_ONLY": NetworkMode.IPV4_ONLY,
    "NETWORK_MODE_IPV6_ONLY": NetworkMode.IPV6_ONLY,
}


def _mode_from_json(value: Any) -> NetworkMode | None:
    if value in (None, "", "NETWORK_MODE_UNSPECIFIED"):
        return None
    return _OLD_MODE_NAMES.get(value) or NetworkMode(value)


def _rate_limit_from_json(value: Any) -> RateLimit | None:
    if value is None:
        return None
    refill = value.get("refill_time_ms", value.get("refill_time", 0))
    return RateLimit(
        bandwidth=int(value.get("bandwidth", 0)),
        refill_time_ms=int(refill),
        burst=int(value.get("burst", 0)),
    )


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
    network: tuple[NetworkInterface, ...] = ()
    console_enabled: bool = True
    metadata: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VmConfig:
        data = dict(data)
        data["storage"] = tuple(DiskConfig(**d) for d in data.get("storage", ()))
        data["network"] = tuple(NetworkInterface.from_dict(n) for n in data.get("network", ()))
        return cls(**data)


@dataclass(frozen=True)
class ResolvedDisk:
    id: str
    path: Path
    read_only: bool
    is_root_device: bool


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
    # The vCPU threads' CPU time (what the guest's CPUs cost; cpu_time_ns is the whole
    # VMM's), and the VMM process the counters are of (None: no VMM ran).
    vcpu_time_ns: int = 0
    process: ProcessIdentity | None = None


@dataclass(frozen=True)
class TrafficCounters:
    """A VM's network traffic from the guest's point of view, since its network was made."""

    bytes_received: int = 0
    bytes_transmitted: int = 0
    packets_received: int = 0
    packets_transmitted: int = 0


@dataclass(frozen=True)
class NetworkInfo:
    """A VM's network as it was set up, for GetVmInfo: addresses without their prefix."""

    mac: str
    tap: str
    netns: str
    ipv4: ipaddress.IPv4Address | None = None
    gateway4: ipaddress.IPv4Address | None = None
    ipv6: ipaddress.IPv6Address | None = None
    gateway6: ipaddress.IPv6Address | None = None
    dns_servers: tuple[str, ...] = ()
    counters: TrafficCounters | None = None  # None: could not be read


@dataclass(frozen=True)
class Allocation:
    """One IP address held by one VM (the address book's record)."""

    vm_id: str
    family: int  # 4 or 6
    address: str  # canonical text (ipaddress str())
    allocated_at: float


@dataclass(frozen=True)
class ConsoleChunk:
    """A piece of a VM's console output: `data` starts at byte `offset` of the log, and
    `next_offset` is where the next read follows on. `size` is the log's size when read.
    A VM that was started again has a new log: an offset past its end reads from 0."""

    data: bytes
    offset: int
    next_offset: int
    size: int


@dataclass(frozen=True, slots=True)
class VmSummary:
    """One VM of a ListVms page: what VmInfo shows, not the VM's whole record (a page is
    read and built per row, so it reads no more than it shows)."""

    id: str
    customer_id: str
    state: VmState
    vcpu_count: int
    memory_bytes: int
    metadata: dict[str, str]
    created_at: float
    updated_at: float

    @classmethod
    def of(cls, vm: VmRecord) -> VmSummary:
        return cls(
            id=vm.id,
            customer_id=vm.customer_id,
            state=vm.state,
            vcpu_count=vm.config.vcpu_count,
            memory_bytes=vm.config.memory_bytes,
            metadata=dict(vm.config.metadata),
            created_at=vm.created_at,
            updated_at=vm.updated_at,
        )


@dataclass(frozen=True)
class Page:
    vms: list[VmSummary]
    next_token: str
    total_count: int

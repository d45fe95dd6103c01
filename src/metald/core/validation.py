"""Checks on what a caller asks for. Pure functions: each failure names the field."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from metald.core.errors import InvalidArgument
from metald.core.ids import VM_ID as VM_ID  # re-exported: network/ still imports it from here
from metald.core.ids import VM_ID_RULE, is_vm_id
from metald.core.models import NetworkInterface, RateLimit, VmConfig

MIB = 1024 * 1024
MIN_MEMORY_BYTES = 128 * MIB
MAX_VCPUS = 32
MAX_METADATA_ENTRIES = 64
MAX_METADATA_KEY = 128
MAX_METADATA_VALUE = 1024
MAX_METADATA_TOTAL = 16 * 1024
# With metald's own arguments (console, ids, timer and network settings) the line must stay
# under the kernel's 2048-byte limit, past which a guest dies before its first console line.
MAX_KERNEL_ARGS = 1024
MAX_DISKS = 8
MAX_PATH = 4096
MAX_DNS_SERVERS = 4

CUSTOMER_ID = re.compile(r"[A-Za-z0-9_.-]{1,128}")
METADATA_KEY = re.compile(r"[A-Za-z0-9._/-]+")
DISK_ID = re.compile(r"[A-Za-z0-9_-]{1,32}")
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
# Kernel arguments metald itself passes to the guest; a tenant may not override them.
RESERVED_ARG = re.compile(r"(^|\s)(metald\.|console=|panic=|reboot=)")


@dataclass(frozen=True)
class Limits:
    max_vcpus: int
    max_memory_bytes: int


def check_vm_id(vm_id: str, field: str = "vm_id") -> None:
    if not is_vm_id(vm_id):
        raise InvalidArgument(field, f"must be {VM_ID_RULE}")


def check_customer_id(customer_id: str) -> None:
    if not CUSTOMER_ID.fullmatch(customer_id):
        raise InvalidArgument("customer_id", "must be 1-128 characters of A-Z, a-z, 0-9, _ . -")


def check_config(config: VmConfig, limits: Limits) -> None:
    vcpu_max = min(MAX_VCPUS, limits.max_vcpus)
    if not 1 <= config.vcpu_count <= vcpu_max:
        raise InvalidArgument(
            "config.cpu.vcpu_count",
            f"must be between 1 and {vcpu_max} (got {config.vcpu_count})",
        )
    if config.max_vcpu_count and config.max_vcpu_count < config.vcpu_count:
        raise InvalidArgument("config.cpu.max_vcpu_count", "must not be below vcpu_count")
    if config.max_vcpu_count > vcpu_max:
        raise InvalidArgument("config.cpu.max_vcpu_count", f"must not exceed {vcpu_max}")
    if config.memory_bytes < MIN_MEMORY_BYTES:
        raise InvalidArgument(
            "config.memory.size_bytes",
            f"must be at least {MIN_MEMORY_BYTES} (128 MiB) (got {config.memory_bytes})",
        )
    if config.memory_bytes > limits.max_memory_bytes:
        raise InvalidArgument(
            "config.memory.size_bytes",
            f"must be at most {limits.max_memory_bytes} bytes (this host's per-VM maximum)",
        )
    if config.memory_bytes % MIB:
        raise InvalidArgument("config.memory.size_bytes", "must be a whole number of MiB")
    _check_kernel_args(config.kernel_args)
    for name, value in (("kernel_path", config.kernel_path), ("initrd_path", config.initrd_path)):
        _check_path_text(f"config.boot.{name}", value)
    _check_storage(config)
    for i, iface in enumerate(config.network):
        check_interface_shape(iface, f"config.network[{i}]")
    _check_metadata(config.metadata)


def _check_kernel_args(args: str) -> None:
    field = "config.boot.kernel_args"
    if len(args.encode()) > MAX_KERNEL_ARGS:
        raise InvalidArgument(field, f"must be at most {MAX_KERNEL_ARGS} bytes")
    if CONTROL_CHARS.search(args):
        raise InvalidArgument(field, "must not contain control characters")
    if RESERVED_ARG.search(args):
        raise InvalidArgument(field, "metald.*, console=, panic= and reboot= are set by metald")


def _check_path_text(field: str, value: str) -> None:
    if len(value) > MAX_PATH:
        raise InvalidArgument(field, f"must be at most {MAX_PATH} characters")
    if "\x00" in value:
        raise InvalidArgument(field, "must not contain NUL bytes")


def _check_storage(config: VmConfig) -> None:
    if len(config.storage) > MAX_DISKS:
        raise InvalidArgument("config.storage", f"at most {MAX_DISKS} devices")
    seen: set[str] = set()
    roots = 0
    for i, disk in enumerate(config.storage):
        field = f"config.storage[{i}]"
        if not DISK_ID.fullmatch(disk.id):
            raise InvalidArgument(f"{field}.id", "must be 1-32 characters of A-Z, a-z, 0-9, _ -")
        if disk.id in seen:
            raise InvalidArgument(f"{field}.id", f"duplicate device id {disk.id!r}")
        seen.add(disk.id)
        if not disk.path:
            raise InvalidArgument(f"{field}.path", "is required")
        _check_path_text(f"{field}.path", disk.path)
        if disk.interface_type not in ("", "virtio-blk"):
            raise InvalidArgument(f"{field}.interface_type", "only virtio-blk is supported")
        roots += disk.is_root_device
    if roots > 1:
        raise InvalidArgument("config.storage", "at most one root device")


def _check_metadata(metadata: dict[str, str]) -> None:
    if len(metadata) > MAX_METADATA_ENTRIES:
        raise InvalidArgument("config.metadata", f"at most {MAX_METADATA_ENTRIES} entries")
    total = 0
    for key, value in metadata.items():
        if not (0 < len(key) <= MAX_METADATA_KEY and METADATA_KEY.fullmatch(key)):
            raise InvalidArgument(
                "config.metadata",
                f"keys must be 1-{MAX_METADATA_KEY} characters of A-Z, a-z, 0-9, . _ / -",
            )
        if len(value.encode()) > MAX_METADATA_VALUE:
            raise InvalidArgument(
                f"config.metadata[{key}]", f"values must be at most {MAX_METADATA_VALUE} bytes"
            )
        total += len(key.encode()) + len(value.encode())
    if total > MAX_METADATA_TOTAL:
        raise InvalidArgument("config.metadata", f"must be at most {MAX_METADATA_TOTAL} bytes")


_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")


def normalise_mac(mac: str) -> str:
    """Lower-case colon form of a unicast, non-zero MAC; ValueError otherwise."""
    value = mac.strip().lower().replace("-", ":")
    if not _MAC.fullmatch(value):
        raise ValueError("must be a MAC address like 02:00:00:00:00:01")
    first = int(value[:2], 16)
    if first & 0x01:
        raise ValueError("must be a unicast MAC (the lowest bit of the first octet clear)")
    if value == "00:00:00:00:00:00":
        raise ValueError("must not be all zeros")
    return value


def check_interface_shape(iface: NetworkInterface, where: str) -> None:
    """Field shapes of one network interface, whatever the host offers: a MAC that can be
    a guest's, DNS servers of the right family, rate limits that make sense. What the host
    can give (modes, subnets, gateways) is the network adapter's to check."""
    if iface.mac_address:
        try:
            normalise_mac(iface.mac_address)
        except ValueError as exc:
            raise InvalidArgument(f"{where}.mac_address", str(exc)) from None
    if iface.ipv4_config is not None:
        _check_dns(iface.ipv4_config.dns_servers, 4, f"{where}.ipv4_config.dns_servers")
    if iface.ipv6_config is not None:
        _check_dns(iface.ipv6_config.dns_servers, 6, f"{where}.ipv6_config.dns_servers")
        if iface.ipv6_config.prefix_length < 0:
            raise InvalidArgument(f"{where}.ipv6_config.prefix_length", "must not be negative")
    for name, limit in (("rx", iface.rx_rate_limit), ("tx", iface.tx_rate_limit)):
        if limit is not None:
            _check_rate_limit(limit, f"{where}.{name}_rate_limit")


def _check_dns(servers: tuple[str, ...], version: int, where: str) -> None:
    for i, server in enumerate(servers):
        try:
            ip = ipaddress.ip_address(server)
        except ValueError:
            raise InvalidArgument(f"{where}[{i}]", "is not an IP address") from None
        if ip.version != version:
            raise InvalidArgument(f"{where}[{i}]", f"must be an IPv{version} address")
    if len(servers) > MAX_DNS_SERVERS:
        raise InvalidArgument(where, f"at most {MAX_DNS_SERVERS} servers")


def _check_rate_limit(limit: RateLimit, where: str) -> None:
    if limit.bandwidth < 0:
        raise InvalidArgument(f"{where}.bandwidth", "must not be negative (bytes/s)")
    if limit.burst < 0:
        raise InvalidArgument(f"{where}.burst", "must not be negative (bytes)")
    if limit.refill_time_ms < 0:
        raise InvalidArgument(f"{where}.refill_time", "must not be negative")
    if limit.bandwidth == 0 and limit.burst:
        raise InvalidArgument(f"{where}.bandwidth", "is required when burst is set")

"""Protobuf messages <-> domain records. No decisions here beyond field mapping."""

from __future__ import annotations

from metald.core.errors import InvalidArgument
from metald.core.models import (
    DiskConfig,
    IPv4Config,
    IPv6Config,
    NetworkInfo,
    NetworkInterface,
    NetworkMode,
    RateLimit,
    TrafficCounters,
    VmConfig,
    VmSummary,
    VmUsage,
)
from metald.core.states import VmState
from metald.gen.vmprovisioner.v1 import vm_pb2 as pb

DEFAULT_VCPUS = 1
DEFAULT_MEMORY_BYTES = 256 * 1024 * 1024

_STATE_TO_PB = {
    VmState.CREATED: pb.VM_STATE_CREATED,
    VmState.RUNNING: pb.VM_STATE_RUNNING,
    VmState.PAUSED: pb.VM_STATE_PAUSED,
    VmState.SHUTDOWN: pb.VM_STATE_SHUTDOWN,
}
_PB_TO_STATE = {v: k for k, v in _STATE_TO_PB.items()}

_MODE_TO_PB = {
    NetworkMode.DUAL_STACK: pb.NETWORK_MODE_DUAL_STACK,
    NetworkMode.IPV4_ONLY: pb.NETWORK_MODE_IPV4_ONLY,
    NetworkMode.IPV6_ONLY: pb.NETWORK_MODE_IPV6_ONLY,
}
_PB_TO_MODE = {v: k for k, v in _MODE_TO_PB.items()}


def state_to_pb(state: VmState) -> pb.VmState:
    return _STATE_TO_PB[state]


def states_from_pb(values: list[pb.VmState]) -> list[VmState]:
    states = []
    for value in values:
        if value not in _PB_TO_STATE:
            raise InvalidArgument("state_filter", f"{value} is not a VM state")
        states.append(_PB_TO_STATE[value])
    return states


def config_from_pb(msg: pb.VmConfig) -> VmConfig:
    # An absent cpu/memory message means "use the default"; a present one is taken as given,
    # so `{"cpu": {}}` is a vcpu_count of 0 and is refused by validation.
    vcpus = msg.cpu.vcpu_count if msg.HasField("cpu") else DEFAULT_VCPUS
    memory = msg.memory.size_bytes if msg.HasField("memory") else DEFAULT_MEMORY_BYTES
    return VmConfig(
        vcpu_count=vcpus,
        max_vcpu_count=msg.cpu.max_vcpu_count,
        memory_bytes=memory,
        kernel_path=msg.boot.kernel_path,
        initrd_path=msg.boot.initrd_path,
        kernel_args=msg.boot.kernel_args,
        boot_options=dict(msg.boot.boot_options),
        storage=tuple(
            DiskConfig(
                id=d.id,
                path=d.path,
                read_only=d.read_only,
                is_root_device=d.is_root_device,
                interface_type=d.interface_type,
                options=dict(d.options),
            )
            for d in msg.storage
        ),
        network=tuple(
            interface_from_pb(n, f"config.network[{i}]") for i, n in enumerate(msg.network)
        ),
        console_enabled=msg.console.enabled if msg.HasField("console") else True,
        metadata=dict(msg.metadata),
    )


def config_to_pb(config: VmConfig) -> pb.VmConfig:
    msg = pb.VmConfig(
        cpu=pb.CpuConfig(vcpu_count=config.vcpu_count, max_vcpu_count=config.max_vcpu_count),
        memory=pb.MemoryConfig(size_bytes=config.memory_bytes),
        boot=pb.BootConfig(
            kernel_path=config.kernel_path,
            initrd_path=config.initrd_path,
            kernel_args=config.kernel_args,
            boot_options=config.boot_options,
        ),
        storage=[
            pb.StorageDevice(
                id=d.id,
                path=d.path,
                read_only=d.read_only,
                is_root_device=d.is_root_device,
                interface_type=d.interface_type,
                options=d.options,
            )
            for d in config.storage
        ],
        network=[interface_to_pb(n) for n in config.network],
        console=pb.ConsoleConfig(enabled=config.console_enabled),
        metadata=config.metadata,
    )
    return msg


def interface_from_pb(msg: pb.NetworkInterface, where: str) -> NetworkInterface:
    # proto3 enums are open: a binary request may carry a number the schema does not name.
    if msg.mode == pb.NETWORK_MODE_UNSPECIFIED:
        mode = None
    elif msg.mode in _PB_TO_MODE:
        mode = _PB_TO_MODE[msg.mode]
    else:
        raise InvalidArgument(f"{where}.mode", f"unknown network mode {msg.mode}")
    v4 = v6 = None
    if msg.HasField("ipv4_config"):
        c4 = msg.ipv4_config
        v4 = IPv4Config(
            address=c4.address,
            netmask=c4.netmask,
            gateway=c4.gateway,
            dns_servers=tuple(c4.dns_servers),
            dhcp=c4.dhcp,
        )
    if msg.HasField("ipv6_config"):
        c6 = msg.ipv6_config
        v6 = IPv6Config(
            address=c6.address,
            prefix_length=c6.prefix_length,
            gateway=c6.gateway,
            dns_servers=tuple(c6.dns_servers),
            slaac=c6.slaac,
            privacy_extensions=c6.privacy_extensions,
            link_local=c6.link_local,
        )
    return NetworkInterface(
        id=msg.id,
        mode=mode,
        mac_address=msg.mac_address,
        tap_device=msg.tap_device,
        interface_type=msg.interface_type,
        options=dict(msg.options),
        ipv4_config=v4,
        ipv6_config=v6,
        rx_rate_limit=_rate_limit_from_pb(msg.rx_rate_limit)
        if msg.HasField("rx_rate_limit")
        else None,
        tx_rate_limit=_rate_limit_from_pb(msg.tx_rate_limit)
        if msg.HasField("tx_rate_limit")
        else None,
    )


def _rate_limit_from_pb(msg: pb.RateLimit) -> RateLimit:
    return RateLimit(bandwidth=msg.bandwidth, refill_time_ms=msg.refill_time, burst=msg.burst)


def _rate_limit_to_pb(limit: RateLimit) -> pb.RateLimit:
    return pb.RateLimit(
        bandwidth=limit.bandwidth, refill_time=limit.refill_time_ms, burst=limit.burst
    )


def interface_to_pb(iface: NetworkInterface) -> pb.NetworkInterface:
    msg = pb.NetworkInterface(
        id=iface.id,
        mode=_MODE_TO_PB[iface.mode] if iface.mode else pb.NETWORK_MODE_UNSPECIFIED,
        mac_address=iface.mac_address,
        tap_device=iface.tap_device,
        interface_type=iface.interface_type,
        options=iface.options,
    )
    if iface.ipv4_config is not None:
        c4 = iface.ipv4_config
        msg.ipv4_config.CopyFrom(
            pb.IPv4Config(
                address=c4.address,
                netmask=c4.netmask,
                gateway=c4.gateway,
                dns_servers=c4.dns_servers,
                dhcp=c4.dhcp,
            )
        )
    if iface.ipv6_config is not None:
        c6 = iface.ipv6_config
        msg.ipv6_config.CopyFrom(
            pb.IPv6Config(
                address=c6.address,
                prefix_length=c6.prefix_length,
                gateway=c6.gateway,
                dns_servers=c6.dns_servers,
                slaac=c6.slaac,
                privacy_extensions=c6.privacy_extensions,
                link_local=c6.link_local,
            )
        )
    if iface.rx_rate_limit is not None:
        msg.rx_rate_limit.CopyFrom(_rate_limit_to_pb(iface.rx_rate_limit))
    if iface.tx_rate_limit is not None:
        msg.tx_rate_limit.CopyFrom(_rate_limit_to_pb(iface.tx_rate_limit))
    return msg


def vm_info_to_pb(vm: VmSummary) -> pb.VmInfo:
    return pb.VmInfo(
        vm_id=vm.id,
        state=state_to_pb(vm.state),
        vcpu_count=vm.vcpu_count,
        memory_size_bytes=vm.memory_bytes,
        created_timestamp=int(vm.created_at),
        modified_timestamp=int(vm.updated_at),
        metadata=vm.metadata,
        customer_id=vm.customer_id,
    )


def network_info_to_pb(info: NetworkInfo | None) -> pb.VmNetworkInfo:
    """The existing API's ip_address/gateway are the IPv4 ones (the IPv6 ones for an
    IPv6-only VM); ipv6_address/ipv6_gateway always report IPv6 when the VM has it."""
    if info is None:
        return pb.VmNetworkInfo()
    primary = info.ipv4 or info.ipv6
    gateway = info.gateway4 if info.ipv4 else info.gateway6
    return pb.VmNetworkInfo(
        ip_address=str(primary) if primary else "",
        mac_address=info.mac,
        tap_device=info.tap,
        network_namespace=info.netns,
        gateway=str(gateway) if gateway else "",
        dns_servers=info.dns_servers,
        ipv6_address=str(info.ipv6) if info.ipv6 else "",
        ipv6_gateway=str(info.gateway6) if info.ipv6 and info.gateway6 else "",
    )


def usage_to_pb(usage: VmUsage, net: TrafficCounters | None) -> pb.VmMetrics:
    net = net or TrafficCounters()
    return pb.VmMetrics(
        cpu_usage_percent=usage.cpu_usage_percent,
        memory_usage_bytes=usage.memory_bytes,
        storage_stats=pb.StorageStats(
            bytes_read=usage.disk_read_bytes,
            bytes_written=usage.disk_write_bytes,
            read_operations=usage.disk_read_ops,
            write_operations=usage.disk_write_ops,
        ),
        network_stats=pb.NetworkStats(
            bytes_received=net.bytes_received,
            bytes_transmitted=net.bytes_transmitted,
            packets_received=net.packets_received,
            packets_transmitted=net.packets_transmitted,
        ),
        uptime_seconds=usage.uptime_seconds,
    )

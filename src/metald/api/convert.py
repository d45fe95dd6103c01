"""Protobuf messages <-> domain records. No decisions here beyond field mapping."""

from __future__ import annotations

from typing import Any

from google.protobuf.json_format import MessageToDict, ParseDict

from metald.core.errors import InvalidArgument
from metald.core.models import DiskConfig, VmConfig, VmRecord, VmUsage
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
        network=tuple(MessageToDict(n, preserving_proto_field_name=True) for n in msg.network),
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
        console=pb.ConsoleConfig(enabled=config.console_enabled),
        metadata=config.metadata,
    )
    for net in config.network:
        ParseDict(net, msg.network.add())
    return msg


def vm_info_to_pb(vm: VmRecord) -> pb.VmInfo:
    return pb.VmInfo(
        vm_id=vm.id,
        state=state_to_pb(vm.state),
        vcpu_count=vm.config.vcpu_count,
        memory_size_bytes=vm.config.memory_bytes,
        created_timestamp=int(vm.created_at),
        modified_timestamp=int(vm.updated_at),
        metadata=vm.config.metadata,
        customer_id=vm.customer_id,
    )


def network_info_to_pb(info: dict[str, Any]) -> pb.VmNetworkInfo:
    return pb.VmNetworkInfo(
        ip_address=info.get("ip_address", ""),
        mac_address=info.get("mac_address", ""),
        tap_device=info.get("tap_device", ""),
        network_namespace=info.get("network_namespace", ""),
        gateway=info.get("gateway", ""),
        dns_servers=info.get("dns_servers", []),
    )


def usage_to_pb(usage: VmUsage, net: dict[str, int]) -> pb.VmMetrics:
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
            bytes_received=net.get("bytes_received", 0),
            bytes_transmitted=net.get("bytes_transmitted", 0),
            packets_received=net.get("packets_received", 0),
            packets_transmitted=net.get("packets_transmitted", 0),
        ),
        uptime_seconds=usage.uptime_seconds,
    )

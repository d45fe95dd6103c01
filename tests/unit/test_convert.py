import ipaddress

import pytest

from metald.api import convert
from metald.core.errors import InvalidArgument
from metald.core.models import NetworkInfo, TrafficCounters, VmUsage
from metald.core.states import VmState
from metald.gen.vmprovisioner.v1 import vm_pb2 as pb


def test_absent_cpu_and_memory_get_defaults() -> None:
    config = convert.config_from_pb(pb.VmConfig())
    assert config.vcpu_count == 1 and config.memory_bytes == 256 * 1024 * 1024


def test_present_but_zero_cpu_is_kept_for_validation_to_refuse() -> None:
    config = convert.config_from_pb(pb.VmConfig(cpu=pb.CpuConfig()))
    assert config.vcpu_count == 0


def test_config_round_trips() -> None:
    msg = pb.VmConfig(
        cpu=pb.CpuConfig(vcpu_count=2, max_vcpu_count=2),
        memory=pb.MemoryConfig(size_bytes=512 * 1024 * 1024),
        boot=pb.BootConfig(kernel_path="k", initrd_path="i", kernel_args="quiet"),
        storage=[pb.StorageDevice(id="root", path="d.img", read_only=True, is_root_device=True)],
        network=[pb.NetworkInterface(id="eth0", mode=pb.NETWORK_MODE_IPV4_ONLY)],
        console=pb.ConsoleConfig(enabled=True),
        metadata={"a": "b"},
    )
    assert convert.config_to_pb(convert.config_from_pb(msg)) == msg


def test_state_filter() -> None:
    assert convert.states_from_pb([pb.VM_STATE_RUNNING]) == [VmState.RUNNING]
    with pytest.raises(InvalidArgument, match="state_filter"):
        convert.states_from_pb([pb.VM_STATE_UNSPECIFIED])


def test_a_full_network_interface_round_trips() -> None:
    nic = pb.NetworkInterface(
        id="eth0",
        mac_address="02:00:00:00:00:01",
        tap_device="ignored",
        interface_type="virtio-net",
        options={"k": "v"},
        ipv4_config=pb.IPv4Config(
            address="10.100.0.5",
            netmask="255.255.0.0",
            gateway="10.100.0.1",
            dns_servers=["1.1.1.1"],
        ),
        ipv6_config=pb.IPv6Config(address="fd00::5", prefix_length=64, dns_servers=["fd00::53"]),
        mode=pb.NETWORK_MODE_DUAL_STACK,
        rx_rate_limit=pb.RateLimit(bandwidth=1000, refill_time=100, burst=50),
        tx_rate_limit=pb.RateLimit(),
    )
    msg = pb.VmConfig(network=[nic, pb.NetworkInterface(ipv4_config=pb.IPv4Config())])
    config = convert.config_from_pb(msg)
    first, second = config.network
    assert first.rx_rate_limit is not None and first.rx_rate_limit.refill_time_ms == 100
    assert first.tx_rate_limit is not None and first.tx_rate_limit.bandwidth == 0
    assert second.ipv6_config is None and second.ipv4_config is not None  # presence kept
    assert convert.config_to_pb(config).network == msg.network


def test_an_unknown_network_mode_number_names_the_field() -> None:
    msg = pb.VmConfig(network=[pb.NetworkInterface(), pb.NetworkInterface(mode=9)])  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument) as info:
        convert.config_from_pb(msg)
    assert info.value.field == "config.network[1].mode"


def test_network_info_reports_both_families() -> None:
    info = NetworkInfo(
        mac="02:00:00:00:00:01",
        tap="tapx",
        netns="mvm-a",
        ipv4=ipaddress.IPv4Address("10.100.0.2"),
        gateway4=ipaddress.IPv4Address("10.100.0.1"),
        ipv6=ipaddress.IPv6Address("fd00::2"),
        gateway6=ipaddress.IPv6Address("fd00::1"),
        dns_servers=("8.8.8.8",),
    )
    msg = convert.network_info_to_pb(info)
    assert (msg.ip_address, msg.gateway) == ("10.100.0.2", "10.100.0.1")
    assert (msg.ipv6_address, msg.ipv6_gateway) == ("fd00::2", "fd00::1")
    assert list(msg.port_mappings) == []
    v6 = convert.network_info_to_pb(
        NetworkInfo(mac="m", tap="t", netns="n", ipv6=info.ipv6, gateway6=info.gateway6)
    )
    assert (v6.ip_address, v6.gateway, v6.ipv6_address) == ("fd00::2", "fd00::1", "fd00::2")
    assert convert.network_info_to_pb(None) == pb.VmNetworkInfo()


def test_traffic_counters_become_network_stats() -> None:
    counters = TrafficCounters(bytes_received=1, bytes_transmitted=2, packets_received=3)
    stats = convert.usage_to_pb(VmUsage(), counters).network_stats
    assert (stats.bytes_received, stats.bytes_transmitted, stats.packets_received) == (1, 2, 3)
    assert convert.usage_to_pb(VmUsage(), None).network_stats == pb.NetworkStats()

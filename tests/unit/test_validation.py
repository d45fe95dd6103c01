from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from metald.core.errors import InvalidArgument
from metald.core.models import (
    DiskConfig,
    IPv4Config,
    IPv6Config,
    NetworkInterface,
    RateLimit,
    VmConfig,
)
from metald.core.validation import Limits, check_config, check_customer_id, check_vm_id

MIB = 1024 * 1024
LIMITS = Limits(max_vcpus=4, max_memory_bytes=8192 * MIB)
GOOD = VmConfig(vcpu_count=1, memory_bytes=256 * MIB)


def test_the_per_vm_maxima_themselves_pass() -> None:
    check_config(VmConfig(vcpu_count=4, memory_bytes=8192 * MIB), LIMITS)


def test_a_plain_config_passes() -> None:
    check_config(GOOD, LIMITS)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"vcpu_count": 0}, "config.cpu.vcpu_count"),
        ({"vcpu_count": 5}, "config.cpu.vcpu_count"),
        ({"vcpu_count": 33}, "config.cpu.vcpu_count"),
        ({"vcpu_count": -1}, "config.cpu.vcpu_count"),
        ({"max_vcpu_count": 9}, "config.cpu.max_vcpu_count"),
        ({"memory_bytes": 127 * MIB}, "config.memory.size_bytes"),
        ({"memory_bytes": 8193 * MIB}, "config.memory.size_bytes"),
        ({"memory_bytes": 256 * MIB + 1}, "config.memory.size_bytes"),
        ({"kernel_args": "x" * 1025}, "config.boot.kernel_args"),
        ({"kernel_args": "quiet\ninit=/bin/sh"}, "config.boot.kernel_args"),
        ({"kernel_args": "metald.vm_id=other"}, "config.boot.kernel_args"),
        ({"kernel_args": "quiet console=tty0"}, "config.boot.kernel_args"),
        ({"kernel_path": "a\x00b"}, "config.boot.kernel_path"),
        ({"metadata": {f"k{i}": "v" for i in range(65)}}, "config.metadata"),
        ({"metadata": {"bad key": "v"}}, "config.metadata"),
        ({"metadata": {"k": "v" * 1025}}, "config.metadata[k]"),
        ({"storage": (DiskConfig(id="", path="a"),)}, "config.storage[0].id"),
        ({"storage": (DiskConfig(id="d", path=""),)}, "config.storage[0].path"),
        (
            {"storage": (DiskConfig(id="d", path="a"), DiskConfig(id="d", path="b"))},
            "config.storage[1].id",
        ),
        (
            {
                "storage": (
                    DiskConfig(id="a", path="a", is_root_device=True),
                    DiskConfig(id="b", path="b", is_root_device=True),
                )
            },
            "config.storage",
        ),
    ],
)
def test_bad_configs_name_the_field(change: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        check_config(replace(GOOD, **change), LIMITS)  # type: ignore[arg-type]
    assert err.value.field == field
    assert err.value.message.startswith(field)


@pytest.mark.parametrize("vm_id", ["a", "vm-1", "0" * 64, "abc-def-123"])
def test_good_vm_ids(vm_id: str) -> None:
    check_vm_id(vm_id)


@pytest.mark.parametrize("vm_id", ["", "A", "vm_1", "a" * 65, "vm/1", "../x", "vm 1", "é"])
def test_bad_vm_ids(vm_id: str) -> None:
    with pytest.raises(InvalidArgument, match=r"^vm_id"):
        check_vm_id(vm_id)


@given(st.text(max_size=80))
def test_vm_ids_that_pass_are_safe_path_and_interface_components(vm_id: str) -> None:
    try:
        check_vm_id(vm_id)
    except InvalidArgument:
        return
    assert "/" not in vm_id and vm_id not in (".", "..") and 1 <= len(vm_id) <= 64


def test_customer_ids() -> None:
    check_customer_id("acme_1.eu-west")
    for bad in ("", "a b", "x" * 129, "a/b"):
        with pytest.raises(InvalidArgument):
            check_customer_id(bad)


@pytest.mark.parametrize(
    ("iface", "field"),
    [
        (NetworkInterface(mac_address="01:00:5e:00:00:01"), "mac_address"),
        (NetworkInterface(mac_address="00:00:00:00:00:00"), "mac_address"),
        (NetworkInterface(ipv4_config=IPv4Config(dns_servers=("fd00::53",))), "ipv4_config"),
        (NetworkInterface(ipv6_config=IPv6Config(dns_servers=("nope",))), "ipv6_config"),
        (NetworkInterface(ipv4_config=IPv4Config(dns_servers=("1.1.1.1",) * 5)), "ipv4_config"),
        (NetworkInterface(rx_rate_limit=RateLimit(bandwidth=-1)), "rx_rate_limit.bandwidth"),
        (NetworkInterface(tx_rate_limit=RateLimit(bandwidth=0, burst=5)), "tx_rate_limit"),
        (NetworkInterface(tx_rate_limit=RateLimit(10, refill_time_ms=-1)), "tx_rate_limit"),
    ],
)
def test_network_interface_shapes_are_checked(iface: NetworkInterface, field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        check_config(VmConfig(network=(NetworkInterface(), iface)), LIMITS)
    assert info.value.field.startswith(f"config.network[1].{field}"), info.value.field

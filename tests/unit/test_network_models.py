"""Reading config.network into a NetworkRequest, settings checks, and the VmNetwork views.

Interfaces are given as the API's JSON and go the way a request goes: protobuf, then
api.convert to the core NetworkInterface, core.validation's shape checks, and the
network's own checks against the host's settings.
"""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from typing import Any

import pytest
from google.protobuf.json_format import ParseDict, ParseError

from metald.api.convert import interface_from_pb
from metald.core.errors import InvalidArgument
from metald.core.models import NetworkInfo, NetworkInterface
from metald.core.validation import check_interface_shape
from metald.gen.vmprovisioner.v1 import vm_pb2 as pb
from metald.network.models import (
    IPv4,
    IPv6,
    NetworkMode,
    NetworkRequest,
    NetworkSettings,
    RateLimit,
    VmNetwork,
    tbf_burst,
)

SETTINGS = NetworkSettings()


def typed(iface: dict[str, Any]) -> NetworkInterface:
    where = "config.network[0]"
    core = interface_from_pb(ParseDict(iface, pb.NetworkInterface()), where)
    check_interface_shape(core, where)
    return core


def parse(iface: dict[str, Any], settings: NetworkSettings = SETTINGS) -> NetworkRequest:
    request = NetworkRequest.from_config([typed(iface)], settings)
    assert request is not None
    return request


def refused(iface: dict[str, Any], field: str, settings: NetworkSettings = SETTINGS) -> str:
    with pytest.raises(InvalidArgument) as info:
        parse(iface, settings)
    assert info.value.field == field, info.value.message
    return info.value.message


def test_no_interface_means_no_network() -> None:
    assert NetworkRequest.from_config([], SETTINGS) is None


def test_empty_interface_takes_every_default() -> None:
    assert parse({"id": "eth0"}) == NetworkRequest(interface_id="eth0")


def test_at_most_one_interface() -> None:
    with pytest.raises(InvalidArgument) as info:
        NetworkRequest.from_config([NetworkInterface(), NetworkInterface()], SETTINGS)
    assert info.value.field == "config.network"


@pytest.mark.parametrize(
    ("value", "mode"),
    [
        ("NETWORK_MODE_DUAL_STACK", NetworkMode.DUAL_STACK),
        ("NETWORK_MODE_IPV4_ONLY", NetworkMode.IPV4_ONLY),
        ("NETWORK_MODE_IPV6_ONLY", NetworkMode.IPV6_ONLY),
        (2, NetworkMode.IPV4_ONLY),
        ("NETWORK_MODE_UNSPECIFIED", None),
        (0, None),
    ],
)
def test_modes(value: object, mode: NetworkMode | None) -> None:
    assert parse({"mode": value}).mode == mode


def test_unknown_mode_and_fields_are_refused() -> None:
    # A mode number the schema does not name (proto3 enums are open on the binary wire).
    refused({"mode": 7}, "config.network[0].mode")
    # Names the schema does not have never get past the protobuf parser.
    for bad in ({"mode": "NETWORK_MODE_IPX"}, {"colour": "blue"}, {"ipv4_config": {"x": 1}}):
        with pytest.raises(ParseError):
            typed(bad)
    refused({"interface_type": "e1000"}, "config.network[0].interface_type")
    refused({"options": {"a": "b"}}, "config.network[0].options")


def test_a_mode_the_host_does_not_offer_is_refused() -> None:
    v4_only = NetworkSettings(ipv6_enabled=False)
    refused({"mode": "NETWORK_MODE_IPV6_ONLY"}, "config.network[0].mode", v4_only)
    refused({"mode": "NETWORK_MODE_DUAL_STACK"}, "config.network[0].mode", v4_only)
    assert parse({"mode": "NETWORK_MODE_IPV4_ONLY"}, v4_only).mode == NetworkMode.IPV4_ONLY
    # Unspecified falls back to what the host offers.
    assert v4_only.effective_default_mode() == NetworkMode.IPV4_ONLY


def test_static_addresses_are_read_in_either_form() -> None:
    request = parse(
        {
            "ipv4_config": {"address": "10.100.3.4", "netmask": "255.255.0.0"},
            "ipv6_config": {"address": "fd00::abcd/64", "prefix_length": 64},
        }
    )
    assert request.ipv4 == IPv4("10.100.3.4")
    assert request.ipv6 == IPv6("fd00::abcd")
    assert parse({"ipv4_config": {"address": "10.100.3.4/16"}}).ipv4 == IPv4("10.100.3.4")


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"ipv4_config": {"address": "10.200.0.5"}}, "ipv4_config.address"),
        ({"ipv4_config": {"address": "not-an-ip"}}, "ipv4_config.address"),
        ({"ipv4_config": {"address": "10.100.0.1"}}, "ipv4_config.address"),  # the gateway
        ({"ipv4_config": {"address": "10.100.0.0"}}, "ipv4_config.address"),  # network
        ({"ipv4_config": {"address": "10.100.255.255"}}, "ipv4_config.address"),  # broadcast
        ({"ipv4_config": {"address": "10.100.0.5/24"}}, "ipv4_config.address"),
        ({"ipv4_config": {"address": "fd00::5"}}, "ipv4_config.address"),
        ({"ipv4_config": {"netmask": "255.255.255.0"}}, "ipv4_config.netmask"),
        ({"ipv4_config": {"gateway": "10.100.0.9"}}, "ipv4_config.gateway"),
        ({"ipv4_config": {"dhcp": True}}, "ipv4_config.dhcp"),
        ({"ipv4_config": {"dns_servers": ["1.1.1.1", "fd00::53"]}}, "ipv4_config.dns_servers[1]"),
        ({"ipv6_config": {"address": "fd01::5"}}, "ipv6_config.address"),
        ({"ipv6_config": {"address": "fd00::1"}}, "ipv6_config.address"),
        ({"ipv6_config": {"address": "fd00::"}}, "ipv6_config.address"),
        ({"ipv6_config": {"prefix_length": 48}}, "ipv6_config.prefix_length"),
        ({"ipv6_config": {"slaac": True}}, "ipv6_config.slaac"),
        ({"ipv6_config": {"gateway": "fd00::2"}}, "ipv6_config.gateway"),
        (
            {"mode": "NETWORK_MODE_IPV6_ONLY", "ipv4_config": {"address": "10.100.0.5"}},
            "ipv4_config",
        ),
        ({"mode": "NETWORK_MODE_IPV4_ONLY", "ipv6_config": {"address": "fd00::5"}}, "ipv6_config"),
        ({"mac_address": "01:00:5e:00:00:01"}, "mac_address"),
        ({"mac_address": "nonsense"}, "mac_address"),
    ],
)
def test_bad_interface_settings_name_the_field(config: dict[str, Any], field: str) -> None:
    refused(config, f"config.network[0].{field}")


def test_gateway_and_dns_may_be_given_when_they_agree() -> None:
    request = parse(
        {
            "ipv4_config": {"gateway": "10.100.0.1", "dns_servers": ["1.1.1.1"]},
            "ipv6_config": {"gateway": "fd00:0::1", "dns_servers": ["2606:4700::1111"]},
            "mac_address": "02:AA:BB:CC:DD:EE",
        }
    )
    assert request.dns4 == ("1.1.1.1",)
    assert request.dns6 == ("2606:4700::1111",)
    assert request.mac == "02:aa:bb:cc:dd:ee"


def test_rate_limits_from_json_form() -> None:
    # Protobuf JSON renders int64 as strings.
    request = parse(
        {
            "rx_rate_limit": {"bandwidth": "1048576", "burst": "65536", "refill_time": "100"},
            "tx_rate_limit": {"bandwidth": 2048},
        }
    )
    assert request.rx == RateLimit(bandwidth=1048576, refill_time_ms=100, burst=65536)
    assert request.tx == RateLimit(bandwidth=2048)
    assert parse({"rx_rate_limit": {}}).rx is None
    assert parse({"rx_rate_limit": {"bandwidth": "0"}}).rx is None


@pytest.mark.parametrize(
    ("limit", "field"),
    [
        ({"bandwidth": "-1"}, "rx_rate_limit.bandwidth"),
        ({"bandwidth": str(2**32)}, "rx_rate_limit.bandwidth"),
        ({"bandwidth": "10", "burst": "-5"}, "rx_rate_limit.burst"),
        ({"bandwidth": "10", "refill_time": "-5"}, "rx_rate_limit.refill_time"),
        ({"burst": "100"}, "rx_rate_limit.bandwidth"),
    ],
)
def test_bad_rate_limits(limit: dict[str, Any], field: str) -> None:
    refused({"rx_rate_limit": limit}, f"config.network[0].{field}")


def test_tbf_burst_has_a_floor() -> None:
    assert tbf_burst(RateLimit(1024)) == 32 * 1024
    assert tbf_burst(RateLimit(100 * 1024 * 1024)) == 100 * 1024 * 1024 // 50
    assert tbf_burst(RateLimit(1024, burst=4096)) == 4096


def test_default_settings_are_consistent() -> None:
    SETTINGS.check()
    assert SETTINGS.gateway4 == ipaddress.IPv4Interface("10.100.0.1/16")
    assert SETTINGS.subnet6 == ipaddress.IPv6Network("fd00::/64")
    assert SETTINGS.default_rate_limit() is None
    assert NetworkSettings(default_rate_limit_mbps=8).default_rate_limit() == RateLimit(1_000_000)


@pytest.mark.parametrize(
    ("change", "variable"),
    [
        ({"ipv4_enabled": False, "ipv6_enabled": False}, "IPV4_ENABLED"),
        ({"bridge": "a-very-long-bridge-name"}, "BRIDGE"),
        ({"bridge_ipv4": "10.101.0.1/16"}, "BRIDGE_IPV4"),
        ({"bridge_ipv4": "10.100.0.1/24"}, "BRIDGE_IPV4"),
        ({"vm_subnet_ipv4": "10.100.0.0/31", "bridge_ipv4": "10.100.0.1/31"}, "VM_SUBNET_IPV4"),
        ({"vm_subnet_ipv6": "fd00::/129"}, "VM_SUBNET_IPV6"),
        ({"dns_ipv4": ("fd00::53",)}, "DNS_IPV4"),
        ({"dns_ipv6": ("nonsense",)}, "DNS_IPV6"),
    ],
)
def test_bad_settings_name_the_variable(change: dict[str, Any], variable: str) -> None:
    with pytest.raises(ValueError, match=f"UNKEY_METALD_NETWORK_{variable}"):
        replace(SETTINGS, **change).check()


def network(**kw: Any) -> VmNetwork:
    base: dict[str, Any] = {
        "vm_id": "vm-1",
        "customer_id": "acme",
        "netns": "mvm-vm-1",
        "tap": "tap0123456789ab",
        "mac": "02:00:00:00:00:01",
        "mode": NetworkMode.DUAL_STACK,
        "ipv4": ipaddress.IPv4Interface("10.100.0.2/16"),
        "ipv6": ipaddress.IPv6Interface("fd00::2/64"),
        "gateway4": IPv4("10.100.0.1"),
        "gateway6": IPv6("fd00::1"),
        "dns4": ("8.8.8.8",),
        "dns6": ("2606:4700:4700::1111",),
        "rx": RateLimit(1000, burst=2000),
    }
    base.update(kw)
    return VmNetwork(**base)


def test_guest_args_carry_the_whole_configuration() -> None:
    args = network().guest_args()
    assert args.render() == (
        "metald.ip4=10.100.0.2/16 metald.gw4=10.100.0.1 metald.ip6=fd00::2/64 "
        "metald.gw6=fd00::1 metald.mac=02:00:00:00:00:01 "
        "metald.dns=8.8.8.8,2606:4700:4700::1111"
    )
    v6 = network(mode=NetworkMode.IPV6_ONLY, ipv4=None, gateway4=None, dns4=()).guest_args()
    assert v6.ip4 == "" and v6.gw4 == "" and v6.ip6 == "fd00::2/64"


def test_network_info_for_get_vm_info() -> None:
    assert network().network_info() == NetworkInfo(
        mac="02:00:00:00:00:01",
        tap="tap0123456789ab",
        netns="mvm-vm-1",
        ipv4=IPv4("10.100.0.2"),
        gateway4=IPv4("10.100.0.1"),
        ipv6=IPv6("fd00::2"),
        gateway6=IPv6("fd00::1"),
        dns_servers=("8.8.8.8", "2606:4700:4700::1111"),
    )
    v6 = network(mode=NetworkMode.IPV6_ONLY, ipv4=None, gateway4=None, dns4=()).network_info()
    assert v6.ipv4 is None and v6.gateway4 is None
    assert v6.ipv6 == IPv6("fd00::2") and v6.gateway6 == IPv6("fd00::1")

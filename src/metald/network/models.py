"""What a caller asks of the network, what the manager hands back, and its settings.

Pure: no I/O. ``NetworkRequest.from_config`` reads the ``config.network`` entries of a
VmConfig (protobuf NetworkInterface messages as dicts, MessageToDict with proto field names)
and raises InvalidArgument naming the field for anything it cannot honour.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from metald.core.errors import InvalidArgument
from metald.core.guest import GuestArgs
from metald.network.naming import normalise_mac

IPv4 = ipaddress.IPv4Address
IPv6 = ipaddress.IPv6Address

# tc's tbf takes a 32-bit rate in bytes per second.
MAX_BANDWIDTH = 2**32 - 1
MAX_BURST = 2**31 - 1


class NetworkMode(StrEnum):
    DUAL_STACK = "dual-stack"
    IPV4_ONLY = "ipv4-only"
    IPV6_ONLY = "ipv6-only"

    @property
    def ipv4(self) -> bool:
        return self is not NetworkMode.IPV6_ONLY

    @property
    def ipv6(self) -> bool:
        return self is not NetworkMode.IPV4_ONLY


_PROTO_MODES = {
    "NETWORK_MODE_DUAL_STACK": NetworkMode.DUAL_STACK,
    "NETWORK_MODE_IPV4_ONLY": NetworkMode.IPV4_ONLY,
    "NETWORK_MODE_IPV6_ONLY": NetworkMode.IPV6_ONLY,
    1: NetworkMode.DUAL_STACK,
    2: NetworkMode.IPV4_ONLY,
    3: NetworkMode.IPV6_ONLY,
}
_UNSPECIFIED = ("", "NETWORK_MODE_UNSPECIFIED", 0, None)


@dataclass(frozen=True)
class RateLimit:
    """A token bucket: ``bandwidth`` bytes per second, ``burst`` bytes (0: a default)."""

    bandwidth: int
    burst: int = 0

    def effective_burst(self) -> int:
        # At least a few full-size frames, else about 20 ms worth of the rate.
        return self.burst or max(32 * 1024, self.bandwidth // 50)


@dataclass(frozen=True)
class NetworkSettings:
    """Network configuration (DESIGN §11; defaults as the existing metald's)."""

    bridge: str = "br-vms"
    ipv4_enabled: bool = True
    ipv6_enabled: bool = True
    bridge_ipv4: str = "10.100.0.1/16"
    vm_subnet_ipv4: str = "10.100.0.0/16"
    dns_ipv4: tuple[str, ...] = ("8.8.8.8", "8.8.4.4")
    bridge_ipv6: str = "fd00::1/64"
    vm_subnet_ipv6: str = "fd00::/64"
    dns_ipv6: tuple[str, ...] = ("2606:4700:4700::1111", "2606:4700:4700::1001")
    default_mode: NetworkMode = NetworkMode.DUAL_STACK
    # A default limit for VMs that ask for none (UNKEY_METALD_NETWORK_RATE_LIMIT[_MBPS]).
    default_rate_limit_mbps: int = 0
    netns_prefix: str = "mvm-"
    # Policy-routing rule priority for "no routing between guests" (see the package doc).
    rule_priority: int = 1000

    @property
    def gateway4(self) -> ipaddress.IPv4Interface:
        return ipaddress.IPv4Interface(self.bridge_ipv4)

    @property
    def gateway6(self) -> ipaddress.IPv6Interface:
        return ipaddress.IPv6Interface(self.bridge_ipv6)

    @property
    def subnet4(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.vm_subnet_ipv4)

    @property
    def subnet6(self) -> ipaddress.IPv6Network:
        return ipaddress.IPv6Network(self.vm_subnet_ipv6)

    def check(self) -> None:
        """ValueError naming the setting if the settings do not fit together."""
        if not self.ipv4_enabled and not self.ipv6_enabled:
            raise ValueError("UNKEY_METALD_NETWORK_IPV4_ENABLED/_IPV6_ENABLED: both are off")
        if not 1 <= len(self.bridge) <= 15:
            raise ValueError("UNKEY_METALD_NETWORK_BRIDGE: must be 1-15 characters")
        for name, value, kind in (
            ("BRIDGE_IPV4", self.bridge_ipv4, ipaddress.IPv4Interface),
            ("VM_SUBNET_IPV4", self.vm_subnet_ipv4, ipaddress.IPv4Network),
            ("BRIDGE_IPV6", self.bridge_ipv6, ipaddress.IPv6Interface),
            ("VM_SUBNET_IPV6", self.vm_subnet_ipv6, ipaddress.IPv6Network),
        ):
            try:
                kind(value)
            except ValueError as exc:
                raise ValueError(f"UNKEY_METALD_NETWORK_{name}: {exc}") from None
        if self.gateway4.ip not in self.subnet4 or self.gateway4.network != self.subnet4:
            raise ValueError(
                "UNKEY_METALD_NETWORK_BRIDGE_IPV4: must be an address in "
                "UNKEY_METALD_NETWORK_VM_SUBNET_IPV4 with its prefix length"
            )
        if self.gateway6.ip not in self.subnet6 or self.gateway6.network != self.subnet6:
            raise ValueError(
                "UNKEY_METALD_NETWORK_BRIDGE_IPV6: must be an address in "
                "UNKEY_METALD_NETWORK_VM_SUBNET_IPV6 with its prefix length"
            )
        if self.subnet4.prefixlen > 30:
            raise ValueError("UNKEY_METALD_NETWORK_VM_SUBNET_IPV4: at most /30")
        if self.subnet6.prefixlen > 126:
            raise ValueError("UNKEY_METALD_NETWORK_VM_SUBNET_IPV6: at most /126")
        for name, servers, kind4 in (
            ("DNS_IPV4", self.dns_ipv4, 4),
            ("DNS_IPV6", self.dns_ipv6, 6),
        ):
            for server in servers:
                try:
                    ip = ipaddress.ip_address(server)
                except ValueError:
                    raise ValueError(
                        f"UNKEY_METALD_NETWORK_{name}: {server!r} is not an IP"
                    ) from None
                if ip.version != kind4:
                    raise ValueError(f"UNKEY_METALD_NETWORK_{name}: {server} is not IPv{kind4}")
        if self.default_rate_limit_mbps < 0:
            raise ValueError("UNKEY_METALD_NETWORK_RATE_LIMIT_MBPS: must not be negative")

    def allowed_modes(self) -> set[NetworkMode]:
        modes = set()
        if self.ipv4_enabled:
            modes.add(NetworkMode.IPV4_ONLY)
        if self.ipv6_enabled:
            modes.add(NetworkMode.IPV6_ONLY)
        if self.ipv4_enabled and self.ipv6_enabled:
            modes.add(NetworkMode.DUAL_STACK)
        return modes

    def effective_default_mode(self) -> NetworkMode:
        if self.default_mode in self.allowed_modes():
            return self.default_mode
        return NetworkMode.IPV4_ONLY if self.ipv4_enabled else NetworkMode.IPV6_ONLY

    def default_rate_limit(self) -> RateLimit | None:
        if not self.default_rate_limit_mbps:
            return None
        return RateLimit(bandwidth=self.default_rate_limit_mbps * 1_000_000 // 8)


@dataclass(frozen=True)
class NetworkRequest:
    """One VM's network as asked for: the mode, optional static addresses and MAC, limits.

    ``mode`` None means the settings' default. Addresses are bare (no prefix): the prefix is
    always the configured subnet's.
    """

    mode: NetworkMode | None = None
    mac: str | None = None
    ipv4: IPv4 | None = None
    ipv6: IPv6 | None = None
    dns4: tuple[str, ...] | None = None
    dns6: tuple[str, ...] | None = None
    rx: RateLimit | None = None  # toward the guest
    tx: RateLimit | None = None  # from the guest
    interface_id: str = ""

    @classmethod
    def from_config(
        cls, interfaces: Sequence[Mapping[str, Any]], settings: NetworkSettings
    ) -> NetworkRequest | None:
        """The request from VmConfig.network (None if the VM has no network interface)."""
        if not interfaces:
            return None
        if len(interfaces) > 1:
            raise InvalidArgument("config.network", "at most one network interface")
        return cls.from_interface(interfaces[0], settings, "config.network[0]")

    @classmethod
    def from_interface(
        cls, iface: Mapping[str, Any], settings: NetworkSettings, where: str
    ) -> NetworkRequest:
        known = {
            "id",
            "mac_address",
            "tap_device",  # ignored: metald names the TAP (GetVmInfo reports it)
            "interface_type",
            "options",
            "ipv4_config",
            "ipv6_config",
            "mode",
            "rx_rate_limit",
            "tx_rate_limit",
        }
        for key in iface:
            if key not in known:
                raise InvalidArgument(f"{where}.{key}", "unknown field")
        if iface.get("interface_type", "") not in ("", "virtio-net", "virtio"):
            raise InvalidArgument(f"{where}.interface_type", "only virtio-net is supported")
        if iface.get("options"):
            raise InvalidArgument(f"{where}.options", "no options are supported")

        mode_value = iface.get("mode", "")
        if mode_value in _UNSPECIFIED:
            mode = None
        elif mode_value in _PROTO_MODES:
            mode = _PROTO_MODES[mode_value]
        else:
            raise InvalidArgument(f"{where}.mode", f"unknown network mode {mode_value!r}")
        effective = mode or settings.effective_default_mode()
        if effective not in settings.allowed_modes():
            raise InvalidArgument(f"{where}.mode", f"{effective.value} is not enabled on this host")

        mac = None
        if iface.get("mac_address"):
            try:
                mac = normalise_mac(str(iface["mac_address"]))
            except ValueError as exc:
                raise InvalidArgument(f"{where}.mac_address", str(exc)) from None

        v4 = _mapping(iface.get("ipv4_config"), f"{where}.ipv4_config")
        v6 = _mapping(iface.get("ipv6_config"), f"{where}.ipv6_config")
        ipv4 = dns4 = None
        ipv6 = dns6 = None
        if v4:
            if not effective.ipv4:
                raise InvalidArgument(f"{where}.ipv4_config", f"not allowed in {effective.value}")
            ipv4, dns4 = _parse_v4(v4, settings, f"{where}.ipv4_config")
        if v6:
            if not effective.ipv6:
                raise InvalidArgument(f"{where}.ipv6_config", f"not allowed in {effective.value}")
            ipv6, dns6 = _parse_v6(v6, settings, f"{where}.ipv6_config")

        return cls(
            mode=mode,
            mac=mac,
            ipv4=ipv4,
            ipv6=ipv6,
            dns4=dns4,
            dns6=dns6,
            rx=_rate_limit(iface.get("rx_rate_limit"), f"{where}.rx_rate_limit"),
            tx=_rate_limit(iface.get("tx_rate_limit"), f"{where}.tx_rate_limit"),
            interface_id=str(iface.get("id", "")),
        )


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidArgument(where, "must be a message")
    return value


def _int(value: Any, where: str) -> int:
    # MessageToDict renders int64 as a string.
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise InvalidArgument(where, "must be an integer") from None
    return number


def _rate_limit(value: Any, where: str) -> RateLimit | None:
    data = _mapping(value, where)
    if not data:
        return None
    for key in data:
        if key not in ("bandwidth", "burst", "refill_time"):
            raise InvalidArgument(f"{where}.{key}", "unknown field")
    bandwidth = _int(data.get("bandwidth", 0), f"{where}.bandwidth")
    burst = _int(data.get("burst", 0), f"{where}.burst")
    refill = _int(data.get("refill_time", 0), f"{where}.refill_time")
    if bandwidth < 0 or bandwidth > MAX_BANDWIDTH:
        raise InvalidArgument(f"{where}.bandwidth", f"must be 0-{MAX_BANDWIDTH} bytes/s")
    if burst < 0 or burst > MAX_BURST:
        raise InvalidArgument(f"{where}.burst", f"must be 0-{MAX_BURST} bytes")
    if refill < 0:
        raise InvalidArgument(f"{where}.refill_time", "must not be negative")
    if bandwidth == 0:
        if burst:
            raise InvalidArgument(f"{where}.bandwidth", "is required when burst is set")
        return None
    return RateLimit(bandwidth=bandwidth, burst=burst)


def _dns(value: Any, version: int, where: str) -> tuple[str, ...] | None:
    if not value:
        return None
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise InvalidArgument(where, "must be a list of addresses")
    out = []
    for i, item in enumerate(value):
        try:
            ip = ipaddress.ip_address(str(item))
        except ValueError:
            raise InvalidArgument(f"{where}[{i}]", "is not an IP address") from None
        if ip.version != version:
            raise InvalidArgument(f"{where}[{i}]", f"must be an IPv{version} address")
        out.append(str(ip))
    if len(out) > 4:
        raise InvalidArgument(where, "at most 4 servers")
    return tuple(out)


def _static_address(text: str, kind: Any, subnet: Any, gateway: Any, where: str) -> Any:
    """A static address asked for (None if none): in the subnet, with its prefix if given."""
    if not text:
        return None
    try:
        iface = kind(text)
    except ValueError:
        raise InvalidArgument(
            f"{where}.address", f"is not an IPv{subnet.version} address"
        ) from None
    if "/" in text and iface.network.prefixlen != subnet.prefixlen:
        raise InvalidArgument(f"{where}.address", f"the prefix must be /{subnet.prefixlen}")
    _check_static(iface.ip, subnet, gateway, f"{where}.address")
    return iface.ip


def _parse_v4(
    cfg: Mapping[str, Any], settings: NetworkSettings, where: str
) -> tuple[IPv4 | None, tuple[str, ...] | None]:
    for key in cfg:
        if key not in ("address", "netmask", "gateway", "dns_servers", "dhcp"):
            raise InvalidArgument(f"{where}.{key}", "unknown field")
    if cfg.get("dhcp"):
        raise InvalidArgument(f"{where}.dhcp", "not supported: metald assigns the address")
    subnet = settings.subnet4
    gateway = settings.gateway4.ip
    address = _static_address(
        str(cfg.get("address", "") or ""), ipaddress.IPv4Interface, subnet, gateway, where
    )
    netmask = str(cfg.get("netmask", "") or "")
    if netmask and netmask not in (str(subnet.netmask), str(subnet.prefixlen)):
        raise InvalidArgument(f"{where}.netmask", f"must be {subnet.netmask} (the VM subnet's)")
    gw = str(cfg.get("gateway", "") or "")
    if gw and gw != str(gateway):
        raise InvalidArgument(f"{where}.gateway", f"must be {gateway} (the host bridge) or empty")
    return address, _dns(cfg.get("dns_servers"), 4, f"{where}.dns_servers")


def _parse_v6(
    cfg: Mapping[str, Any], settings: NetworkSettings, where: str
) -> tuple[IPv6 | None, tuple[str, ...] | None]:
    for key in cfg:
        if key not in (
            "address",
            "prefix_length",
            "gateway",
            "dns_servers",
            "slaac",
            "privacy_extensions",
            "link_local",
        ):
            raise InvalidArgument(f"{where}.{key}", "unknown field")
    if cfg.get("slaac"):
        raise InvalidArgument(f"{where}.slaac", "not supported: metald assigns the address")
    if cfg.get("privacy_extensions"):
        raise InvalidArgument(f"{where}.privacy_extensions", "not supported")
    if cfg.get("link_local"):
        raise InvalidArgument(f"{where}.link_local", "not supported")
    subnet = settings.subnet6
    gateway = settings.gateway6.ip
    address = _static_address(
        str(cfg.get("address", "") or ""), ipaddress.IPv6Interface, subnet, gateway, where
    )
    prefix = _int(cfg.get("prefix_length", 0) or 0, f"{where}.prefix_length")
    if prefix and prefix != subnet.prefixlen:
        raise InvalidArgument(f"{where}.prefix_length", f"must be {subnet.prefixlen}")
    gw = str(cfg.get("gateway", "") or "")
    if gw:
        try:
            same = ipaddress.IPv6Address(gw) == gateway
        except ValueError:
            same = False
        if not same:
            raise InvalidArgument(
                f"{where}.gateway", f"must be {gateway} (the host bridge) or empty"
            )
    return address, _dns(cfg.get("dns_servers"), 6, f"{where}.dns_servers")


def _check_static(
    address: IPv4 | IPv6,
    subnet: ipaddress.IPv4Network | ipaddress.IPv6Network,
    gateway: IPv4 | IPv6,
    where: str,
) -> None:
    if address not in subnet:
        raise InvalidArgument(where, f"{address} is outside the VM subnet {subnet}")
    if address in reserved_addresses(subnet, gateway):
        raise InvalidArgument(where, f"{address} is reserved (network, broadcast or gateway)")


def reserved_addresses(
    subnet: ipaddress.IPv4Network | ipaddress.IPv6Network, gateway: IPv4 | IPv6
) -> set[IPv4 | IPv6]:
    """Addresses of the subnet never given to a VM."""
    reserved: set[IPv4 | IPv6] = {subnet.network_address, gateway}
    if subnet.version == 4:
        reserved.add(subnet.broadcast_address)
    return reserved


@dataclass(frozen=True)
class VmNetwork:
    """One VM's network, as set up: everything GetVmInfo and the VMM need."""

    vm_id: str
    customer_id: str
    netns: str
    tap: str
    mac: str
    mode: NetworkMode
    ipv4: ipaddress.IPv4Interface | None
    ipv6: ipaddress.IPv6Interface | None
    gateway4: IPv4 | None
    gateway6: IPv6 | None
    dns4: tuple[str, ...] = ()
    dns6: tuple[str, ...] = ()
    host_veth: str = ""
    vm_veth: str = ""
    vm_bridge: str = ""
    customer_bridge: str = ""
    rx: RateLimit | None = None
    tx: RateLimit | None = None

    @property
    def dns_servers(self) -> tuple[str, ...]:
        return self.dns4 + self.dns6

    def guest_args(self) -> GuestArgs:
        """The guest's network configuration for its kernel command line (no vm_id)."""
        return GuestArgs(
            ip4=str(self.ipv4) if self.ipv4 else "",
            gw4=str(self.gateway4) if self.ipv4 and self.gateway4 else "",
            ip6=str(self.ipv6) if self.ipv6 else "",
            gw6=str(self.gateway6) if self.ipv6 and self.gateway6 else "",
            dns=self.dns_servers,
            mac=self.mac,
        )

    def network_info(self) -> dict[str, Any]:
        """GetVmInfo's VmNetworkInfo fields (the IPv4 address first; IPv6 when IPv6-only)."""
        primary = self.ipv4 or self.ipv6
        gateway = self.gateway4 if self.ipv4 else self.gateway6
        return {
            "ip_address": str(primary.ip) if primary else "",
            "mac_address": self.mac,
            "tap_device": self.tap,
            "network_namespace": self.netns,
            "gateway": str(gateway) if gateway else "",
            "dns_servers": list(self.dns_servers),
        }

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form (for backend_info or a store column)."""
        return {
            "vm_id": self.vm_id,
            "customer_id": self.customer_id,
            "netns": self.netns,
            "tap": self.tap,
            "mac": self.mac,
            "mode": self.mode.value,
            "ipv4": str(self.ipv4) if self.ipv4 else "",
            "ipv6": str(self.ipv6) if self.ipv6 else "",
            "gateway4": str(self.gateway4) if self.gateway4 else "",
            "gateway6": str(self.gateway6) if self.gateway6 else "",
            "dns4": list(self.dns4),
            "dns6": list(self.dns6),
            "host_veth": self.host_veth,
            "vm_veth": self.vm_veth,
            "vm_bridge": self.vm_bridge,
            "customer_bridge": self.customer_bridge,
            "rx": [self.rx.bandwidth, self.rx.burst] if self.rx else None,
            "tx": [self.tx.bandwidth, self.tx.burst] if self.tx else None,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VmNetwork:
        return cls(
            vm_id=data["vm_id"],
            customer_id=data["customer_id"],
            netns=data["netns"],
            tap=data["tap"],
            mac=data["mac"],
            mode=NetworkMode(data["mode"]),
            ipv4=ipaddress.IPv4Interface(data["ipv4"]) if data.get("ipv4") else None,
            ipv6=ipaddress.IPv6Interface(data["ipv6"]) if data.get("ipv6") else None,
            gateway4=IPv4(data["gateway4"]) if data.get("gateway4") else None,
            gateway6=IPv6(data["gateway6"]) if data.get("gateway6") else None,
            dns4=tuple(data.get("dns4", ())),
            dns6=tuple(data.get("dns6", ())),
            host_veth=data.get("host_veth", ""),
            vm_veth=data.get("vm_veth", ""),
            vm_bridge=data.get("vm_bridge", ""),
            customer_bridge=data.get("customer_bridge", ""),
            rx=RateLimit(*data["rx"]) if data.get("rx") else None,
            tx=RateLimit(*data["tx"]) if data.get("tx") else None,
        )

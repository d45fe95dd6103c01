"""What a caller asks of the network, what the manager hands back, and its settings.

Pure: no I/O. ``NetworkRequest.from_config`` reads the ``config.network`` interfaces of a
VmConfig (core NetworkInterface records, their shapes already checked by
core.validation) against this host's settings — modes enabled, subnets, gateways — and
raises InvalidArgument naming the field for anything it cannot honour.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from metald.core.errors import InvalidArgument
from metald.core.guest import GuestArgs
from metald.core.models import IPv4Config, IPv6Config, NetworkInfo, NetworkInterface
from metald.core.models import NetworkMode as NetworkMode  # re-exported: the network's users
from metald.core.models import RateLimit as RateLimit  # take these from here too
from metald.network.naming import normalise_mac

IPv4 = ipaddress.IPv4Address
IPv6 = ipaddress.IPv6Address

# tc's tbf takes a 32-bit rate in bytes per second.
MAX_BANDWIDTH = 2**32 - 1
MAX_BURST = 2**31 - 1


def tbf_burst(limit: RateLimit) -> int:
    """The bucket size tc's tbf gets for a limit: its burst, or by default at least a few
    full-size frames, else about 20 ms worth of the rate."""
    return limit.burst or max(32 * 1024, limit.bandwidth // 50)


_ALLOW_ENTRY = re.compile(r"(tcp|udp):(\d{1,5})(?:-(\d{1,5}))?|icmp")


@dataclass(frozen=True)
class AllowRule:
    """One entry of UNKEY_METALD_NETWORK_HOST_ALLOW: ``tcp:<port>``, ``tcp:<low>-<high>``,
    the same for udp, or ``icmp`` (echo requests to the host, both families)."""

    proto: str
    low: int = 0
    high: int = 0

    def render(self) -> str:
        if self.proto == "icmp":
            return "icmp"
        if self.low == self.high:
            return f"{self.proto}:{self.low}"
        return f"{self.proto}:{self.low}-{self.high}"


def parse_host_allow(text: str) -> tuple[AllowRule, ...]:
    """The allow list from its setting (comma-separated; empty: nothing); ValueError naming
    the setting and the entry."""
    rules: list[AllowRule] = []
    for raw in text.split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        m = _ALLOW_ENTRY.fullmatch(entry)
        if m is None:
            raise ValueError(
                f"UNKEY_METALD_NETWORK_HOST_ALLOW: {raw.strip()!r} is not tcp:<port>, "
                "tcp:<low>-<high>, udp:<port>, udp:<low>-<high> or icmp"
            )
        if entry == "icmp":
            rule = AllowRule("icmp")
        else:
            low = int(m.group(2))
            high = int(m.group(3)) if m.group(3) else low
            if not 1 <= low <= high <= 65535:
                raise ValueError(
                    f"UNKEY_METALD_NETWORK_HOST_ALLOW: {raw.strip()!r}: ports are 1-65535, "
                    "low before high"
                )
            rule = AllowRule(m.group(1), low, high)
        if rule not in rules:
            rules.append(rule)
    return tuple(rules)


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
    # What guests may reach of the host's own services (UNKEY_METALD_NETWORK_HOST_ALLOW):
    # comma-separated tcp:<port>[-<port>], udp:<port>[-<port>], icmp (echo); "" for nothing.
    host_allow: str = "icmp"

    @property
    def host_allow_rules(self) -> tuple[AllowRule, ...]:
        return parse_host_allow(self.host_allow)

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
        parse_host_allow(self.host_allow)

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
        cls, interfaces: Sequence[NetworkInterface], settings: NetworkSettings
    ) -> NetworkRequest | None:
        """The request from VmConfig.network (None if the VM has no network interface)."""
        if not interfaces:
            return None
        if len(interfaces) > 1:
            raise InvalidArgument("config.network", "at most one network interface")
        return cls.from_interface(interfaces[0], settings, "config.network[0]")

    @classmethod
    def from_interface(
        cls, iface: NetworkInterface, settings: NetworkSettings, where: str
    ) -> NetworkRequest:
        if iface.interface_type not in ("", "virtio-net", "virtio"):
            raise InvalidArgument(f"{where}.interface_type", "only virtio-net is supported")
        if iface.options:
            raise InvalidArgument(f"{where}.options", "no options are supported")

        mode = iface.mode
        effective = mode or settings.effective_default_mode()
        if effective not in settings.allowed_modes():
            raise InvalidArgument(f"{where}.mode", f"{effective.value} is not enabled on this host")

        mac = None
        if iface.mac_address:
            try:
                mac = normalise_mac(iface.mac_address)
            except ValueError as exc:
                raise InvalidArgument(f"{where}.mac_address", str(exc)) from None

        # A sub-config given but left all empty asks for nothing (as an absent one).
        v4 = iface.ipv4_config if iface.ipv4_config != IPv4Config() else None
        v6 = iface.ipv6_config if iface.ipv6_config != IPv6Config() else None
        ipv4 = dns4 = None
        ipv6 = dns6 = None
        if v4 is not None:
            if not effective.ipv4:
                raise InvalidArgument(f"{where}.ipv4_config", f"not allowed in {effective.value}")
            ipv4, dns4 = _parse_v4(v4, settings, f"{where}.ipv4_config")
        if v6 is not None:
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
            rx=_rate_limit(iface.rx_rate_limit, f"{where}.rx_rate_limit"),
            tx=_rate_limit(iface.tx_rate_limit, f"{where}.tx_rate_limit"),
            interface_id=iface.id,
        )


def _rate_limit(limit: RateLimit | None, where: str) -> RateLimit | None:
    """The limit to apply (None for none). Shapes (signs, burst without bandwidth) were
    checked by core.validation; here only what tc can take."""
    if limit is None or limit.bandwidth == 0:
        return None
    if limit.bandwidth > MAX_BANDWIDTH:
        raise InvalidArgument(f"{where}.bandwidth", f"must be 0-{MAX_BANDWIDTH} bytes/s")
    if limit.burst > MAX_BURST:
        raise InvalidArgument(f"{where}.burst", f"must be 0-{MAX_BURST} bytes")
    return limit


def _dns(servers: tuple[str, ...]) -> tuple[str, ...] | None:
    # Checked by core.validation (addresses of the family, at most 4); normalised here.
    return tuple(str(ipaddress.ip_address(s)) for s in servers) or None


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
    cfg: IPv4Config, settings: NetworkSettings, where: str
) -> tuple[IPv4 | None, tuple[str, ...] | None]:
    if cfg.dhcp:
        raise InvalidArgument(f"{where}.dhcp", "not supported: metald assigns the address")
    subnet = settings.subnet4
    gateway = settings.gateway4.ip
    address = _static_address(cfg.address, ipaddress.IPv4Interface, subnet, gateway, where)
    if cfg.netmask and cfg.netmask not in (str(subnet.netmask), str(subnet.prefixlen)):
        raise InvalidArgument(f"{where}.netmask", f"must be {subnet.netmask} (the VM subnet's)")
    if cfg.gateway and cfg.gateway != str(gateway):
        raise InvalidArgument(f"{where}.gateway", f"must be {gateway} (the host bridge) or empty")
    return address, _dns(cfg.dns_servers)


def _parse_v6(
    cfg: IPv6Config, settings: NetworkSettings, where: str
) -> tuple[IPv6 | None, tuple[str, ...] | None]:
    if cfg.slaac:
        raise InvalidArgument(f"{where}.slaac", "not supported: metald assigns the address")
    if cfg.privacy_extensions:
        raise InvalidArgument(f"{where}.privacy_extensions", "not supported")
    if cfg.link_local:
        raise InvalidArgument(f"{where}.link_local", "not supported")
    subnet = settings.subnet6
    gateway = settings.gateway6.ip
    address = _static_address(cfg.address, ipaddress.IPv6Interface, subnet, gateway, where)
    if cfg.prefix_length and cfg.prefix_length != subnet.prefixlen:
        raise InvalidArgument(f"{where}.prefix_length", f"must be {subnet.prefixlen}")
    if cfg.gateway:
        try:
            same = ipaddress.IPv6Address(cfg.gateway) == gateway
        except ValueError:
            same = False
        if not same:
            raise InvalidArgument(
                f"{where}.gateway", f"must be {gateway} (the host bridge) or empty"
            )
    return address, _dns(cfg.dns_servers)


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

    def network_info(self) -> NetworkInfo:
        """What GetVmInfo reports (without traffic counters)."""
        return NetworkInfo(
            mac=self.mac,
            tap=self.tap,
            netns=self.netns,
            ipv4=self.ipv4.ip if self.ipv4 else None,
            gateway4=self.gateway4 if self.ipv4 else None,
            ipv6=self.ipv6.ip if self.ipv6 else None,
            gateway6=self.gateway6 if self.ipv6 else None,
            dns_servers=self.dns_servers,
        )

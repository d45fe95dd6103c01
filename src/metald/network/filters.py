"""What a guest may send: anti-spoofing and RA/DHCP guard on the guest's port, and the host's
own services closed to guests except an operator allow list (nftables, see nft.py).

Two tables, each in a namespace metald owns or was told to use, never anywhere else:

- ``bridge metald`` in each VM's namespace. Every frame that enters the VM bridge (vb-) from
  any port but the VM end of the veth (vg-) comes from the guest: the TAP, whatever the VMM
  made it, now or after a reboot. Such a frame passes only if its source MAC is the VM's
  and it is ARP for the VM's MAC and IPv4 address, IPv4 from its address, or IPv6 from its
  address or its link-local (EUI-64 of its MAC); everything else (other ether types, VLAN
  tagged frames, STP, LLDP...) is dropped. Router advertisements and redirects, and DHCP/DHCPv6
  server replies (UDP from port 67/547), are dropped whatever their source. Neighbour
  discovery may claim only the VM's own addresses (the NA target) and its own MAC (the
  first link-layer option, the one Linux reads; ND messages of an unusual length are
  dropped, so a second option cannot be hidden behind another). The filter sits in front
  of the veth and so of everything behind it: the customer's segment, the other VMs on it,
  the host. The VMM cannot change it: it has no capabilities in that namespace.

- ``inet metald-<bridge>`` in the host namespace (the configured one; in tests one the test
  made). Packets from guests (``iifname <bridge>``) that the host would deliver to itself
  (the input hook: the gateway addresses, any other address of the host namespace,
  broadcasts) are accepted only when they belong to a connection the host opened, are
  neighbour discovery or ICMP errors, or match the operator's allow list
  (UNKEY_METALD_NETWORK_HOST_ALLOW); TCP is refused with a reset, the rest with ICMP
  "administratively prohibited". Forwarding through the gateway is not touched. The
  bridge's ``accept_ra`` is set to 0 as well, so even an RA that got there would not be
  taken.

Each table carries a comment naming the SHA-256 of its rules: reading the comment back tells
whether the table is there and current, and a table is always replaced whole in one
transaction (never a moment without rules).

IPv6 fragments: an RA split so that its ICMPv6 header is not in the first fragment is not
recognised here, but Linux ignores fragmented neighbour discovery (``suppress_frag_ndisc``,
on by default), and the source checks still hold for every fragment.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re

from metald.host import named_netns as netns
from metald.network import nft
from metald.network.context import NetworkError, log
from metald.network.models import AllowRule

GUEST_TABLE = "metald"
GUEST_FAMILY = "bridge"
HOST_FAMILY = "inet"
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_-]")


# Rendering (pure) ------------------------------------------------------------------------


def link_local(mac: str) -> ipaddress.IPv6Address:
    """The guest kernel's EUI-64 link-local address for a MAC (fe80::/64, U/L bit flipped)."""
    raw = bytes.fromhex(mac.replace(":", ""))
    eui = bytes([raw[0] ^ 0x02]) + raw[1:3] + b"\xff\xfe" + raw[3:6]
    return ipaddress.IPv6Address(b"\xfe\x80" + bytes(6) + eui)


def _digest(body: str) -> str:
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def _with_comment(what: str, body: str) -> str:
    return f'comment "metald {what} rules={_digest(body)}"\n{body}'


def guest_rules(
    vm_id: str,
    vm_veth: str,
    mac: str,
    ip4: ipaddress.IPv4Address | None,
    ip6: ipaddress.IPv6Address | None,
) -> str:
    """The body of the guest port table (its comment first) for one VM."""
    mac_hex = "0x" + mac.replace(":", "").lower()
    own6 = [link_local(mac)] + ([ip6] if ip6 is not None else [])
    own6_set = "{ " + ", ".join(str(a) for a in own6) + " }"
    own6_hex = "{ " + ", ".join(f"0x{int(a):032x}" for a in own6) + " }"
    # A VLAN tag first: the kernel moves it out of the frame (into the packet's metadata)
    # before the bridge sees it, and the checks below would then pass a tagged frame.
    lines = [f"ether saddr != {mac} drop", "ether type { 8021q, 8021ad } drop"]
    if ip4 is not None:
        lines += [
            "arp htype 1 arp ptype ip arp hlen 6 arp plen 4 "
            f"arp saddr ether {mac} arp saddr ip {ip4} accept",
            f"ip saddr {ip4} udp sport 67 drop",
            f"ip saddr {ip4} accept",
        ]
    nd = "icmpv6 type"
    lines += [
        f"{nd} {{ nd-router-advert, nd-redirect }} drop",
        "ether type ip6 udp sport 547 drop",
        # Duplicate address detection (from ::, no link-layer option) for its own address.
        f"ip6 saddr :: {nd} nd-neighbor-solicit ip6 length 24 @th,64,128 {own6_hex} accept",
        f"{nd} nd-neighbor-advert @th,64,128 != {own6_hex} drop",
        f"ip6 saddr {own6_set} {nd} {{ nd-neighbor-solicit, nd-neighbor-advert }} "
        "ip6 length 24 accept",
        f"ip6 saddr {own6_set} {nd} nd-neighbor-solicit ip6 length 32 "
        f"@th,192,16 0x0101 @th,208,48 {mac_hex} accept",
        f"ip6 saddr {own6_set} {nd} nd-neighbor-advert ip6 length 32 "
        f"@th,192,16 0x0201 @th,208,48 {mac_hex} accept",
        f"ip6 saddr {own6_set} {nd} nd-router-solicit ip6 length 8 accept",
        f"ip6 saddr {own6_set} {nd} nd-router-solicit ip6 length 16 "
        f"@th,64,16 0x0101 @th,80,48 {mac_hex} accept",
        f"{nd} {{ nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert }} drop",
        f"ip6 saddr {own6_set} accept",
        "drop",
    ]
    body = (
        "chain prerouting {\n"
        "  type filter hook prerouting priority filter; policy accept;\n"
        f'  iifname != "{vm_veth}" jump from_guest\n'
        "}\n"
        "chain from_guest {\n" + "".join(f"  {line}\n" for line in lines) + "}"
    )
    return _with_comment(f"guest port of {vm_id}", body)


def host_table(bridge: str) -> str:
    return "metald-" + _SAFE_NAME.sub("_", bridge)


def host_rules(bridge: str, allow: tuple[AllowRule, ...]) -> str:
    """The body of the host namespace's table: what guests may reach of the host itself."""
    lines = [
        # Neighbour discovery first: conntrack does not track it (it would count as invalid).
        "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, destination-unreachable, "
        "packet-too-big, time-exceeded, parameter-problem } accept",
        "ct state established,related accept",
        "ct state invalid drop",
        "icmp type { destination-unreachable, time-exceeded, parameter-problem } accept",
    ]
    if any(r.proto == "icmp" for r in allow):
        lines += ["icmp type echo-request accept", "icmpv6 type echo-request accept"]
    for proto in ("tcp", "udp"):
        ports = [
            str(r.low) if r.low == r.high else f"{r.low}-{r.high}"
            for r in allow
            if r.proto == proto
        ]
        if ports:
            lines.append(f"{proto} dport {{ {', '.join(ports)} }} accept")
    lines += [
        "meta l4proto tcp reject with tcp reset",
        "reject with icmpx type admin-prohibited",
    ]
    body = (
        "chain input {\n"
        "  type filter hook input priority filter; policy accept;\n"
        f'  iifname "{bridge}" jump from_guests\n'
        "}\n"
        "chain from_guests {\n" + "".join(f"  {line}\n" for line in lines) + "}"
    )
    allowed = ",".join(r.render() for r in allow) or "nothing"
    return _with_comment(f"host services of {bridge} (allowed: {allowed})", body)


def comment_of(body: str) -> str:
    return body.split('"', 2)[1]


# Applying (blocking, namespaces metald owns or was given) ---------------------------------


def is_current(ns: str | None, family: str, table: str, body: str) -> bool:
    return nft.table_comment(ns, family, table) == comment_of(body)


def ensure(ns: str | None, family: str, table: str, body: str) -> bool:
    """Make the table hold body unless it already does; whether it was (re)written."""
    try:
        if is_current(ns, family, table, body):
            return False
        nft.replace_table(ns, family, table, body)
    except nft.NftError as exc:
        where = f"namespace {ns}" if ns else "metald's namespace"
        raise NetworkError(
            f"network: nftables refused table {family} {table} in {where}: {exc}"
        ) from None
    return True


def ensure_guest(netns_name: str, body: str) -> bool:
    return ensure(netns_name, GUEST_FAMILY, GUEST_TABLE, body)


def guest_current(netns_name: str, body: str) -> bool:
    return is_current(netns_name, GUEST_FAMILY, GUEST_TABLE, body)


def remove_guest(netns_name: str) -> bool:
    return nft.delete_table(netns_name, GUEST_FAMILY, GUEST_TABLE)


def ensure_host(ns: str | None, bridge: str, allow: tuple[AllowRule, ...]) -> None:
    if ensure(ns, HOST_FAMILY, host_table(bridge), host_rules(bridge, allow)):
        log.info(
            "network: guests may reach the host's own services only for: %s",
            ", ".join(r.render() for r in allow) or "nothing",
        )


def remove_host(ns: str | None, bridge: str) -> bool:
    return nft.delete_table(ns, HOST_FAMILY, host_table(bridge))


def ignore_router_advertisements(ns: str | None, device: str) -> None:
    """accept_ra=0 on a device of the namespace (a thread's /proc/sys/net is its namespace's)."""
    path = f"/proc/sys/net/ipv6/conf/{device}/accept_ra"
    with netns.entered(ns):
        try:
            with open(path, "w") as f:
                f.write("0")
        except FileNotFoundError:
            return  # IPv6 is off for the device

"""The guest port and host-services rulesets as text, and the allow-list setting (pure; the
kernel side is tests/integration/test_guest_net.py)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from metald.app import StartupError, build_network
from metald.config import load_settings
from metald.network import filters
from metald.network.models import AllowRule, NetworkSettings, parse_host_allow
from metald.store.database import Database

MAC = "52:54:00:12:34:56"
IP4 = ipaddress.IPv4Address("10.100.0.7")
IP6 = ipaddress.IPv6Address("fd00::7")


def test_the_allow_list_parses() -> None:
    assert parse_host_allow("") == ()
    assert parse_host_allow(" tcp:53 , UDP:53,icmp,tcp:8000-8100,tcp:53") == (
        AllowRule("tcp", 53, 53),
        AllowRule("udp", 53, 53),
        AllowRule("icmp"),
        AllowRule("tcp", 8000, 8100),
    )
    assert NetworkSettings().host_allow_rules == (AllowRule("icmp"),)


@pytest.mark.parametrize(
    "bad", ["tcp", "tcp:", "tcp:0", "tcp:65536", "udp:9-3", "sctp:1", "icmp:8", "tcp:1;drop"]
)
def test_a_bad_allow_list_names_the_setting(bad: str) -> None:
    with pytest.raises(ValueError, match="UNKEY_METALD_NETWORK_HOST_ALLOW"):
        NetworkSettings(host_allow=bad).check()


async def test_start_up_refuses_a_bad_allow_list(tmp_path: Path) -> None:
    settings = load_settings(network_host_allow="tcp:http")
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'metald.db'}")
    try:
        with pytest.raises(StartupError, match="UNKEY_METALD_NETWORK_HOST_ALLOW"):
            build_network(settings, database)
    finally:
        await database.close()


def test_link_local_is_the_kernels_eui64() -> None:
    assert filters.link_local(MAC) == ipaddress.IPv6Address("fe80::5054:ff:fe12:3456")


def _chain(body: str) -> list[str]:
    inside = body.split("chain from_guest {\n", 1)[1].rstrip().removesuffix("}")
    return [line.strip() for line in inside.splitlines() if line.strip()]


def test_the_guest_rules_check_mac_first_and_drop_the_rest() -> None:
    rules = _chain(filters.guest_rules("vm", "vg-0123456789ab", MAC, IP4, IP6))
    assert rules[0] == f"ether saddr != {MAC} drop"
    assert rules[1] == "ether type { 8021q, 8021ad } drop"
    assert rules[-1] == "drop"
    text = "\n".join(rules)
    assert f"arp saddr ether {MAC} arp saddr ip {IP4} accept" in text
    assert f"ip saddr {IP4} udp sport 67 drop" in text
    assert "icmpv6 type { nd-router-advert, nd-redirect } drop" in text
    assert f"ip6 saddr {{ fe80::5054:ff:fe12:3456, {IP6} }} accept" in text
    # RA and DHCP guards come before any accept of IPv6.
    assert text.index("nd-router-advert") < text.index("ip6 saddr { fe80::5054")
    assert text.index("udp sport 547 drop") < text.index("ip6 saddr { fe80::5054")


def test_an_ipv6_only_guest_sends_no_ipv4_and_no_arp() -> None:
    text = "\n".join(_chain(filters.guest_rules("vm", "vg-0123456789ab", MAC, None, IP6)))
    assert "arp" not in text and "ip saddr" not in text


def test_an_ipv4_only_guest_still_has_its_link_local() -> None:
    text = "\n".join(_chain(filters.guest_rules("vm", "vg-0123456789ab", MAC, IP4, None)))
    assert "ip6 saddr { fe80::5054:ff:fe12:3456 } accept" in text


def test_a_tables_comment_changes_with_its_rules() -> None:
    a = filters.guest_rules("vm", "vg-0123456789ab", MAC, IP4, IP6)
    b = filters.guest_rules("vm", "vg-0123456789ab", MAC, IP4, None)
    assert filters.comment_of(a) != filters.comment_of(b)
    assert filters.comment_of(a) == filters.comment_of(
        filters.guest_rules("vm", "vg-0123456789ab", MAC, IP4, IP6)
    )


def test_the_host_rules_allow_only_the_list() -> None:
    none = filters.host_rules("br-vms", ())
    assert 'iifname "br-vms" jump from_guests' in none
    assert "echo-request" not in none and "dport" not in none
    assert none.rstrip().endswith("reject with icmpx type admin-prohibited\n}")
    some = filters.host_rules("br-vms", parse_host_allow("icmp,tcp:53,udp:53,tcp:8000-8100"))
    assert "tcp dport { 53, 8000-8100 } accept" in some
    assert "udp dport { 53 } accept" in some
    assert "icmp type echo-request accept" in some and "icmpv6 type echo-request accept" in some
    assert filters.comment_of(none) != filters.comment_of(some)
    assert filters.host_table("br.vms@x") == "metald-br_vms_x"

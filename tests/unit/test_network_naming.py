"""Names and MACs derived from ids: short enough for Linux, stable, distinct."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from metald.core.ids import new_vm_id
from metald.network.naming import (
    IFNAMSIZ,
    CustomerNames,
    VmNames,
    check_netns_prefix,
    generated_mac,
    is_our_link_name,
    normalise_mac,
    vm_id_from_netns,
)

vm_ids = st.from_regex(r"[a-z0-9-]{1,64}", fullmatch=True)
customer_ids = st.from_regex(r"[A-Za-z0-9_.-]{1,128}", fullmatch=True)


@given(vm_ids)
def test_vm_interface_names_fit_linux_and_are_ours(vm_id: str) -> None:
    names = VmNames.for_vm(vm_id)
    for name in (names.host_veth, names.vm_veth, names.vm_bridge, names.tap):
        assert 1 <= len(name) <= IFNAMSIZ
        assert is_our_link_name(name)
    assert names.netns == "mvm-" + vm_id
    assert vm_id_from_netns(names.netns, "mvm-") == vm_id


@given(customer_ids)
def test_customer_names_fit_linux(customer_id: str) -> None:
    names = CustomerNames.for_customer(customer_id)
    for name in (names.bridge, names.uplink_host, names.uplink_customer):
        assert len(name) == IFNAMSIZ
        assert is_our_link_name(name)
    assert names.alias.endswith(customer_id)


def test_names_are_stable_and_distinct() -> None:
    assert VmNames.for_vm("vm-1") == VmNames.for_vm("vm-1")
    ids = [new_vm_id() for _ in range(2000)]
    taps = {VmNames.for_vm(i).tap for i in ids}
    assert len(taps) == len(ids)
    # A VM and a customer with the same id do not share a hash.
    assert VmNames.for_vm("x").host_veth[3:] != CustomerNames.for_customer("x").bridge[3:]


def test_netns_prefix_is_configurable() -> None:
    names = VmNames.for_vm("abc", "t123-")
    assert names.netns == "t123-abc"
    assert vm_id_from_netns("t123-abc", "t123-") == "abc"
    assert vm_id_from_netns("t123-", "t123-") is None
    assert vm_id_from_netns("mvm-abc", "t123-") is None
    assert check_netns_prefix("mvm-") == "mvm-"
    with pytest.raises(ValueError):
        check_netns_prefix("bad/prefix")
    with pytest.raises(ValueError):
        check_netns_prefix("")


@given(vm_ids)
def test_generated_mac_is_locally_administered_unicast(vm_id: str) -> None:
    mac = generated_mac(vm_id)
    assert normalise_mac(mac) == mac
    first = int(mac[:2], 16)
    assert first & 0x02, "locally administered"
    assert not first & 0x01, "unicast"
    assert generated_mac(vm_id) == mac


def test_generated_macs_differ() -> None:
    macs = {generated_mac(f"vm-{i}") for i in range(5000)}
    assert len(macs) == 5000


@pytest.mark.parametrize(
    ("given_mac", "expected"),
    [
        ("02:AB:cd:00:00:01", "02:ab:cd:00:00:01"),
        ("52-54-00-12-34-56", "52:54:00:12:34:56"),
        (" 02:00:00:00:00:01 ", "02:00:00:00:00:01"),
    ],
)
def test_normalise_mac_accepts(given_mac: str, expected: str) -> None:
    assert normalise_mac(given_mac) == expected


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "02:00:00:00:00",
        "02:00:00:00:00:00:00",
        "zz:00:00:00:00:01",
        "01:00:5e:00:00:01",
        "ff:ff:ff:ff:ff:ff",
        "00:00:00:00:00:00",
        "0200.0000.0001",
    ],
)
def test_normalise_mac_refuses(bad: str) -> None:
    with pytest.raises(ValueError):
        normalise_mac(bad)

"""Every map and string a tenant puts in a VmConfig is bounded and printable, and each
refusal names the field (core/validation.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from metald.core.errors import InvalidArgument
from metald.core.models import DiskConfig, IPv4Config, IPv6Config, NetworkInterface, VmConfig
from metald.core.validation import (
    MAX_INTERFACES,
    MAX_OPTIONS_ENTRIES,
    MAX_OPTIONS_VALUE,
    MAX_SHORT_TEXT,
    Limits,
    check_config,
)

MIB = 1024 * 1024
LIMITS = Limits(max_vcpus=4, max_memory_bytes=8192 * MIB)
GOOD = VmConfig()
DISK = DiskConfig(id="d", path="images/root.ext4")


def _options(n: int) -> dict[str, str]:
    return {f"k{i}": "v" for i in range(n)}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"boot_options": _options(MAX_OPTIONS_ENTRIES + 1)}, "config.boot.boot_options"),
        ({"boot_options": {"bad key": "v"}}, "config.boot.boot_options"),
        ({"boot_options": {"k" * 65: "v"}}, "config.boot.boot_options"),
        ({"boot_options": {"k": "v" * (MAX_OPTIONS_VALUE + 1)}}, "config.boot.boot_options[k]"),
        ({"boot_options": {"k": "a\nb"}}, "config.boot.boot_options[k]"),
        ({"storage": (replace(DISK, options=_options(17)),)}, "config.storage[0].options"),
        ({"storage": (replace(DISK, options={"k": "\x1b[2J"}),)}, "config.storage[0].options[k]"),
        ({"storage": (replace(DISK, path="images/a\nb"),)}, "config.storage[0].path"),
        ({"kernel_path": "k\u2028"}, "config.boot.kernel_path"),
        ({"metadata": {"k": "line\nbreak"}}, "config.metadata[k]"),
        ({"metadata": {"k": "\x85"}}, "config.metadata[k]"),
        ({"metadata": {"k": "admin\u202e"}}, "config.metadata[k]"),  # a bidi override
        ({"metadata": {"k": "a\u200bb"}}, "config.metadata[k]"),  # zero-width space
        ({"network": (NetworkInterface(),) * (MAX_INTERFACES + 1)}, "config.network"),
        ({"network": (NetworkInterface(id="x" * 257),)}, "config.network[0].id"),
        ({"network": (NetworkInterface(tap_device="t\x00"),)}, "config.network[0].tap_device"),
        (
            {"network": (NetworkInterface(interface_type="v" * (MAX_SHORT_TEXT + 1)),)},
            "config.network[0].interface_type",
        ),
        ({"network": (NetworkInterface(options=_options(17)),)}, "config.network[0].options"),
        (
            {"network": (NetworkInterface(ipv4_config=IPv4Config(gateway="1" * 300)),)},
            "config.network[0].ipv4_config.gateway",
        ),
        (
            {"network": (NetworkInterface(ipv6_config=IPv6Config(link_local="fe80::1\n")),)},
            "config.network[0].ipv6_config.link_local",
        ),
        (
            {"network": (NetworkInterface(ipv4_config=IPv4Config(dns_servers=("x",) * 10_000)),)},
            "config.network[0].ipv4_config.dns_servers",
        ),
    ],
)
def test_bounded_and_printable(change: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        check_config(replace(GOOD, **change), LIMITS)  # type: ignore[arg-type]
    assert err.value.field == field


def test_ordinary_maps_pass() -> None:
    check_config(
        replace(
            GOOD,
            boot_options={"firmware": "none", "a.b-c_d": "x y é"},
            storage=(replace(DISK, options={"cache": "none"}),),
            metadata={"owner": "team é", "k/v": ""},
        ),
        LIMITS,
    )


@given(
    st.dictionaries(st.text(max_size=80), st.text(max_size=400), max_size=20),
)
def test_any_option_map_is_accepted_only_within_the_bounds(options: dict[str, str]) -> None:
    try:
        check_config(replace(GOOD, boot_options=options), LIMITS)
    except InvalidArgument as e:
        assert e.field.startswith("config.boot.boot_options")
        return
    assert len(options) <= MAX_OPTIONS_ENTRIES
    for key, value in options.items():
        assert 0 < len(key) <= 64 and key.isascii() and key.isprintable()
        assert len(value.encode()) <= MAX_OPTIONS_VALUE and value.isprintable()

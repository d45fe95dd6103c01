"""Text a tenant is shown: bounded, one line, no host paths (core/redaction.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from metald.core.redaction import (
    MAX_MESSAGE_BYTES,
    MAX_REASON_BYTES,
    tenant_backend_info,
    tenant_message,
    vmm_text,
    without_host_paths,
)


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("-kernel /srv/jailer/qemu/vm-1/root/vmlinux: bad", "-kernel vmlinux: bad"),
        ("could not open '/var/lib/metald/vms/vm-1/disk0.img'", "could not open 'disk0.img'"),
        ("cannot open /dev/kvm.", "cannot open kvm."),
        ("in /opt/metald/assets/", "in assets/"),
        ("10.100.0.2/16 and 100 bytes/s", "10.100.0.2/16 and 100 bytes/s"),
        ("see http://example.com/x", "see http://example.com/x"),
        ("no path here", "no path here"),
        ("a / b", "a / b"),
    ],
)
def test_absolute_paths_keep_only_their_file_name(text: str, shown: str) -> None:
    assert without_host_paths(text) == shown


def test_vmm_text_is_one_bounded_line() -> None:
    said = "first\nsecond\r\x1b[31mred\x00" + "é" * 5000
    shown = vmm_text(said)
    assert "\n" not in shown and "\x1b" not in shown and "\x00" not in shown
    assert len(shown.encode()) <= MAX_REASON_BYTES and shown.endswith("...")
    assert shown.startswith("first second [31mred")


@given(st.text(max_size=3000), st.text(max_size=100))
def test_any_text_is_bounded_and_pathless(text: str, after: str) -> None:
    text = f"{text} /srv/jailer/qemu/vm-1/root/vmlinux {after}"
    for shown, limit in (
        (vmm_text(text), MAX_REASON_BYTES),
        (tenant_message(text), MAX_MESSAGE_BYTES),
    ):
        assert len(shown.encode()) <= limit
        assert shown == shown.strip() and "\n" not in shown
        assert "/srv/jailer/qemu" not in shown


def test_backend_info_keeps_only_what_a_tenant_may_see() -> None:
    info = {
        "accelerator": "tcg",
        "pid": "4242",
        "console_log": "/srv/jailer/qemu/vm-1/root/run/console.log",
        "qmp_socket": "/srv/jailer/qemu/vm-1/root/run/qmp.sock",
        "agent_socket": "/srv/x/agent.sock",
        "qemu_version": "8.2.2",
        "exit_reason": "vmm exited (exit status 1): /srv/jailer/x/vmlinux: bad",
    }
    assert tenant_backend_info(info) == {
        "accelerator": "tcg",
        "exit_reason": "vmm exited (exit status 1): vmlinux: bad",
    }

"""The KVM probe: its firmware image, and running images straight through /dev/kvm.

The tests that run a guest need /dev/kvm (skipped without it). Small real-mode images, built
here, drive the probe down each way a guest can end that this host can produce (on these
machines real mode works under KVM, long mode does not), so "works" is shown to be reachable
and each failure to carry its reason. Only the probe firmware itself tells whether KVM works.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import metald.host.kvm as kvm
from metald.backends.qemu.accel import probe_argv, probe_kvm
from metald.host.kvm import (
    PROBE_SUCCESS_EXIT,
    KvmProbeResult,
    probe_image,
    probe_kvm_directly,
)

KVM = Path("/dev/kvm")
needs_kvm = pytest.mark.skipif(
    not os.access(KVM, os.R_OK | os.W_OK), reason="no usable /dev/kvm on this host"
)
# These machines are VMs whose KVM is the nested kvm_pvm module: /dev/kvm opens and real mode
# runs, but a long-mode guest dies on cmpxchg16b (see shared/notes/guests-on-this-machine.md).
NESTED_PVM = Path("/sys/module/kvm_pvm").exists()


def image(code: bytes) -> bytes:
    """A 64 KiB image like the probe's: `code` at offset 0, `hlt` elsewhere, and the reset
    vector at 0xFFF0 jumping to offset 0 (so `code` runs in real mode at 0xFFFF0000)."""
    out = bytearray(b"\xf4" * 0x10000)
    out[: len(code)] = code
    out[0xFFF0:0xFFF3] = bytes.fromhex("e90d00")
    return bytes(out)


def report(value: int) -> bytes:
    return bytes([0xB0, value, 0xE6, 0xF4, 0xF4])  # mov al, value; out 0xf4, al; hlt


class SpyPopen(subprocess.Popen[bytes]):
    started: list[SpyPopen] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        SpyPopen.started.append(self)


@pytest.fixture
def spawned(monkeypatch: pytest.MonkeyPatch) -> list[SpyPopen]:
    SpyPopen.started = []
    monkeypatch.setattr(subprocess, "Popen", SpyPopen)  # what kvm.py calls
    return SpyPopen.started


def test_probe_image_is_a_64k_firmware_with_a_reset_vector() -> None:
    image = probe_image()
    assert len(image) == 0x10000
    assert image[0xFFF0:0xFFF3] == bytes.fromhex("e90d00")  # jmp to offset 0
    assert image[0] == 0xFA  # cli
    assert PROBE_SUCCESS_EXIT == 85
    argv = probe_argv("qemu-system-x86_64", Path("/tmp/p.bin"))
    assert "-no-reboot" in argv and "isa-debug-exit,iobase=0xf4,iosize=4" in argv


@pytest.mark.skipif(shutil.which("as") is None, reason="binutils (as, ld) not installed")
def test_probe_image_matches_its_source(tmp_path: Path) -> None:
    source = Path(kvm.__file__).parent / "kvm_probe.S"
    obj, binary = tmp_path / "probe.o", tmp_path / "probe.bin"
    subprocess.run(["as", "--64", "-o", str(obj), str(source)], check=True)
    subprocess.run(
        ["ld", "-Ttext=0", "-e", "0", "--oformat", "binary", "-o", str(binary), str(obj)],
        check=True,
    )
    assert binary.read_bytes() == probe_image()


@needs_kvm
@pytest.mark.skipif(not NESTED_PVM, reason="only these nested-KVM machines are known to fail")
def test_the_probe_firmware_dies_of_an_emulation_failure_here() -> None:
    result = probe_kvm_directly(probe_image())
    assert result.works is False
    # 0xFFFF0100 is the firmware's first `lock cmpxchg16b` (offset 0x100 in the image).
    assert result.detail == "KVM internal error, suberror 1 (emulation failure) at rip 0xffff0100"


@needs_kvm
@pytest.mark.guest
@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="QEMU not installed")
async def test_the_direct_probe_agrees_with_booting_the_firmware_under_qemu() -> None:
    qemu = await probe_kvm("qemu-system-x86_64")
    direct = probe_kvm_directly(probe_image())
    assert direct.works == qemu.works, (direct, qemu)


@needs_kvm
def test_a_guest_that_reports_success_is_believed(spawned: list[SpyPopen]) -> None:
    result = probe_kvm_directly(image(report(0x2A)))
    assert result == KvmProbeResult(True, "a test guest ran in long mode under KVM")
    assert [p.returncode for p in spawned] == [0]


@needs_kvm
@pytest.mark.parametrize(
    ("code", "detail"),
    [
        (report(0x15), "under KVM the test guest's cmpxchg16b is missing or wrong"),
        (report(0x07), "the test guest reported 0x7 under KVM"),
        (b"\xf4", "the test guest halted without reporting under KVM at rip 0x1"),
        (bytes.fromhex("e680f4"), "the test guest did unexpected I/O (out port 0x80)"),
    ],
    ids=["firmware-failed", "other-value", "hlt", "other-port"],
)
def test_each_way_a_guest_stops_short_is_a_failure_with_its_reason(
    code: bytes, detail: str
) -> None:
    assert probe_kvm_directly(image(code)) == KvmProbeResult(False, detail)


@needs_kvm
def test_a_guest_that_never_finishes_is_killed_at_the_deadline(spawned: list[SpyPopen]) -> None:
    result = probe_kvm_directly(image(bytes.fromhex("ebfe")), timeout=0.5)  # jmp $
    assert result == KvmProbeResult(False, "a test guest did not finish within 0.5 s under KVM")
    assert len(spawned) == 1
    assert spawned[0].returncode == -signal.SIGKILL  # killed by its pid, and reaped


def test_a_missing_device_is_named_and_nothing_is_started(
    tmp_path: Path, spawned: list[SpyPopen]
) -> None:
    device = tmp_path / "kvm"
    result = probe_kvm_directly(probe_image(), device=device)
    assert result == KvmProbeResult(False, f"{device} does not exist")
    assert spawned == []


def test_a_device_that_is_not_kvm_is_named_by_the_call_that_failed() -> None:
    result = probe_kvm_directly(probe_image(), device="/dev/null")
    assert result == KvmProbeResult(
        False, "KVM_GET_API_VERSION failed: Inappropriate ioctl for device"
    )


def test_bad_arguments_are_refused_before_anything_starts(spawned: list[SpyPopen]) -> None:
    with pytest.raises(ValueError, match="65536 bytes, not 3"):
        probe_kvm_directly(b"\xf4\xf4\xf4")
    with pytest.raises(ValueError, match="timeout"):
        probe_kvm_directly(probe_image(), timeout=0)
    assert spawned == []


def test_the_child_refuses_an_image_of_the_wrong_size() -> None:
    out = subprocess.run(
        [sys.executable, "-I", "-m", "metald.host.kvm", "--probe", "--device", "/dev/null"],
        input=b"\xf4" * 10,
        capture_output=True,
        check=True,
    ).stdout
    assert json.loads(out) == {
        "works": False,
        "detail": "the probe image must be 65536 bytes, not 10",
    }


def test_a_probe_process_that_breaks_is_a_failure_with_its_last_words() -> None:
    err = b"Traceback (most recent call last):\n  ...\nModuleNotFoundError: no metald\n"
    result = kvm._parse_child(1, b"", err)
    assert result == KvmProbeResult(
        False, "the KVM probe process failed (exit code 1): ModuleNotFoundError: no metald"
    )
    assert kvm._parse_child(0, b'{"works": "yes"}', b"").works is False

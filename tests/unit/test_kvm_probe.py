"""The KVM probe firmware image and its source."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

import metald.host.kvm as kvm
from metald.backends.qemu.accel import probe_argv
from metald.host.kvm import PROBE_SUCCESS_EXIT, probe_image


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

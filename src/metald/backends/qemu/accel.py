"""Choosing QEMU's accelerator: KVM where it really works, else TCG.

`/dev/kvm` existing (and even KVM_CREATE_VM succeeding) proves little: under broken nested
virtualisation a guest starts and then dies with "KVM internal error ... emulation failure".
So `auto` boots a tiny firmware under KVM with a deadline. The firmware (kvm_probe.S) enters
long mode with paging and runs the instructions that fail there (cmpxchg16b, xsave/xrstor)
before writing to QEMU's isa-debug-exit port; only that exit code counts as "KVM works".
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Assembled kvm_probe.S, up to the end of its GDT; the rest of the 64 KiB image is `hlt`
# except the reset vector at 0xFFF0 (a near jump to offset 0).
_PROBE_CODE = bytes.fromhex(
    "fa2e660f0116d8010f20c06683c8010f22c066ea1a00ffff080066b810008ed88ec08ed0bc00800000bf0010"
    "000031c0b900180000f3abc7050010000003200000c7050020000003300000c7050820000003400000c70510"
    "20000003500000c705182000000360000031c989c8c1e0150d830000008904cd0030000089c8c1e80b8904cd"
    "043000004181f90008000075da0f20e00d200600000f22e0b8001000000f22d8b9800000c00f320d00010000"
    "0f300f20c00d000000800f22c0eac400ffff1800b8100000008ed88ed048c7c400800000b8010000000fa20f"
    "bae10d0f83c60000004189cf31c031d248bb887766554433221148b900ffeeddccbbaa99f0480fc70c250080"
    "00000f859b00000048391c25008000000f858d000000410fbae71a732f0f20e0480d000004000f22e031c9b8"
    "0300000031d20f01d1b80300000031d20fae2425009000000fae2c250090000041bc204e0000488b04250830"
    "000048350000200048890425083000000f013c25000020004489242510002000660f6f042500800000660fd4"
    "c0488b042510800000f0480fc70c250080000041ffcc75b6b02ae6f4f4ebfdb015e6f4f4ebfd8db400006690"
    "0000000000000000ffff0000009acf00ffff00000092cf00ffff0000009aaf001f00b801ffff"
)
_RESET_VECTOR = bytes.fromhex("e90d00")  # jmp 0x0000 (wraps within the 64 KiB segment)
_IMAGE_SIZE = 0x10000
# isa-debug-exit makes QEMU exit with (value << 1) | 1; the firmware writes 0x2a on success.
PROBE_SUCCESS_EXIT = (0x2A << 1) | 1
DEFAULT_PROBE_TIMEOUT = 3.0
KVM_DEVICE = Path("/dev/kvm")


def probe_image() -> bytes:
    """The 64 KiB firmware image (QEMU wants a -bios size that is a multiple of 64 KiB)."""
    image = bytearray(b"\xf4" * _IMAGE_SIZE)
    image[: len(_PROBE_CODE)] = _PROBE_CODE
    image[0xFFF0 : 0xFFF0 + len(_RESET_VECTOR)] = _RESET_VECTOR
    return bytes(image)


def probe_argv(binary: str, image: Path) -> list[str]:
    return [
        binary,
        "-M", "microvm,x-option-roms=off,rtc=off",
        "-accel", "kvm",
        "-cpu", "host",
        "-m", "16",
        "-smp", "1",
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-no-reboot",
        "-bios", str(image),
        "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
    ]  # fmt: skip


@dataclass(frozen=True)
class ProbeResult:
    works: bool
    detail: str


async def probe_kvm(
    binary: str,
    *,
    timeout: float = DEFAULT_PROBE_TIMEOUT,
    kvm_device: Path = KVM_DEVICE,
) -> ProbeResult:
    """Whether KVM can run a long-mode guest here, and if not, why (one line)."""
    problem = _kvm_device_problem(kvm_device)
    if problem:
        return ProbeResult(False, problem)
    with tempfile.TemporaryDirectory(prefix="metald-kvm-probe-") as tmp:
        image = Path(tmp) / "probe.bin"
        _write(image, probe_image())
        proc = await asyncio.create_subprocess_exec(
            *probe_argv(binary, image),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            _, stderr = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            return ProbeResult(False, f"a test guest did not finish within {timeout:g} s under KVM")
    if proc.returncode == PROBE_SUCCESS_EXIT:
        return ProbeResult(True, "a test guest ran in long mode under KVM")
    lines = [ln.strip() for ln in stderr.decode(errors="replace").splitlines() if ln.strip()]
    first = next((ln for ln in lines if "error" in ln.lower()), lines[0] if lines else "")
    detail = f": {first}" if first else ""
    return ProbeResult(
        False, f"a test guest failed under KVM (exit code {proc.returncode}){detail}"
    )


def _kvm_device_problem(device: Path) -> str:
    if not device.exists():
        return f"{device} does not exist"
    if not os.access(device, os.R_OK | os.W_OK):
        return f"{device} is not readable and writable by this user"
    return ""


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)  # 64 KiB into a fresh temp dir: well under a millisecond

"""Choosing QEMU's accelerator: KVM where it really works, else TCG.

`/dev/kvm` existing (and even KVM_CREATE_VM succeeding) proves little: under broken nested
virtualisation a guest starts and then dies with "KVM internal error ... emulation failure".
So `auto` boots a tiny firmware under KVM with a deadline. The firmware (host/kvm_probe.S) enters
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

from metald.host.kvm import PROBE_SUCCESS_EXIT, probe_image

DEFAULT_PROBE_TIMEOUT = 3.0
KVM_DEVICE = Path("/dev/kvm")


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

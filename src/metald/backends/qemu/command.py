"""The QEMU command line for one VM: pure functions, no I/O.

A LaunchSpec and the VM's directory layout go in, an argv comes out. Everything a guest sees
is decided here, so it is unit-tested without starting anything.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metald.assets.kernel_args import GuestArgs, kernel_command_line
from metald.core.models import LaunchSpec, ResolvedDisk

MIB = 1024 * 1024
# sun_path is 108 bytes including the terminating NUL.
MAX_UNIX_SOCKET_PATH = 107
ACCELERATORS = ("kvm", "tcg")
# x86 COMMAND_LINE_SIZE is 2048 including the terminating NUL.
MAX_KERNEL_CMDLINE = 2047
# A VM id names a directory and appears in QEMU options and on the kernel command line.
# (Core's ids, [a-z0-9-]{1,64}, are a subset.) No leading dot: never ".", ".." or hidden.
_VM_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}")
MAX_VM_ID = 64


def check_vm_id(vm_id: str) -> None:
    if not _VM_ID.fullmatch(vm_id):
        raise ValueError(
            "a VM id must be 1-64 letters, digits, '.', '_' or '-', not starting with '.'"
        )


def max_vm_id_length(vm_root: Path) -> int:
    """The longest VM id whose QMP socket path still fits in AF_UNIX under vm_root."""
    fixed = len(str(vm_root).encode()) + len("/") + len("/qmp.sock")
    return max(0, min(MAX_VM_ID, MAX_UNIX_SOCKET_PATH - fixed))


@dataclass(frozen=True)
class VmLayout:
    """The files of one VM, all inside its own directory."""

    dir: Path

    @property
    def qmp_socket(self) -> Path:
        return self.dir / "qmp.sock"

    @property
    def console_log(self) -> Path:
        return self.dir / "console.log"

    @property
    def stderr_log(self) -> Path:
        return self.dir / "qemu.stderr"

    @property
    def spec_file(self) -> Path:
        return self.dir / "spec.json"

    @property
    def process_file(self) -> Path:
        return self.dir / "process.json"

    def disk_copy(self, index: int) -> Path:
        return self.dir / f"disk{index}.img"


@dataclass(frozen=True)
class Drive:
    """A disk as QEMU opens it: a per-VM copy (writable) or the original (read-only)."""

    node_id: str
    path: Path
    read_only: bool
    source: Path
    is_root_device: bool


def check_socket_path(path: Path) -> None:
    """AF_UNIX paths are short; say so clearly instead of letting bind() fail obscurely."""
    size = len(str(path).encode())
    if size > MAX_UNIX_SOCKET_PATH:
        raise ValueError(
            f"the QMP socket path would be {size} bytes, more than the {MAX_UNIX_SOCKET_PATH} "
            "a Unix socket allows: use a shorter data directory"
        )


def plan_drives(spec: LaunchSpec, layout: VmLayout) -> list[Drive]:
    """Which file QEMU opens for each disk. The root device comes first (it is /dev/vda)."""
    disks = sorted(spec.disks, key=lambda d: not d.is_root_device)
    drives = []
    for index, disk in enumerate(disks):
        path = disk.path if disk.read_only else layout.disk_copy(index)
        drives.append(
            Drive(
                node_id=f"disk{index}",
                path=path,
                read_only=disk.read_only,
                source=disk.path,
                is_root_device=disk.is_root_device,
            )
        )
    return drives


def kernel_cmdline_and_dropped(
    spec: LaunchSpec, *, accelerator: str = "tcg", tsc_khz: int | None = None
) -> tuple[str, list[str]]:
    """Our fixed arguments first, then the caller's (the kernel lets a later one win).

    Under TCG the guest's TSC is the host's; telling the guest its frequency spares it a
    PIT calibration that fails on a busy host (see assets.kernel_args).

    The whole line must stay within the kernel's COMMAND_LINE_SIZE: a longer one makes a
    microvm guest die silently before its first console line (measured: 2047 bytes boot,
    2048 do not). Caller arguments that do not fit are dropped whole (never cut in half) and
    returned as the second item.
    """
    guest = GuestArgs(vm_id=spec.vm_id)
    timer_tsc = tsc_khz if accelerator == "tcg" else None
    args = kernel_command_line(guest, accel=accelerator, reboot="t", tsc_khz=timer_tsc).split()
    size = len(" ".join(args).encode())
    dropped: list[str] = []
    for word in spec.kernel_args.split():
        extra = 1 + len(word.encode())
        if dropped or size + extra > MAX_KERNEL_CMDLINE:
            dropped.append(word)  # keep the caller's order: nothing after a dropped word
            continue
        args.append(word)
        size += extra
    return " ".join(args), dropped


def kernel_cmdline(
    spec: LaunchSpec, *, accelerator: str = "tcg", tsc_khz: int | None = None
) -> str:
    return kernel_cmdline_and_dropped(spec, accelerator=accelerator, tsc_khz=tsc_khz)[0]


def escape_option(value: str) -> str:
    """QEMU option syntax (key=value,key=value) escapes a comma by doubling it."""
    return value.replace(",", ",,")


def memory_mib(memory_bytes: int) -> int:
    if memory_bytes <= 0:
        raise ValueError("memory must be positive")
    return -(-memory_bytes // MIB)


def build_argv(
    spec: LaunchSpec,
    *,
    layout: VmLayout,
    drives: Sequence[Drive],
    accelerator: str,
    binary: str = "qemu-system-x86_64",
    tsc_khz: int | None = None,
) -> list[str]:
    """The full command line that starts the VM with its vCPUs stopped (-S)."""
    if accelerator not in ACCELERATORS:
        raise ValueError(f"accelerator must be one of {', '.join(ACCELERATORS)}")
    if spec.vcpu_count < 1:
        raise ValueError("vcpu_count must be at least 1")
    check_vm_id(spec.vm_id)
    check_socket_path(layout.qmp_socket)
    argv = [
        binary,
        "-name", escape_option(spec.vm_id),
        "-M", "microvm,x-option-roms=off,rtc=off",
        "-device", "i8042",
        "-accel", accelerator,
        "-cpu", "host" if accelerator == "kvm" else "max",
        "-m", str(memory_mib(spec.memory_bytes)),
        "-smp", str(spec.vcpu_count),
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-display", "none",
        "-S",
        "-chardev",
        f"socket,id=qmp,path={escape_option(str(layout.qmp_socket))},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-chardev",
        f"file,id=con0,path={escape_option(str(layout.console_log))},append=on",
        "-serial", "chardev:con0",
        "-kernel", str(spec.kernel),
    ]  # fmt: skip
    if spec.initrd is not None:
        argv += ["-initrd", str(spec.initrd)]
    argv += ["-append", kernel_cmdline(spec, accelerator=accelerator, tsc_khz=tsc_khz)]
    for drive in drives:
        options = [
            f"id={drive.node_id}",
            f"file={escape_option(str(drive.path))}",
            "format=raw",
            "if=none",
            f"readonly={'on' if drive.read_only else 'off'}",
        ]
        if not drive.read_only:
            options.append("discard=unmap")  # the guest's TRIM keeps the sparse copy sparse
        argv += [
            "-drive", ",".join(options),
            "-device", f"virtio-blk-device,drive={drive.node_id}",
        ]  # fmt: skip
    return argv


def spec_to_json(spec: LaunchSpec) -> str:
    data: dict[str, Any] = {
        "vm_id": spec.vm_id,
        "vcpu_count": spec.vcpu_count,
        "memory_bytes": spec.memory_bytes,
        "kernel": str(spec.kernel),
        "initrd": None if spec.initrd is None else str(spec.initrd),
        "kernel_args": spec.kernel_args,
        "disks": [
            {
                "id": d.id,
                "path": str(d.path),
                "read_only": d.read_only,
                "is_root_device": d.is_root_device,
            }
            for d in spec.disks
        ],
    }
    return json.dumps(data, indent=2, sort_keys=True)


def spec_from_json(text: str) -> LaunchSpec:
    data = json.loads(text)
    return LaunchSpec(
        vm_id=str(data["vm_id"]),
        vcpu_count=int(data["vcpu_count"]),
        memory_bytes=int(data["memory_bytes"]),
        kernel=Path(data["kernel"]),
        initrd=None if data.get("initrd") is None else Path(data["initrd"]),
        kernel_args=str(data.get("kernel_args", "")),
        disks=tuple(
            ResolvedDisk(
                id=str(d["id"]),
                path=Path(d["path"]),
                read_only=bool(d["read_only"]),
                is_root_device=bool(d["is_root_device"]),
            )
            for d in data.get("disks", ())
        ),
    )

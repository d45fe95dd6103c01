"""The QEMU command line for one VM: pure functions, no I/O.

A LaunchSpec and the paths QEMU is to use go in, an argv comes out. Everything a guest sees
is decided here, so it is unit-tested without starting anything.

A QEMU run directly uses host paths (its files are in the VM's directory); a jailed one sees
only its jail, where the kernel is /vmlinux, the initrd /initrd, disk N /diskN.img, and the
QMP socket and console log are in its writable /run (VmmPaths.jailed).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from metald.assets.kernel_args import GuestArgs, kernel_command_line
from metald.core.models import LaunchSpec, NicSpec, ResolvedDisk

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
# Interface names: at most 15 bytes (IFNAMSIZ 16 with the NUL); kept to a plain alphabet.
_IFNAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,14}")
_MAC = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")

# Paths inside a QEMU's jail.
JAILED_QMP_SOCKET = "/run/qmp.sock"
JAILED_AGENT_SOCKET = "/run/agent.sock"
# The guest agent's serial port: a second ISA UART, ttyS1 in the guest.
AGENT_TTY = "ttyS1"
JAILED_CONSOLE_LOG = "/run/console.log"
JAILED_KERNEL = "/vmlinux"
JAILED_INITRD = "/initrd"
# A jail is <jail base>/qemu/<vm_id>/root; the QMP socket's host path is that plus this.
_JAIL_SOCKET_SUFFIX = "/root" + JAILED_QMP_SOCKET


def check_vm_id(vm_id: str) -> None:
    if not _VM_ID.fullmatch(vm_id):
        raise ValueError(
            "a VM id must be 1-64 letters, digits, '.', '_' or '-', not starting with '.'"
        )


def max_vm_id_length(vm_root: Path) -> int:
    """The longest VM id whose QMP socket path still fits in AF_UNIX under vm_root."""
    fixed = len(str(vm_root).encode()) + len("/") + len("/qmp.sock")
    return max(0, min(MAX_VM_ID, MAX_UNIX_SOCKET_PATH - fixed))


def max_jailed_vm_id_length(backend_jail_dir: Path) -> int:
    """The same for jailed QEMUs, whose sockets are <backend_jail_dir>/<id>/root/run/."""
    fixed = len(str(backend_jail_dir).encode()) + len("/") + len(_JAIL_SOCKET_SUFFIX)
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

    @property
    def jail_spec_file(self) -> Path:
        """The JailSpec of the VM's jailed QEMU (its jail is found again from it)."""
        return self.dir / "jail.json"

    def disk_copy(self, index: int) -> Path:
        return self.dir / f"disk{index}.img"


@dataclass(frozen=True)
class VmmPaths:
    """The files QEMU opens, as QEMU names them."""

    qmp_socket: Path
    console_log: Path
    kernel: Path
    initrd: Path | None
    agent_socket: Path | None = None  # the guest agent's port, when enabled

    @classmethod
    def direct(cls, spec: LaunchSpec, layout: VmLayout, *, agent: bool = False) -> VmmPaths:
        """A QEMU run directly: the host's files."""
        return cls(
            layout.qmp_socket,
            layout.console_log,
            spec.kernel,
            spec.initrd,
            layout.qmp_socket.with_name("agent.sock") if agent else None,
        )

    @classmethod
    def jailed(cls, spec: LaunchSpec, *, agent: bool = False) -> VmmPaths:
        """A jailed QEMU: the files as placed in its jail."""
        return cls(
            Path(JAILED_QMP_SOCKET),
            Path(JAILED_CONSOLE_LOG),
            Path(JAILED_KERNEL),
            None if spec.initrd is None else Path(JAILED_INITRD),
            Path(JAILED_AGENT_SOCKET) if agent else None,
        )


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


def jailed_drives(drives: Sequence[Drive]) -> list[Drive]:
    """The drives as a jailed QEMU opens them: disk N at /diskN.img (`path` there, while
    the host file to place is the original drive's `path`)."""
    return [replace(d, path=Path(f"/{d.node_id}.img")) for d in drives]


def check_nic(nic: NicSpec) -> None:
    """A NIC QEMU and the guest can take; ValueError naming the field otherwise."""
    if not _IFNAME.fullmatch(nic.tap):
        raise ValueError("nic.tap: 1-15 letters, digits, '.', '_' or '-'")
    if not _MAC.fullmatch(nic.mac):
        raise ValueError("nic.mac: six hex octets separated by ':'")
    if int(nic.mac[:2], 16) & 1:
        raise ValueError("nic.mac: a multicast address cannot be a NIC's")
    for word in nic.guest_args.split():
        if any(c in "\"'\\" or not c.isprintable() for c in word):
            raise ValueError("nic.guest_args: printable words without quotes")
    if not nic.netns or (not nic.netns.startswith("/") and "/" in nic.netns):
        raise ValueError("nic.netns: a name under /run/netns or an absolute path")


def kernel_cmdline_and_dropped(
    spec: LaunchSpec, *, accelerator: str = "tcg", tsc_khz: int | None = None, agent: bool = False
) -> tuple[str, list[str]]:
    """Our fixed arguments first, then the NIC's guest arguments (the guest's addresses),
    then the caller's (the kernel lets a later one win).

    Under TCG the guest's TSC is the host's; telling the guest its frequency spares it a
    PIT calibration that fails on a busy host (see assets.kernel_args).

    The whole line must stay within the kernel's COMMAND_LINE_SIZE: a longer one makes a
    microvm guest die silently before its first console line (measured: 2047 bytes boot,
    2048 do not). Caller arguments that do not fit are dropped whole (never cut in half) and
    returned as the second item. metald's own arguments, the NIC's included, always fit
    (ValueError otherwise).
    """
    guest = GuestArgs(vm_id=spec.vm_id, agent=AGENT_TTY if agent else "")
    timer_tsc = tsc_khz if accelerator == "tcg" else None
    args = kernel_command_line(guest, accel=accelerator, reboot="t", tsc_khz=timer_tsc).split()
    if spec.nic is not None:
        args += spec.nic.guest_args.split()
    size = len(" ".join(args).encode())
    if size > MAX_KERNEL_CMDLINE:
        raise ValueError(
            f"metald's own kernel arguments take {size} bytes, more than the kernel's "
            f"{MAX_KERNEL_CMDLINE}"
        )
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
    spec: LaunchSpec, *, accelerator: str = "tcg", tsc_khz: int | None = None, agent: bool = False
) -> str:
    return kernel_cmdline_and_dropped(spec, accelerator=accelerator, tsc_khz=tsc_khz, agent=agent)[
        0
    ]


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
    paths: VmmPaths,
    drives: Sequence[Drive],
    accelerator: str,
    binary: str = "qemu-system-x86_64",
    tsc_khz: int | None = None,
) -> list[str]:
    """The full command line that starts the VM with its vCPUs stopped (-S). `paths` and
    the drives' paths are as QEMU will see them (VmmPaths.direct or .jailed)."""
    if accelerator not in ACCELERATORS:
        raise ValueError(f"accelerator must be one of {', '.join(ACCELERATORS)}")
    if spec.vcpu_count < 1:
        raise ValueError("vcpu_count must be at least 1")
    check_vm_id(spec.vm_id)
    check_socket_path(paths.qmp_socket)
    if spec.nic is not None:
        check_nic(spec.nic)
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
        f"socket,id=qmp,path={escape_option(str(paths.qmp_socket))},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-chardev",
        f"file,id=con0,path={escape_option(str(paths.console_log))},append=on",
        "-serial", "chardev:con0",
        "-kernel", str(paths.kernel),
    ]  # fmt: skip
    if paths.initrd is not None:
        argv += ["-initrd", str(paths.initrd)]
    agent = paths.agent_socket is not None
    argv += [
        "-append",
        kernel_cmdline(spec, accelerator=accelerator, tsc_khz=tsc_khz, agent=agent),
    ]
    if paths.agent_socket is not None:
        argv += [
            "-chardev",
            f"socket,id=agent,path={escape_option(str(paths.agent_socket))},server=on,wait=off",
            "-device", "isa-serial,chardev=agent,iobase=0x2f8,irq=3",
        ]  # fmt: skip
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
    if spec.nic is not None:
        argv += [
            "-netdev", f"tap,id=net0,ifname={spec.nic.tap},script=no,downscript=no",
            "-device", f"virtio-net-device,netdev=net0,mac={spec.nic.mac.lower()}",
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
        "nic": None
        if spec.nic is None
        else {
            "netns": spec.nic.netns,
            "tap": spec.nic.tap,
            "mac": spec.nic.mac,
            "guest_args": spec.nic.guest_args,
        },
    }
    return json.dumps(data, indent=2, sort_keys=True)


def spec_from_json(text: str) -> LaunchSpec:
    data = json.loads(text)
    nic = data.get("nic")
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
        nic=None
        if nic is None
        else NicSpec(
            netns=str(nic["netns"]),
            tap=str(nic["tap"]),
            mac=str(nic["mac"]),
            guest_args=str(nic.get("guest_args", "")),
        ),
    )

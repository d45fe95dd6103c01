"""The QEMU command line for one VMM process: pure functions, no I/O.

A launch (the spec, the files as QEMU names them, the guest command line) goes in, an argv
comes out. Everything a guest sees is decided here, so it is unit-tested without starting
anything. A jailed QEMU names only paths inside its jail (the runtime decides them:
backends/vmm/layout.py); one run directly names host paths.
"""

from __future__ import annotations

import re

from metald.backends.vmm.driver import LaunchContext
from metald.core.models import NicSpec

MIB = 1024 * 1024
ACCELERATORS = ("kvm", "tcg")
# QEMU's own seccomp filter (it needs libseccomp; Debian's QEMU has it): obsolete system calls,
# setuid and friends, fork/exec and scheduler/affinity changes are denied to the VMM. It
# stacks on the jailer's filter (no new user namespaces).
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
# Interface names: at most 15 bytes (IFNAMSIZ 16 with the NUL); kept to a plain alphabet.
_IFNAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,14}")
_MAC = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")


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


def escape_option(value: str) -> str:
    """QEMU option syntax (key=value,key=value) escapes a comma by doubling it."""
    return value.replace(",", ",,")


def memory_mib(memory_bytes: int) -> int:
    if memory_bytes <= 0:
        raise ValueError("memory must be positive")
    return -(-memory_bytes // MIB)


def build_argv(
    launch: LaunchContext, *, accelerator: str, binary: str = "qemu-system-x86_64"
) -> list[str]:
    """The full command line that starts the VM with its vCPUs stopped (-S). The files are
    as QEMU will see them (launch.files)."""
    spec, paths = launch.spec, launch.files
    if accelerator not in ACCELERATORS:
        raise ValueError(f"accelerator must be one of {', '.join(ACCELERATORS)}")
    if spec.vcpu_count < 1:
        raise ValueError("vcpu_count must be at least 1")
    if spec.nic is not None:
        check_nic(spec.nic)
    argv = [
        binary,
        # debug-threads: threads named "CPU n/TCG" etc., the vCPUs metering bills
        "-name", f"{escape_option(spec.vm_id)},debug-threads=on",
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
        "-sandbox", SANDBOX,
        "-S",
        "-chardev",
        f"socket,id=qmp,path={escape_option(str(paths.control_socket))},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-chardev",
        f"file,id=con0,path={escape_option(str(paths.console_log))},append=on",
        "-serial", "chardev:con0",
        "-kernel", str(paths.kernel),
    ]  # fmt: skip
    if paths.initrd is not None:
        argv += ["-initrd", str(paths.initrd)]
    argv += ["-append", launch.kernel_cmdline]
    if paths.agent_socket is not None:
        argv += [
            "-chardev",
            f"socket,id=agent,path={escape_option(str(paths.agent_socket))},server=on,wait=off",
            "-device", "isa-serial,chardev=agent,iobase=0x2f8,irq=3",
        ]  # fmt: skip
    for drive in paths.drives:
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

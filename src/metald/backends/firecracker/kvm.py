"""Whether /dev/kvm answers as Firecracker needs it to, checked without a VMM.

Firecracker runs guests under KVM only (it has no emulator to fall back on), so a host whose
/dev/kvm is missing, not ours, or refuses to make a VM must stop metald's start-up with a
message rather than fail every VM later. This module asks the kernel directly: open the
device, KVM_GET_API_VERSION must be 12 (the only stable API there has ever been), and
KVM_CREATE_VM must succeed.

That is necessary, not sufficient: under broken nested virtualisation (the project's own
development machines) all three succeed and guests then die with emulation failures. The
QEMU backend catches that by booting a tiny firmware under KVM (backends/qemu/accel.py);
this backend cannot import it (adapters do not import one another), see the driver.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

KVM_DEVICE = Path("/dev/kvm")
KVM_API_VERSION = 12
# _IO(KVMIO, 0x00) and _IO(KVMIO, 0x01), KVMIO = 0xAE (linux/kvm.h)
KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01


def kvm_problem(device: Path = KVM_DEVICE) -> str:
    """What is wrong with KVM here, in one line; "" when it answers as it should. Blocking
    (a few system calls): call it in a thread from async code."""
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return f"{device} does not exist (no KVM on this host, or the kvm module is not loaded)"
    except PermissionError:
        return f"{device} is not readable and writable by this user"
    except OSError as e:
        return f"cannot open {device}: {e.strerror}"
    try:
        try:
            version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
        except OSError as e:
            return f"{device} is not a KVM device (KVM_GET_API_VERSION: {e.strerror})"
        if version != KVM_API_VERSION:
            return f"{device} speaks KVM API version {version}, not {KVM_API_VERSION}"
        try:
            vm_fd = fcntl.ioctl(fd, KVM_CREATE_VM, 0)
        except OSError as e:
            return f"KVM cannot create a VM here (KVM_CREATE_VM: {e.strerror})"
        os.close(vm_fd)
    finally:
        os.close(fd)
    return ""

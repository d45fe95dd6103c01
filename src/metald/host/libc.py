"""The Linux calls metald needs that Python 3.11's os module lacks, through ctypes (the
jailer helper's mount, pivot_root and capability steps, entering namespaces).

Each raises OSError with the errno and the call's name on failure.
"""

from __future__ import annotations

import ctypes
import os
import platform
import signal

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWNET = 0x40000000
CLONE_NEWPID = 0x20000000
CLONE_PARENT = 0x00008000
CLONE_INTO_CGROUP = 0x200000000  # clone3 only (Linux 5.7)

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SHARED = 1 << 20
MNT_DETACH = 2

PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_CAPBSET_DROP = 24
PR_CAPBSET_READ = 23
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
PR_SET_DUMPABLE = 4

_LINUX_CAPABILITY_VERSION_3 = 0x20080522

# System call numbers for what glibc has no wrapper for (pivot_root; capset for clarity).
_SYSCALLS = {
    "x86_64": {"pivot_root": 155, "capset": 126, "clone": 56, "clone3": 435},
    "aarch64": {"pivot_root": 41, "capset": 91, "clone": 220, "clone3": 435},
}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.prctl.argtypes = [
    ctypes.c_int,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
]
_libc.syscall.restype = ctypes.c_long


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def _b(value: str | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def setns(fd: int, nstype: int) -> None:
    _check(_libc.setns(fd, nstype), "setns")


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def mount(
    source: str | None, target: str, fstype: str | None, flags: int, data: str | None
) -> None:
    _check(_libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)), f"mount {target}")


def umount2(target: str, flags: int) -> None:
    _check(_libc.umount2(_b(target), flags), f"umount {target}")


def _nr(name: str) -> int | None:
    return _SYSCALLS.get(platform.machine(), {}).get(name)


def pivot_root_supported() -> bool:
    return _nr("pivot_root") is not None


def pivot_root(new_root: str, put_old: str) -> None:
    nr = _nr("pivot_root")
    if nr is None:
        raise OSError(38, "pivot_root: unknown system call number on this architecture")
    _check(
        _libc.syscall(ctypes.c_long(nr), _b(new_root), _b(put_old)),
        "pivot_root",
    )


def fork_as_sibling() -> int:
    """fork(2), but the child's parent is our parent (clone with CLONE_PARENT): the jailer
    helper's VMM is metald's own child, so metald reaps it and learns its exit status, while
    the helper itself exits. Returns 0 in the child, the child's pid in the parent.

    A raw clone system call with no new stack behaves like fork. Only for a single-threaded
    process that execs or exits soon after (no at-fork handlers run): the jailer helper.
    The call holds the GIL throughout (PyDLL), so the child resumes exactly as the parent.
    """
    nr = _nr("clone")
    if nr is None:
        raise OSError(38, "clone: unknown system call number on this architecture")
    syscall = ctypes.PyDLL(None, use_errno=True).syscall
    syscall.restype = ctypes.c_long
    zero = ctypes.c_ulong(0)
    # clone(flags, stack, parent_tid, child_tid | tls, tls | child_tid): all but flags unused.
    flags = ctypes.c_ulong(CLONE_PARENT | int(signal.SIGCHLD))
    return _check(syscall(ctypes.c_long(nr), flags, zero, zero, zero, zero), "clone")


def fork_as_sibling_into_cgroup(cgroup_fd: int) -> int:
    """fork_as_sibling, the child born in the cgroup v2 directory `cgroup_fd` (clone3 with
    CLONE_INTO_CGROUP). Moving a running process into a cgroup (writing cgroup.procs) waits
    for an RCU grace period, about 12 ms here; a process created in it does not. Raises
    OSError (ENOSYS before Linux 5.7, or when the cgroup refuses it): the caller falls back
    to a plain fork and a move."""
    nr = _nr("clone3")
    if nr is None:
        raise OSError(38, "clone3: unknown system call number on this architecture")
    syscall = ctypes.PyDLL(None, use_errno=True).syscall
    syscall.restype = ctypes.c_long
    # struct clone_args (version 2, 88 bytes): flags, pidfd, child_tid, parent_tid,
    # exit_signal, stack, stack_size, tls, set_tid, set_tid_size, cgroup.
    args = (ctypes.c_uint64 * 11)(
        CLONE_PARENT | CLONE_INTO_CGROUP, 0, 0, 0, int(signal.SIGCHLD), 0, 0, 0, 0, 0, cgroup_fd
    )
    return _check(
        syscall(ctypes.c_long(nr), ctypes.byref(args), ctypes.c_size_t(ctypes.sizeof(args))),
        "clone3",
    )


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return _check(_libc.prctl(option, arg2, arg3, arg4, arg5), f"prctl({option})")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def clear_capabilities() -> None:
    """Empty the effective, permitted and inheritable sets of this thread (process)."""
    nr = _nr("capset")
    if nr is None:
        raise OSError(38, "capset: unknown system call number on this architecture")
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(
        _libc.syscall(ctypes.c_long(nr), ctypes.byref(header), ctypes.byref(data)),
        "capset",
    )


def last_capability() -> int:
    with open("/proc/sys/kernel/cap_last_cap", encoding="ascii") as f:
        return int(f.read())

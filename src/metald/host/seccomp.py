"""A small seccomp filter that refuses new user namespaces (standard library only: the jailer
helper installs it right before it executes the VMM).

Why: inside a user namespace it creates, an unprivileged process holds every capability over
the namespaces it makes there, which opens the kernel's namespaced code paths (netfilter, mount
filesystems, ...) to a compromised VMM. No VMM needs that. The VMM's own filter (QEMU's
-sandbox, Firecracker's built-in one) stacks on top of this one; the kernel applies the
strictest answer.

The filter, as classic BPF over struct seccomp_data:
- another architecture's system calls (a 32-bit `int 0x80` on x86_64) kill the process: the
  numbers below mean nothing there;
- x32 system calls (bit 30 set on x86_64) fail with ENOSYS;
- unshare(2) and clone(2) with CLONE_NEWUSER in their flags fail with EPERM;
- clone3(2) fails with ENOSYS (its flags are in memory a filter cannot read): libc then
  falls back to clone, which the rule above checks;
- everything else is allowed.

It needs no_new_privs (or CAP_SYS_ADMIN) and is inherited across fork and execve; it cannot
be removed.
"""

from __future__ import annotations

import ctypes
import errno
import platform
import struct

PR_SET_SECCOMP = 22
PR_GET_SECCOMP = 21
SECCOMP_MODE_FILTER = 2
CLONE_NEWUSER = 0x10000000

SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_ALLOW = 0x7FFF0000

# struct seccomp_data: int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6]
_OFFSET_NR = 0
_OFFSET_ARCH = 4
_OFFSET_ARG0_LOW = 16  # little-endian: the low 32 bits of args[0] (CLONE_NEWUSER is there)

_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_JGE_K = 0x35  # BPF_JMP | BPF_JGE | BPF_K
_JSET_K = 0x45  # BPF_JMP | BPF_JSET | BPF_K
_RET_K = 0x06  # BPF_RET | BPF_K

_X32_SYSCALL_BIT = 0x40000000


class _Arch:
    def __init__(self, audit: int, clone: int, unshare: int, clone3: int, x32: bool) -> None:
        self.audit, self.clone, self.unshare, self.clone3, self.x32 = (
            audit,
            clone,
            unshare,
            clone3,
            x32,
        )


_ARCHES = {
    "x86_64": _Arch(0xC000003E, clone=56, unshare=272, clone3=435, x32=True),
    "aarch64": _Arch(0xC00000B7, clone=220, unshare=97, clone3=435, x32=False),
}


def supported() -> bool:
    return platform.machine() in _ARCHES


def _insn(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def deny_user_namespaces_program(machine: str | None = None) -> bytes:
    """The filter's instructions (struct sock_filter[]) for `machine` (default: this one)."""
    arch = _ARCHES.get(machine or platform.machine())
    if arch is None:
        raise OSError(errno.ENOSYS, f"seccomp: no filter for architecture {machine!r}")
    allow = _insn(_RET_K, SECCOMP_RET_ALLOW)
    eperm = _insn(_RET_K, SECCOMP_RET_ERRNO | errno.EPERM)
    enosys = _insn(_RET_K, SECCOMP_RET_ERRNO | errno.ENOSYS)
    kill = _insn(_RET_K, SECCOMP_RET_KILL_PROCESS)
    # Laid out so every jump goes forward to a fixed tail:
    #   0 ld arch; 1 jeq native ? next : kill
    #   2 ld nr;   3 jge x32 ? enosys : next   (a never-true check where there is no x32)
    #   4 jeq clone3 ? enosys; 5 jeq clone ? flags; 6 jeq unshare ? flags; 7 allow
    #   8 flags: ld arg0; 9 jset NEWUSER ? eperm : allow
    #   10 allow; 11 eperm; 12 enosys; 13 kill
    x32_bit = _X32_SYSCALL_BIT if arch.x32 else 0xFFFFFFFF
    code = [
        _insn(_LD_W_ABS, _OFFSET_ARCH),  # 0
        _insn(_JEQ_K, arch.audit, jt=0, jf=11),  # 1 -> 2 | 13
        _insn(_LD_W_ABS, _OFFSET_NR),  # 2
        _insn(_JGE_K, x32_bit, jt=8, jf=0),  # 3 -> 12 | 4
        _insn(_JEQ_K, arch.clone3, jt=7, jf=0),  # 4 -> 12 | 5
        _insn(_JEQ_K, arch.clone, jt=2, jf=0),  # 5 -> 8 | 6
        _insn(_JEQ_K, arch.unshare, jt=1, jf=0),  # 6 -> 8 | 7
        allow,  # 7
        _insn(_LD_W_ABS, _OFFSET_ARG0_LOW),  # 8
        _insn(_JSET_K, CLONE_NEWUSER, jt=1, jf=0),  # 9 -> 11 | 10
        allow,  # 10
        eperm,  # 11
        enosys,  # 12
        kill,  # 13
    ]
    return b"".join(code)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install_deny_user_namespaces() -> None:
    """Install the filter on the calling process (all its future children inherit it).
    no_new_privs must be set already (the jailer's privileges step sets it)."""
    program = deny_user_namespaces_program()
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong]
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_SECCOMP): {errno.errorcode.get(err, err)}")


def seccomp_mode(pid: int | str = "self") -> int | None:
    """The Seccomp: field of /proc/<pid>/status (0 none, 1 strict, 2 filter); None if absent."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Seccomp:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None

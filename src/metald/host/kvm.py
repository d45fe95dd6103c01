"""Whether KVM can really run a long-mode guest here, asked of KVM itself (no QEMU needed).

`/dev/kvm` existing, and even KVM_CREATE_VM succeeding, proves little: under broken nested
virtualisation a guest starts and then dies with "KVM internal error ... emulation failure"
(on cmpxchg16b, xrstor). The QEMU backend finds that out by booting a tiny firmware
(kvm_probe.S, embedded below) under QEMU; a Firecracker host need not have QEMU, so this
module runs the SAME 64 KiB image straight through the KVM API, stdlib only:

- guest RAM: 16 MiB of anonymous memory at guest physical 0 (the firmware's page tables live at
  0x1000..0x6fff, its stack and scratch at 0x8000, its xsave area at 0x9000 and its page churn
  touches 0x200000), with the image mapped where QEMU's -bios puts it: at 0xFFFF0000 (the top of
  4 GiB, which holds the reset vector 0xFFFFFFF0 and is where the firmware runs from) and at
  0xF0000 (the legacy alias), both writable and sharing one copy, as QEMU's microvm maps its
  -bios (as RAM). Writable matters: loading a GDT descriptor sets its "accessed" bit, a write
  to the GDT in the image; with a read-only (KVM_MEM_READONLY) mapping, KVM here spun on the
  switch to protected mode instead of running the guest;
- the TSS and identity-map pages Intel's VMX needs for real mode, where QEMU puts them;
- one vCPU, left in KVM's reset state (CS base 0xFFFF0000, IP 0xFFF0: what a CPU does at
  power-on and what -bios relies on), with the CPUID KVM supports (like QEMU's `-cpu host`:
  the firmware checks CPUID for cmpxchg16b and xsave);
- no in-kernel interrupt controller, so a HLT comes back to us as an exit.

Only the firmware's write of 0x2a to I/O port 0xf4 (what QEMU's isa-debug-exit turns into exit
code PROBE_SUCCESS_EXIT) counts as "KVM works"; an internal error, a shutdown (triple fault), a
failed entry, a HLT, any other exit, or the deadline is a failure with a one-line reason.

Why a child process: KVM_RUN blocks in the kernel for as long as the guest runs, and a guest
that KVM cannot emulate may never come back. A Python thread cannot be cancelled, and waking it
needs a signal handler that only the main thread may install; metald is multi-threaded, so
os.fork() is not safe either. So `probe_kvm_directly` runs `python -I -m metald.host.kvm
--probe` (the same way the jailer helper is started), hands it the image on stdin, reads one
line of JSON from its stdout, and kills it by its pid when the deadline passes. Its fds and
mappings, and the VM, go away with it. The deadline covers the child's start-up too. The
price is that start-up (here about 0.23 s of the probe's 0.3 s; building and running the VM
takes 0.06 s), paid once when a backend starts.

On these machines (nested KVM through kvm_pvm) the answer is "KVM internal error, suberror 1
(emulation failure) at rip 0xffff0100": the firmware's first cmpxchg16b, where QEMU's probe of
the same image stops too.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import mmap
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
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
# The firmware writes this to port 0xf4 when every test passed, and _PROBE_FAILED when the
# CPU (as KVM presents it) has no cmpxchg16b or it gave a wrong answer.
PROBE_EXIT_PORT = 0xF4
PROBE_SUCCESS_VALUE = 0x2A
_PROBE_FAILED = 0x15
# isa-debug-exit makes QEMU exit with (value << 1) | 1.
PROBE_SUCCESS_EXIT = (PROBE_SUCCESS_VALUE << 1) | 1
DEFAULT_PROBE_TIMEOUT = 3.0
KVM_DEVICE = Path("/dev/kvm")


def probe_image() -> bytes:
    """The 64 KiB firmware image (QEMU wants a -bios size that is a multiple of 64 KiB)."""
    image = bytearray(b"\xf4" * _IMAGE_SIZE)
    image[: len(_PROBE_CODE)] = _PROBE_CODE
    image[0xFFF0 : 0xFFF0 + len(_RESET_VECTOR)] = _RESET_VECTOR
    return bytes(image)


@dataclass(frozen=True)
class KvmProbeResult:
    works: bool
    detail: str  # one line: what ran, or why it did not


def kvm_device_problem(device: str | os.PathLike[str] = KVM_DEVICE) -> str:
    """Why `device` cannot be used (one line), or "" if it exists and we may open it."""
    if not os.path.exists(device):
        return f"{os.fspath(device)} does not exist"
    if not os.access(device, os.R_OK | os.W_OK):
        return f"{os.fspath(device)} is not readable and writable by this user"
    return ""


def probe_kvm_directly(
    image: bytes,
    *,
    timeout: float = DEFAULT_PROBE_TIMEOUT,
    device: str | os.PathLike[str] = KVM_DEVICE,
) -> KvmProbeResult:
    """Run the firmware `image` (probe_image()) under KVM; whether it reported success.

    Blocks for up to `timeout` seconds (the child's start-up included); from async code call it
    through asyncio.to_thread. The child is killed and reaped before this returns.
    """
    if len(image) != _IMAGE_SIZE:
        raise ValueError(f"the probe image must be {_IMAGE_SIZE} bytes, not {len(image)}")
    if timeout <= 0:
        raise ValueError("timeout must be positive")
    problem = kvm_device_problem(device)
    if problem:
        return KvmProbeResult(False, problem)
    argv = [sys.executable, "-I", "-m", "metald.host.kvm", "--probe", "--device", str(device)]
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        out, err = proc.communicate(image, timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()  # by its pid; Popen has not reaped it, so the pid is still ours
        proc.communicate()
        return KvmProbeResult(False, f"a test guest did not finish within {timeout:g} s under KVM")
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    return _parse_child(proc.returncode, out, err)


def _parse_child(returncode: int, out: bytes, err: bytes) -> KvmProbeResult:
    try:
        reply = json.loads(out)
        if returncode == 0 and isinstance(reply["works"], bool):
            return KvmProbeResult(reply["works"], str(reply["detail"]))
    except (ValueError, KeyError, TypeError):
        pass
    lines = [ln.strip() for ln in err.decode(errors="replace").splitlines() if ln.strip()]
    last = f": {lines[-1]}" if lines else ""
    return KvmProbeResult(False, f"the KVM probe process failed (exit code {returncode}){last}")


# --- the child: the KVM API through ioctl --------------------------------------------------

_KVMIO = 0xAE


def _io(nr: int) -> int:
    return (_KVMIO << 8) | nr


def _iow(nr: int, size: int) -> int:
    return (1 << 30) | (size << 16) | (_KVMIO << 8) | nr


def _iowr(nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (_KVMIO << 8) | nr


def _ior(nr: int, size: int) -> int:
    return (2 << 30) | (size << 16) | (_KVMIO << 8) | nr


class _MemoryRegion(ctypes.Structure):  # struct kvm_userspace_memory_region
    _fields_ = [
        ("slot", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("guest_phys_addr", ctypes.c_uint64),
        ("memory_size", ctypes.c_uint64),
        ("userspace_addr", ctypes.c_uint64),
    ]


class _CpuidEntry(ctypes.Structure):  # struct kvm_cpuid_entry2
    _fields_ = [
        ("function", ctypes.c_uint32),
        ("index", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("eax", ctypes.c_uint32),
        ("ebx", ctypes.c_uint32),
        ("ecx", ctypes.c_uint32),
        ("edx", ctypes.c_uint32),
        ("padding", ctypes.c_uint32 * 3),
    ]


_CPUID_HEADER = 8  # struct kvm_cpuid2: u32 nent, u32 padding, then the entries
_REGS_SIZE = 18 * 8  # struct kvm_regs: rax..r15, rip, rflags
_RIP_INDEX = 16

KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, _CPUID_HEADER)
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, ctypes.sizeof(_MemoryRegion))
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, 8)
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, _REGS_SIZE)
KVM_SET_CPUID2 = _iow(0x90, _CPUID_HEADER)

KVM_API_VERSION = 12
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37

KVM_EXIT_IO = 2
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_IO_OUT = 1
_INTERNAL_ERRORS = {
    1: "emulation failure",
    2: "an exception while delivering an exception",
    3: "an event it could not deliver",
    4: "an exit reason KVM does not know",
}
_EXIT_NAMES = {0: "unknown", 1: "exception", 3: "hypercall", 4: "debug", 7: "irq window open"}

_RAM_SIZE = 16 << 20
_BIOS_HIGH = 0xFFFF0000  # the top 64 KiB below 4 GiB; the reset vector is 0xFFFFFFF0
_BIOS_LOW = 0xF0000  # the legacy alias below 1 MiB
# Where QEMU puts the pages Intel's VMX needs to run real mode without unrestricted guest.
_IDENTITY_MAP_ADDR = 0xFEFFC000
_TSS_ADDR = 0xFEFFD000
_MAX_CPUID_ENTRIES = 4096

# struct kvm_run: exit_reason at 8, the exit's union at 32.
_RUN_EXIT_REASON = struct.Struct("<I")
_RUN_IO = struct.Struct("<BBHIQ")  # direction, size, port, count, data_offset
_RUN_U64 = struct.Struct("<Q")
_RUN_MMIO = struct.Struct("<Q8sIB")  # phys_addr, data, len, is_write
_UNION = 32

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int


class _KvmError(Exception):
    """A setup step failed; its message is the probe's detail."""


def _ioctl(fd: int, request: int, arg: int | ctypes.Array[ctypes.c_char] | None, name: str) -> int:
    """ioctl with an integer argument or a ctypes buffer (fcntl.ioctl takes only a C int,
    too small for KVM_SET_TSS_ADDR's address); _KvmError naming the call on failure."""
    pointer = ctypes.addressof(arg) if isinstance(arg, ctypes.Array) else arg
    while True:
        ret: int = _libc.ioctl(fd, request, pointer)
        if ret >= 0:
            return ret
        err = ctypes.get_errno()
        if err != 4:  # EINTR: ask again
            raise _KvmError(f"{name} failed: {os.strerror(err)}")


def _address(buffer: mmap.mmap) -> int:
    view = ctypes.c_char.from_buffer(buffer)
    try:
        return ctypes.addressof(view)
    finally:
        del view  # drop the export so the mapping can be closed


def _map_memory(vm: int, slot: int, guest: int, host: int, size: int, name: str) -> None:
    region = _MemoryRegion(slot, 0, guest, size, host)
    buf = (ctypes.c_char * ctypes.sizeof(region)).from_buffer(region)
    _ioctl(vm, KVM_SET_USER_MEMORY_REGION, buf, f"KVM_SET_USER_MEMORY_REGION ({name})")


def _supported_cpuid(kvm: int) -> ctypes.Array[ctypes.c_char]:
    """KVM's supported CPUID as a struct kvm_cpuid2 buffer, ready for KVM_SET_CPUID2."""
    entries = 64
    while True:
        buf = ctypes.create_string_buffer(_CPUID_HEADER + entries * ctypes.sizeof(_CpuidEntry))
        struct.pack_into("<I", buf, 0, entries)
        ret = _libc.ioctl(kvm, KVM_GET_SUPPORTED_CPUID, ctypes.addressof(buf))
        if ret >= 0:
            return buf
        err = ctypes.get_errno()
        if err != 7 or entries >= _MAX_CPUID_ENTRIES:  # E2BIG: a bigger buffer
            raise _KvmError(f"KVM_GET_SUPPORTED_CPUID failed: {os.strerror(err)}")
        entries *= 2


@contextlib.contextmanager
def _opened(path: str, name: str) -> Iterator[int]:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise _KvmError(f"opening {name} failed: {e.strerror}") from e
    try:
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def _fd(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


def run_probe(image: bytes, device: str) -> tuple[bool, str]:
    """Build the VM and run `image` until it reports or stops (in this process: the child)."""
    try:
        return _run(image, device)
    except _KvmError as e:
        return False, str(e)


def _run(image: bytes, device: str) -> tuple[bool, str]:
    with contextlib.ExitStack() as stack:
        kvm = stack.enter_context(_opened(device, device))
        version = _ioctl(kvm, KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")
        if version != KVM_API_VERSION:
            return False, f"{device} speaks KVM API version {version}, not {KVM_API_VERSION}"
        vm = stack.enter_context(_fd(_ioctl(kvm, KVM_CREATE_VM, 0, "KVM_CREATE_VM")))

        ram = stack.enter_context(mmap.mmap(-1, _RAM_SIZE))
        rom = stack.enter_context(mmap.mmap(-1, _IMAGE_SIZE))
        rom[:] = image
        ram_at, rom_at = _address(ram), _address(rom)
        # Slots may not overlap: RAM below the legacy BIOS alias, the alias, RAM above 1 MiB.
        _map_memory(vm, 0, 0, ram_at, _BIOS_LOW, "low RAM")
        _map_memory(vm, 1, _BIOS_LOW, rom_at, _IMAGE_SIZE, "BIOS alias")
        high = _BIOS_LOW + _IMAGE_SIZE
        _map_memory(vm, 2, high, ram_at + high, _RAM_SIZE - high, "RAM")
        _map_memory(vm, 3, _BIOS_HIGH, rom_at, _IMAGE_SIZE, "BIOS")

        # Before the vCPU exists (KVM's rule), and only where KVM has them (Intel).
        if _has(kvm, KVM_CAP_SET_IDENTITY_MAP_ADDR):
            where = _u64(_IDENTITY_MAP_ADDR)
            _ioctl(vm, KVM_SET_IDENTITY_MAP_ADDR, where, "KVM_SET_IDENTITY_MAP_ADDR")
        if _has(kvm, KVM_CAP_SET_TSS_ADDR):
            _ioctl(vm, KVM_SET_TSS_ADDR, _TSS_ADDR, "KVM_SET_TSS_ADDR")

        vcpu = stack.enter_context(_fd(_ioctl(vm, KVM_CREATE_VCPU, 0, "KVM_CREATE_VCPU")))
        _ioctl(vcpu, KVM_SET_CPUID2, _supported_cpuid(kvm), "KVM_SET_CPUID2")
        run_size = _ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")
        try:
            run = stack.enter_context(mmap.mmap(vcpu, run_size))
        except OSError as e:
            raise _KvmError(f"mapping the vCPU's kvm_run failed: {e.strerror}") from e
        return _run_vcpu(vcpu, run)
    raise AssertionError("unreachable")  # pragma: no cover (mypy: ExitStack may swallow)


def _has(kvm: int, capability: int) -> bool:
    return _ioctl(kvm, KVM_CHECK_EXTENSION, capability, "KVM_CHECK_EXTENSION") > 0


def _u64(value: int) -> ctypes.Array[ctypes.c_char]:
    buf = ctypes.create_string_buffer(8)
    struct.pack_into("<Q", buf, 0, value)
    return buf


def _rip(vcpu: int) -> str:
    regs = ctypes.create_string_buffer(_REGS_SIZE)
    try:
        _ioctl(vcpu, KVM_GET_REGS, regs, "KVM_GET_REGS")
    except _KvmError:
        return ""
    (rip,) = struct.unpack_from("<Q", regs, _RIP_INDEX * 8)
    return f" at rip {rip:#x}"


def _run_vcpu(vcpu: int, run: mmap.mmap) -> tuple[bool, str]:
    while True:
        _ioctl(vcpu, KVM_RUN, 0, "KVM_RUN")
        (reason,) = _RUN_EXIT_REASON.unpack_from(run, 8)
        if reason == KVM_EXIT_INTR:
            continue
        if reason == KVM_EXIT_IO:
            direction, size, port, _count, offset = _RUN_IO.unpack_from(run, _UNION)
            if direction == KVM_EXIT_IO_OUT and port == PROBE_EXIT_PORT and size == 1:
                value = run[offset]
                if value == PROBE_SUCCESS_VALUE:
                    return True, "a test guest ran in long mode under KVM"
                if value == _PROBE_FAILED:
                    return False, "under KVM the test guest's cmpxchg16b is missing or wrong"
                return False, f"the test guest reported {value:#x} under KVM"
            kind = "out" if direction == KVM_EXIT_IO_OUT else "in"
            return False, f"the test guest did unexpected I/O ({kind} port {port:#x})"
        if reason == KVM_EXIT_INTERNAL_ERROR:
            (suberror,) = _RUN_EXIT_REASON.unpack_from(run, _UNION)
            what = _INTERNAL_ERRORS.get(suberror, "unknown")
            return False, f"KVM internal error, suberror {suberror} ({what}){_rip(vcpu)}"
        if reason == KVM_EXIT_SHUTDOWN:
            return False, f"the test guest shut down (a triple fault) under KVM{_rip(vcpu)}"
        if reason == KVM_EXIT_FAIL_ENTRY:
            (why,) = _RUN_U64.unpack_from(run, _UNION)
            return False, f"KVM could not enter the test guest (hardware reason {why:#x})"
        if reason == KVM_EXIT_HLT:
            return False, f"the test guest halted without reporting under KVM{_rip(vcpu)}"
        if reason == KVM_EXIT_MMIO:
            addr, _, _, is_write = _RUN_MMIO.unpack_from(run, _UNION)
            kind = "wrote" if is_write else "read"
            return False, f"the test guest {kind} unbacked memory at {addr:#x}{_rip(vcpu)}"
        name = _EXIT_NAMES.get(reason, "unexpected")
        return False, f"the test guest stopped under KVM: exit reason {reason} ({name}){_rip(vcpu)}"


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m metald.host.kvm")
    parser.add_argument(
        "--probe",
        action="store_true",
        required=True,
        help="run the 64 KiB image on stdin under KVM; print JSON",
    )
    parser.add_argument("--device", default=str(KVM_DEVICE))
    args = parser.parse_args(argv)
    image = sys.stdin.buffer.read()
    if len(image) != _IMAGE_SIZE:
        works, detail = False, f"the probe image must be {_IMAGE_SIZE} bytes, not {len(image)}"
    else:
        works, detail = run_probe(image, args.device)
    sys.stdout.write(json.dumps({"works": works, "detail": detail}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(_main())

"""The guest under QEMU: the command line from Firecracker's configuration, the process, QMP.

WHY these choices: microvm with virtio-mmio is the closest QEMU machine to Firecracker's;
guests here run under TCG, where Debian's kernel hangs calibrating its TSC unless told the
rate (tsc_early_khz, read from /proc/cpuinfo when it is readable). QEMU dies with the
stand-in (PR_SET_PDEATHSIG) but stays in its session and process group, as a VMM thread
would. `-no-reboot` makes a guest reset end QEMU, and so the stand-in, as Firecracker exits.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

_CPU_MHZ = re.compile(r"^cpu MHz\s*:\s*([0-9.]+)\s*$", re.M)
_PR_SET_PDEATHSIG = 1


def tcg_timer_args(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """`tsc_early_khz=<host TSC kHz> tsc=reliable`, or "" when the rate is unknown (a cpufreq
    host, where "cpu MHz" is the current clock, or no readable /proc/cpuinfo)."""
    if Path("/sys/devices/system/cpu/cpu0/cpufreq").exists():
        return ""
    try:
        m = _CPU_MHZ.search(cpuinfo.read_text())
    except OSError:
        return ""
    khz = round(float(m.group(1)) * 1000) if m else 0
    return f"tsc_early_khz={khz} tsc=reliable" if khz > 0 else ""


def qemu_binary() -> str:
    found = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"
    if not os.path.exists(found):
        raise FileNotFoundError("qemu-system-x86_64 not found on PATH or in /usr/bin")
    return found


def _opt(value: str) -> str:
    return value.replace(",", ",,")


def _throttling(limiter: Mapping[str, Any] | None) -> list[str]:
    """A drive's Firecracker rate limiter as QEMU throttling (average rates only)."""
    out = []
    for bucket, key in (("bandwidth", "bps-total"), ("ops", "iops-total")):
        tb = (limiter or {}).get(bucket)
        if tb and tb["size"] > 0 and tb["refill_time"] > 0:
            out.append(f"throttling.{key}={max(1, tb['size'] * 1000 // tb['refill_time'])}")
    return out


def build_argv(
    *,
    binary: str,
    machine: Mapping[str, Any],
    boot: Mapping[str, Any],
    cmdline: str,
    drives: Sequence[Mapping[str, Any]],
    nets: Sequence[Mapping[str, Any]],
    serial_path: str | None,
    qmp_path: Path,
    entropy: bool,
) -> list[str]:
    argv = [
        binary,
        "-M", "microvm,x-option-roms=off,rtc=off", "-device", "i8042",
        "-accel", "tcg", "-cpu", "max",
        "-m", str(machine["mem_size_mib"]), "-smp", str(machine["vcpu_count"]),
        "-nodefaults", "-no-user-config", "-nographic", "-display", "none", "-no-reboot", "-S",
        "-chardev", f"socket,id=qmp,path={_opt(str(qmp_path))},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
    ]  # fmt: skip
    if serial_path is None:
        argv += ["-chardev", "stdio,id=serial0,signal=off"]
    else:
        argv += ["-chardev", f"file,id=serial0,path={_opt(serial_path)},append=on"]
    argv += ["-serial", "chardev:serial0", "-kernel", boot["kernel_image_path"]]
    if boot.get("initrd_path"):
        argv += ["-initrd", boot["initrd_path"]]
    argv += ["-append", cmdline]
    for i, d in enumerate(drives):
        cache = "writeback" if d.get("cache_type") == "Writeback" else "unsafe"
        options = [f"id=drive{i}", f"file={_opt(d['path_on_host'])}", "format=raw", "if=none",
                   f"readonly={'on' if d.get('is_read_only') else 'off'}", f"cache={cache}",
                   *_throttling(d.get("rate_limiter"))]  # fmt: skip
        argv += ["-drive", ",".join(options), "-device", f"virtio-blk-device,drive=drive{i}"]
    for i, n in enumerate(nets):
        argv += ["-netdev", f"tap,id=net{i},ifname={n['host_dev_name']},script=no,downscript=no"]
        device = f"virtio-net-device,netdev=net{i}"
        if n.get("guest_mac"):
            device += f",mac={n['guest_mac'].lower()}"
        if n.get("mtu"):
            device += f",host_mtu={n['mtu']}"
        argv += ["-device", device]
    if entropy:
        argv += ["-object", "rng-random,id=rng0,filename=/dev/urandom",
                 "-device", "virtio-rng-device,rng=rng0"]  # fmt: skip
    return argv


def _die_with_parent(parent: int) -> None:
    """preexec_fn: SIGKILL this child when the stand-in's (forking) thread dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def launch(argv: list[str], *, serial_stdio: bool) -> subprocess.Popen[bytes]:
    """Start QEMU (call from the thread that lives as long as the stand-in: PDEATHSIG fires
    when the forking thread ends)."""
    parent = os.getpid()
    return subprocess.Popen(
        argv,
        stdin=None if serial_stdio else subprocess.DEVNULL,
        preexec_fn=lambda: _die_with_parent(parent),
    )


class QmpError(Exception):
    pass


class Qmp:
    """A minimal synchronous QMP client (events are skipped; one caller at a time)."""

    def __init__(self, path: Path, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise QmpError(f"QEMU exited with status {proc.returncode} before QMP answered")
            try:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self._sock.settimeout(timeout)
                self._sock.connect(str(path))
                break
            except OSError:
                self._sock.close()
                if time.monotonic() > deadline:
                    raise QmpError(f"QMP socket {path} did not answer in {timeout:.0f} s") from None
                time.sleep(0.05)
        self._file = self._sock.makefile("rb")
        self._read()  # the greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self._file.readline()
        if not line:
            raise QmpError("QMP connection closed (QEMU exited)")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = dict(arguments)
        try:
            self._sock.sendall(json.dumps(msg).encode() + b"\n")
            while True:
                reply = self._read()
                if "return" in reply:
                    return reply["return"]
                if "error" in reply:
                    raise QmpError(f"{command}: {reply['error'].get('desc', reply['error'])}")
        except OSError as e:
            raise QmpError(f"{command}: {e}") from e

    def close(self) -> None:
        self._file.close()
        self._sock.close()

"""The floor of the life benchmarks: the very QEMU command line metald ran for a VM, started
by the benchmark itself with nothing around it (no jail, no daemon, no RPC).

The argv comes from the VM's saved jail spec (`<data>/vms/<id>/jail.json`: metald's own
record of what it executed), with the jail's paths put back to the host's: each placed file
at its source, the jail's /run at a directory of the benchmark's own. The binary, its
libraries and firmware are bind-mounted at the same paths in a jail, so they need no change.
A VM with a NIC names its TAP: the benchmark makes a TAP of that name in a network namespace
of its own and starts QEMU there (nsenter: exec, setns, exec), TAP made before the clock
starts (the floor does not include networking set-up; metald's share does).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class BareCommand:
    """A VM's QEMU argv with host paths; `run_dir` is where its sockets and console go."""

    argv: list[str]
    tap: str | None

    @classmethod
    def of_vm(cls, vm_dir: Path) -> BareCommand:
        spec = json.loads((vm_dir / "jail.json").read_text())
        files = {f["target"]: f["source"] for f in spec["files"]}
        tap = spec["tap"]["name"] if spec.get("tap") else None
        return cls(argv=[files.get(a, a) for a in spec["argv"]], tap=tap)

    def for_run(self, run_dir: Path, *, start_vcpus: bool) -> list[str]:
        """The argv with the jail's /run at `run_dir`; without -S the guest runs at once."""
        argv = [a.replace("path=/run/", f"path={run_dir}/") for a in self.argv]
        if start_vcpus:
            argv.remove("-S")
        return argv


@dataclass
class BareVmm:
    """One bare QEMU of the benchmark's: started, then ended by its pid."""

    command: BareCommand
    netns: str | None = None
    run_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="mbare")))
    proc: subprocess.Popen[bytes] | None = None

    @property
    def qmp_socket(self) -> Path:
        return self.run_dir / "qmp.sock"

    @property
    def console(self) -> Path:
        return self.run_dir / "console.log"

    def start(self, *, start_vcpus: bool) -> None:
        argv = self.command.for_run(self.run_dir, start_vcpus=start_vcpus)
        if self.command.tap is not None:
            assert self.netns is not None, "a VM with a NIC needs the bare run's netns"
            argv = ["nsenter", f"--net=/run/netns/{self.netns}", "--", *argv]
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(self.run_dir / "stderr", "wb"),  # noqa: SIM115 - the child keeps it
            start_new_session=True,
        )  # fmt: skip

    def wait_for_control(self, t0: float, timeout: float = 60.0) -> tuple[float, float]:
        """Seconds from `t0` to QMP's greeting, and to the answer of its first command
        (qmp_capabilities, then query-status: QEMU greets before its machine is set up and
        answers once it is, which is what CreateVm waits for to check the VM is ready)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                try:
                    s.connect(str(self.qmp_socket))
                except (FileNotFoundError, ConnectionRefusedError):
                    time.sleep(0.001)
                    continue
                s.settimeout(max(0.1, deadline - time.monotonic()))
                f = s.makefile("rwb")
                if b'"QMP"' not in f.readline():
                    raise RuntimeError("the bare QEMU's QMP did not greet")
                greeted = time.perf_counter() - t0
                for command in (b"qmp_capabilities", b"query-status"):
                    f.write(b'{"execute": "%s"}\n' % command)
                    f.flush()
                    if b'"return"' not in f.readline():
                        raise RuntimeError(f"the bare QEMU refused {command.decode()}")
                return greeted, time.perf_counter() - t0
        raise TimeoutError(f"no QMP greeting from the bare QEMU within {timeout} s")

    def console_has(self, needle: bytes) -> bool:
        self._check_alive()
        try:
            return needle in self.console.read_bytes()
        except FileNotFoundError:
            return False

    def _check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            err = (self.run_dir / "stderr").read_text(errors="replace")[-1000:]
            raise RuntimeError(f"the bare QEMU exited ({self.proc.returncode}): {err}")

    def rss(self) -> int:
        assert self.proc is not None
        # nsenter (no --pid) executes QEMU in its place: the same pid.
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        shutil.rmtree(self.run_dir, ignore_errors=True)


class BareNetns:
    """A network namespace of the benchmark's own, with TAPs for bare QEMUs."""

    def __init__(self, name: str) -> None:
        self.name = name
        subprocess.run(["ip", "netns", "add", name], check=True)

    def make_tap(self, tap: str) -> None:
        subprocess.run(
            ["ip", "-n", self.name, "link", "del", tap], check=False, capture_output=True
        )
        subprocess.run(
            ["ip", "-n", self.name, "tuntap", "add", "dev", tap, "mode", "tap"], check=True
        )
        subprocess.run(["ip", "-n", self.name, "link", "set", tap, "up"], check=True)

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], check=False)

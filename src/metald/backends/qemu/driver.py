"""QEMU microvm as a driver of the shared VMM runtime (backends/vmm/).

What is QEMU's: finding the binary (Debian package qemu-system-x86) and its version; the
accelerator (`auto` probes KVM by booting a tiny firmware, since /dev/kvm alone proves
nothing on hosts with broken nested virtualisation; TCG guests are told the host's TSC rate);
the host paths a jailed QEMU needs; the command line (command.py); QMP (qmp.py); and reading
QEMU's SHUTDOWN reasons. A guest reset reboots in place (`system_reset`), so one process
serves a VM from CreateVm to its shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil

from metald.backends.qemu.accel import probe_kvm
from metald.backends.qemu.command import ACCELERATORS, build_argv
from metald.backends.qemu.host_paths import qemu_host_paths
from metald.backends.qemu.qmp import QmpControl
from metald.backends.vmm.driver import ExitReport, LaunchContext, VmmHost
from metald.core.errors import BackendError
from metald.host.cpu import host_tsc_khz
from metald.host.process import ExitStatus

log = logging.getLogger(__name__)

DEBIAN_PACKAGE = "qemu-system-x86"
ACCEL_ENV = "UNKEY_METALD_QEMU_ACCEL"

_SHUTDOWN_REASONS = {
    "guest-shutdown": "guest powered off",
    "guest-reset": "guest reset",
    "guest-panic": "guest panicked",
    "host-signal": "vmm stopped by a signal from the host",
    "host-qmp-quit": "vmm told to quit over QMP",
    "host-ui": "vmm closed from its user interface",
}


class QemuDriver:
    """VmmDriver for `qemu-system-x86_64 -M microvm`."""

    name = "qemu"
    control_socket_name = "qmp.sock"
    info_socket_key = "qmp_socket"
    reboot_needs_new_process = False
    guest_reboot_arg = "t"
    guest_on_shutdown = "poweroff"
    supports_guest_agent = True
    # -name debug-threads=on names them; MTTCG and KVM: one per vCPU; round-robin TCG: one
    vcpu_thread = r"^(CPU \d+|ALL CPUs)/(KVM|TCG)$"

    def __init__(
        self,
        binary: str = "qemu-system-x86_64",
        accelerator: str = "auto",
        *,
        kvm_probe_timeout: float = 3.0,
        qmp_timeout: float = 10.0,
    ) -> None:
        if accelerator not in ("auto", *ACCELERATORS):
            raise ValueError("accelerator must be auto, kvm or tcg")
        self.binary = binary
        self.accelerator_setting = accelerator
        self.kvm_probe_timeout = kvm_probe_timeout
        self.qmp_timeout = qmp_timeout

    async def probe(self) -> VmmHost:
        path = await asyncio.to_thread(_find_binary, self.binary)
        if path is None:
            raise BackendError(
                f"QEMU binary {self.binary!r} not found: install the Debian package "
                f"{DEBIAN_PACKAGE} (apt-get install {DEBIAN_PACKAGE})"
            )
        version = await _read_version(path)
        try:
            jail_paths = await asyncio.to_thread(qemu_host_paths, path)
        except OSError as e:
            raise BackendError(f"cannot find what {path} needs from the host: {e}") from e
        if self.accelerator_setting == "tcg":
            accelerator, reason = "tcg", "chosen in the configuration"
        else:
            result = await probe_kvm(path, timeout=self.kvm_probe_timeout)
            if result.works:
                accelerator, reason = "kvm", result.detail
            elif self.accelerator_setting == "kvm":
                raise BackendError(
                    f"KVM was asked for but does not work here: {result.detail}; "
                    f"set {ACCEL_ENV}=tcg (or auto) to run guests under TCG"
                )
            else:
                accelerator, reason = "tcg", f"KVM unusable: {result.detail}"
        tsc_khz = None
        if accelerator == "tcg":
            tsc_khz = host_tsc_khz()
            if tsc_khz is None:
                log.warning("host TSC frequency unknown: TCG guests may boot slowly when busy")
        return VmmHost(
            binary=path,
            version=version,
            accelerator=accelerator,
            accelerator_reason=reason,
            jail_paths=jail_paths,
            needs_kvm=accelerator == "kvm",
            tsc_khz=tsc_khz,
        )

    def argv(self, host: VmmHost, launch: LaunchContext) -> list[str]:
        return build_argv(launch, accelerator=host.accelerator, binary=host.binary)

    async def connect(
        self,
        vm_id: str,
        socket_path: str,
        *,
        host_run_dir: object = None,
        uid: int = 0,
        launch: LaunchContext | None = None,
        timeout: float = 10.0,
    ) -> QmpControl:
        del host_run_dir, uid, launch  # QMP needs nothing but the socket
        return await QmpControl.connect(vm_id, socket_path, min(timeout, self.qmp_timeout))

    def describe_exit(
        self, event: str | None, status: ExitStatus | None, stderr_line: str
    ) -> ExitReport:
        if event is not None:
            reason = _SHUTDOWN_REASONS.get(event, f"vmm shut down ({event})")
            # A guest reset ends QEMU only while a stop is asked for (QmpControl): the answer.
            return ExitReport(reason, by_guest=event in ("guest-shutdown", "guest-reset"))
        if status is None:
            return ExitReport("vmm exited unexpectedly")
        if status.signal is not None:
            return ExitReport(f"vmm exited unexpectedly (signal {status.signal})")
        suffix = f": {stderr_line}" if stderr_line and status.exit_code else ""
        return ExitReport(f"vmm exited unexpectedly (exit status {status.exit_code}){suffix}")


def _find_binary(name: str) -> str | None:
    """The binary's absolute path (a jailed QEMU is executed by it), None if not found."""
    path = shutil.which(name)
    return None if path is None else os.path.abspath(path)


async def _read_version(binary: str) -> str:
    try:
        proc = await asyncio.create_subprocess_exec(
            binary,
            "--version",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 10)
    except (OSError, TimeoutError) as e:
        raise BackendError(f"cannot run {binary!r} --version: {e}") from e
    match = re.search(r"version (\S+)", out.decode(errors="replace"))
    return match.group(1) if match else ""

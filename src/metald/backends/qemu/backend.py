"""The QEMU backend: one `qemu-system-x86_64 -M microvm` process per VM, driven over QMP.

Each VM owns a directory ``<vm_root>/<vm_id>/``:

    spec.json     the LaunchSpec (a VM booted again after a shutdown is relaunched from it)
    process.json  {pid, start_time, accelerator, booted_at} while a QEMU process runs
    qmp.sock      QEMU's QMP socket
    console.log   the guest's serial console (appended to across boots)
    qemu.stderr   QEMU's own messages (a start failure is reported from its first line)
    disk<N>.img   sparse (reflinked where possible) copies of the writable disks

The QEMU process runs in its own session, so it outlives metald; a restarted metald adopts it
again (pid + start time, and the QMP socket must answer). Processes are watched through a
pidfd in the event loop; an exit metald did not ask for is reported through the exit callback.

Lifecycle notes:
- A graceful shutdown sends Ctrl-Alt-Del (QMP send-key); the guest's init runs its shutdown
  path and powers off, and QEMU exits by itself. A paused VM is resumed first: a guest whose
  vCPUs are stopped cannot run its shutdown path.
- After a shutdown the QEMU process is gone but the directory stays (spec, disks, console);
  `boot` then starts a new QEMU from spec.json and returns its identity.
- `destroy` (DeleteVm) and `remove_orphans` are the only things that remove a directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Coroutine, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from metald.assets.kernel_args import host_tsc_khz
from metald.backends.process import (
    ExitStatus,
    ProcessWatch,
    is_alive,
    kill_identity,
    process_age_seconds,
    read_cmdline,
    read_rss_bytes,
    read_stat,
    spawn,
)
from metald.backends.qemu.accel import probe_kvm
from metald.backends.qemu.command import (
    ACCELERATORS,
    MAX_KERNEL_CMDLINE,
    MAX_UNIX_SOCKET_PATH,
    MAX_VM_ID,
    VmLayout,
    build_argv,
    check_vm_id,
    kernel_cmdline_and_dropped,
    max_vm_id_length,
    plan_drives,
    spec_from_json,
    spec_to_json,
)
from metald.core.errors import BackendError, InvalidArgument
from metald.core.models import LaunchSpec, ProcessIdentity, VmUsage
from metald.core.ports import ExitCallback
from metald.core.states import VmState

log = logging.getLogger(__name__)

DEBIAN_PACKAGE = "qemu-system-x86"
ACCEL_ENV = "UNKEY_METALD_QEMU_ACCEL"
# start() refuses a vm_root too long for ids of this length (generated ids are 19).
_ID_BUDGET = 24

# QMP runstates -> our states. Anything else (internal-error, guest-panicked, shutdown...)
# is a VMM that cannot carry on and is not adopted.
_RUNSTATES: dict[str, VmState] = {
    "prelaunch": VmState.CREATED,
    "running": VmState.RUNNING,
    "paused": VmState.PAUSED,
    "suspended": VmState.PAUSED,
    "io-error": VmState.PAUSED,
    "watchdog": VmState.PAUSED,
    "debug": VmState.PAUSED,
}

_SHUTDOWN_REASONS = {
    "guest-shutdown": "guest powered off",
    "guest-reset": "guest reset",
    "guest-panic": "guest panicked",
    "host-signal": "vmm stopped by a signal from the host",
    "host-qmp-quit": "vmm told to quit over QMP",
    "host-ui": "vmm closed from its user interface",
}

CAD_REPEAT_SECONDS = 2.0
_CTRL_ALT_DEL = {
    "keys": [
        {"type": "qcode", "data": "ctrl"},
        {"type": "qcode", "data": "alt"},
        {"type": "qcode", "data": "delete"},
    ]
}


@dataclass
class _Vm:
    """One QEMU process of a VM (a VM booted again after a shutdown gets a new one)."""

    vm_id: str
    layout: VmLayout
    identity: ProcessIdentity
    accelerator: str
    watch: ProcessWatch | None = None
    qmp: QMPClient | None = None
    qemu_version: str = ""
    booted_at: float | None = None
    starting: bool = True  # exits while starting are reported by create/boot, not the callback
    expecting_exit: bool = False
    exit_reason: str | None = None
    exit_task: asyncio.Task[None] | None = None
    last_cpu_sample: tuple[int, float] | None = None

    @property
    def alive(self) -> bool:
        return self.watch is not None and not self.watch.exited


class QemuBackend:
    """The Backend port (metald.core.ports.Backend) for QEMU microvm guests."""

    name = "qemu"

    def __init__(
        self,
        vm_root: Path,
        qemu_binary: str = "qemu-system-x86_64",
        accelerator: str = "auto",
        *,
        start_timeout: float = 30.0,
        qmp_timeout: float = 10.0,
        kvm_probe_timeout: float = 3.0,
    ) -> None:
        if accelerator not in ("auto", *ACCELERATORS):
            raise ValueError("accelerator must be auto, kvm or tcg")
        self.vm_root = Path(vm_root)
        self.qemu_binary = qemu_binary
        self.accelerator_setting = accelerator
        self.start_timeout = start_timeout
        self.qmp_timeout = qmp_timeout
        self.kvm_probe_timeout = kvm_probe_timeout
        self._accelerator: str | None = None
        self.accelerator_reason = ""
        self._binary_path: str | None = None
        self._qemu_version = ""
        self._tsc_khz: int | None = None
        self._vms: dict[str, _Vm] = {}
        self._exit_callback: ExitCallback | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # ---------------------------------------------------------------- set-up

    async def start(self) -> None:
        """Check the binary and the accelerator (probing KVM for `auto`), make vm_root."""
        path = shutil.which(self.qemu_binary)
        if path is None:
            raise BackendError(
                f"QEMU binary {self.qemu_binary!r} not found: install the Debian package "
                f"{DEBIAN_PACKAGE} (apt-get install {DEBIAN_PACKAGE})"
            )
        self._binary_path = path
        self._qemu_version = await self._read_version(path)
        longest = max_vm_id_length(self.vm_root)
        if longest < _ID_BUDGET:
            raise BackendError(
                f"the VM directory {self.vm_root} is too long for QMP socket paths "
                f"(AF_UNIX allows {MAX_UNIX_SOCKET_PATH} bytes): use a shorter data directory"
            )
        if longest < MAX_VM_ID:
            log.warning(
                "VM ids longer than %d characters cannot be used under %s (Unix socket path "
                "limit): a shorter data directory lifts this",
                longest,
                self.vm_root,
            )
        await asyncio.to_thread(self.vm_root.mkdir, parents=True, exist_ok=True)
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
        if accelerator == "tcg":
            self._tsc_khz = host_tsc_khz()
            if self._tsc_khz is None:
                log.warning("host TSC frequency unknown: TCG guests may boot slowly when busy")
        self._accelerator, self.accelerator_reason = accelerator, reason
        log.info("qemu accelerator: %s (%s)", accelerator, reason)

    async def _read_version(self, binary: str) -> str:
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

    def set_exit_callback(self, callback: ExitCallback) -> None:
        self._exit_callback = callback

    def accelerator(self) -> str:
        if self._accelerator is None:
            raise BackendError("the QEMU backend has not been started")
        return self._accelerator

    def vm_dir(self, vm_id: str) -> Path:
        check_vm_id(vm_id)
        return self.vm_root / vm_id

    def console_log(self, vm_id: str) -> Path:
        return VmLayout(self.vm_dir(vm_id)).console_log

    async def runstate(self, vm_id: str) -> str | None:
        """QEMU's own run state ("prelaunch", "running", "paused", ...), None without a VMM."""
        vm = self._vms.get(vm_id)
        if vm is None or not vm.alive or vm.qmp is None:
            return None
        return await self._status(vm)

    def identity(self, vm_id: str) -> ProcessIdentity | None:
        """The identity of the VM's QEMU process while it runs."""
        vm = self._vms.get(vm_id)
        return vm.identity if vm is not None and vm.alive else None

    # ---------------------------------------------------------------- create / boot

    async def create(self, spec: LaunchSpec) -> ProcessIdentity:
        if self._accelerator is None:
            await self.start()
        try:
            layout = VmLayout(self.vm_dir(spec.vm_id))
        except ValueError as e:
            raise InvalidArgument("vm_id", str(e)) from e
        if len(spec.vm_id) > max_vm_id_length(self.vm_root):
            raise InvalidArgument(
                "vm_id",
                f"at most {max_vm_id_length(self.vm_root)} characters on this host "
                "(Unix socket path limit)",
            )
        if spec.vm_id in self._vms or layout.dir.exists():
            raise BackendError(f"VM {spec.vm_id} already has a directory on this host")
        try:
            layout.dir.mkdir(mode=0o700)
        except OSError as e:
            raise BackendError(f"cannot make the VM directory: {e.strerror}") from e
        try:
            await self._copy_disks(spec, layout)
            _write_atomic(layout.spec_file, spec_to_json(spec))
            vm = await self._launch(spec, layout)
        except BaseException as e:
            await _remove_tree(layout.dir)
            if isinstance(e, BackendError):
                raise BackendError(self._clean(e.message, spec, layout)) from None
            if isinstance(e, Exception):
                raise BackendError(
                    self._clean(f"could not create VM {spec.vm_id}: {e}", spec, layout)
                ) from None
            raise
        return vm.identity

    async def boot(self, vm_id: str) -> ProcessIdentity:
        vm = self._vms.get(vm_id)
        if vm is None or not vm.alive:
            vm = await self._relaunch(vm_id)
        status = await self._status(vm)
        if status in ("prelaunch", "paused"):
            await self._qmp(vm, "cont")
        elif status != "running":
            raise BackendError(f"cannot boot VM {vm_id}: its VMM is in state {status!r}")
        vm.booted_at = time.time()
        vm.last_cpu_sample = None
        self._write_process_file(vm)
        return vm.identity

    async def _relaunch(self, vm_id: str) -> _Vm:
        """A new QEMU (vCPUs stopped) from the saved spec, for a VM whose process is gone."""
        if self._accelerator is None:
            await self.start()
        layout = VmLayout(self.vm_dir(vm_id))
        try:
            spec = spec_from_json(layout.spec_file.read_text())
        except FileNotFoundError:
            raise BackendError(
                f"VM {vm_id} has no saved launch spec on this host; delete and recreate it"
            ) from None
        except (ValueError, KeyError, TypeError) as e:
            raise BackendError(f"VM {vm_id} has an unreadable launch spec: {e}") from e
        # A QEMU recorded for this VM that is still running (metald stopped mid-shutdown,
        # say) would share the disks with the new one: it is ours, so it goes first.
        await self._discard_runtime(layout)
        try:
            return await self._launch(spec, layout)
        except BackendError:
            raise
        except Exception as e:
            raise BackendError(self._clean(f"could not start VM {vm_id}: {e}", spec, layout)) from e

    async def _copy_disks(self, spec: LaunchSpec, layout: VmLayout) -> None:
        copies = [d for d in plan_drives(spec, layout) if not d.read_only]
        # A TaskGroup cancels the other copies when one fails.
        try:
            async with asyncio.TaskGroup() as group:
                for d in copies:
                    group.create_task(_sparse_copy(d.source, d.path))
        except ExceptionGroup as group_error:
            raise group_error.exceptions[0] from None

    async def _launch(self, spec: LaunchSpec, layout: VmLayout) -> _Vm:
        """Start QEMU with -S and wait until QMP reports `prelaunch`. Leaves no process if
        it fails (the caller removes files)."""
        accelerator = self.accelerator()
        drives = plan_drives(spec, layout)
        try:
            argv = build_argv(
                spec,
                layout=layout,
                drives=drives,
                accelerator=accelerator,
                binary=self._binary_path or self.qemu_binary,
                tsc_khz=self._tsc_khz,
            )
        except ValueError as e:
            raise BackendError(f"cannot start VM {spec.vm_id}: {e}") from e
        _, dropped = kernel_cmdline_and_dropped(
            spec, accelerator=accelerator, tsc_khz=self._tsc_khz
        )
        if dropped:
            log.warning(
                "VM %s: %d kernel argument(s) dropped, the command line would exceed %d bytes",
                spec.vm_id,
                len(dropped),
                MAX_KERNEL_CMDLINE,
            )
        with contextlib.suppress(FileNotFoundError):
            layout.qmp_socket.unlink()
        try:
            identity = spawn(argv, stderr_path=layout.stderr_log)
        except OSError as e:
            raise BackendError(f"cannot start {self.qemu_binary}: {e.strerror or e}") from e
        vm = _Vm(
            vm_id=spec.vm_id,
            layout=layout,
            identity=identity,
            accelerator=accelerator,
            qemu_version=self._qemu_version,
        )
        vm.watch = ProcessWatch.open(identity, lambda status: self._on_exit(vm, status))
        self._vms[spec.vm_id] = vm
        try:
            if vm.watch is None:
                raise _StartFailed("QEMU exited at once")
            self._write_process_file(vm)
            deadline = asyncio.get_running_loop().time() + self.start_timeout
            await self._connect(vm, deadline)
            status = await self._status(vm)
            if status != "prelaunch":
                raise _StartFailed(f"QEMU started in state {status!r}, not prelaunch")
        except BaseException as e:
            if vm.watch is not None:
                vm.expecting_exit = True
                await vm.watch.kill_and_wait()
                await self._settle(vm)
                vm.watch.close()
            if self._vms.get(spec.vm_id) is vm:
                del self._vms[spec.vm_id]
            if not isinstance(e, Exception):
                raise
            # QEMU's own first error line says most (bad kernel, missing file, ...).
            detail = _first_line(layout.stderr_log) or (
                e.message if isinstance(e, BackendError) else str(e)
            )
            message = f"QEMU failed to start VM {spec.vm_id}: {detail}"
            raise BackendError(self._clean(message, spec, layout)) from None
        vm.starting = False
        return vm

    async def _connect(self, vm: _Vm, deadline: float) -> None:
        """Connect to QEMU's QMP socket, waiting while QEMU is still creating it (the file
        appears at bind(), connections are refused until listen())."""
        loop = asyncio.get_running_loop()
        path = str(vm.layout.qmp_socket)
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await asyncio.wait_for(
                    loop.sock_connect(sock, path), max(0.1, deadline - loop.time())
                )
                break
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
            except (OSError, TimeoutError) as e:
                sock.close()
                raise _StartFailed(f"cannot connect to QMP: {e}") from e
            if vm.watch is None or vm.watch.exited:
                raise _StartFailed("QEMU exited while starting")
            if loop.time() > deadline:
                raise _StartFailed(f"QMP not ready after {self.start_timeout:g} s")
            await asyncio.sleep(0.01)
        qmp = QMPClient(vm.vm_id)
        # Keep only the event that says why QEMU is about to exit.
        qmp.events.names = {"SHUTDOWN"}
        try:
            await asyncio.wait_for(qmp.connect(sock), max(0.1, deadline - loop.time()))
        except Exception as e:
            with contextlib.suppress(Exception):
                await qmp.disconnect()
            sock.close()
            raise _StartFailed(f"QMP did not answer: {e}") from e
        vm.qmp = qmp

    # ---------------------------------------------------------------- operations

    async def pause(self, vm_id: str) -> None:
        await self._qmp(self._live(vm_id), "stop")

    async def resume(self, vm_id: str) -> None:
        await self._qmp(self._live(vm_id), "cont")

    async def reboot(self, vm_id: str) -> None:
        await self._qmp(self._live(vm_id), "system_reset")

    async def shutdown(self, vm_id: str, *, timeout: float, force: bool) -> str:
        """Graceful: Ctrl-Alt-Del, then wait up to `timeout` for QEMU to exit, then SIGKILL.
        A paused VM is resumed first (a stopped guest cannot run its shutdown path); one
        still in prelaunch has no guest to ask and is killed."""
        vm = self._vms.get(vm_id)
        if vm is None or vm.watch is None or vm.watch.exited:
            # Already gone: graceful only if the guest itself powered off.
            if vm is not None:
                await self._settle(vm)
            graceful = vm is not None and vm.exit_reason == _SHUTDOWN_REASONS["guest-shutdown"]
            return "graceful" if graceful else "forced"
        vm.expecting_exit = True
        how = "forced"
        try:
            if not force:
                try:
                    status = await self._status(vm)
                    if status in ("paused", "suspended"):
                        await self._qmp(vm, "cont")
                        status = "running"
                    if status == "running" and await self._ask_guest_to_stop(vm, timeout):
                        how = "graceful"
                except BackendError as e:
                    if not vm.watch.exited:
                        log.warning("graceful shutdown of %s failed, killing it: %s", vm_id, e)
            await self._kill_vm(vm)
        finally:
            # Interrupted (cancelled) with the VMM still up: its exit is news again.
            if not vm.watch.exited:
                vm.expecting_exit = False
        return how

    async def _ask_guest_to_stop(self, vm: _Vm, timeout: float) -> bool:
        """Ctrl-Alt-Del until QEMU exits or `timeout` passes. Sent again every
        CAD_REPEAT_SECONDS: a guest still booting (just created or rebooted) loses the keys
        until its keyboard driver and its init's trap are up; a guest already shutting down
        ignores repeats."""
        watch = vm.watch
        assert watch is not None  # the caller checked: a live, watched VMM
        deadline = time.monotonic() + timeout
        while True:
            await self._qmp(vm, "send-key", _CTRL_ALT_DEL)
            left = deadline - time.monotonic()
            if await watch.wait(min(CAD_REPEAT_SECONDS, max(left, 0.0))):
                return True
            if time.monotonic() >= deadline:
                return False

    async def destroy(self, vm_id: str) -> None:
        try:
            layout = VmLayout(self.vm_dir(vm_id))
        except ValueError:
            return
        vm = self._vms.pop(vm_id, None)
        if vm is not None:
            vm.expecting_exit = True
            await self._kill_vm(vm)
            if vm.watch is not None:
                vm.watch.close()
        recorded = self._recorded_identity(layout)
        if recorded is not None and self._provably_ours(recorded, layout):
            await _kill(recorded)
        await _remove_tree(layout.dir)

    # ---------------------------------------------------------------- restart

    async def adopt(self, vm_id: str, identity: ProcessIdentity) -> VmState | None:
        """Re-attach to a QEMU left by an earlier metald. If it is gone, or does not answer on
        its QMP socket, or is in a state it cannot carry on from, the process (when provably
        ours) is killed, its runtime files go and None is returned. spec.json, the disks and
        the console log stay: the VM is SHUTDOWN now, and `boot` can start it again."""
        if self._accelerator is None:
            await self.start()
        try:
            layout = VmLayout(self.vm_dir(vm_id))
        except ValueError:
            return None
        current = self._vms.get(vm_id)
        if current is not None and current.alive:
            return _RUNSTATES.get(await self._status(current))
        if not (is_alive(identity) and self._provably_ours(identity, layout)):
            # process.json may name a newer QEMU than the store does (metald stopped between
            # starting it and recording it): nobody knows it, so it goes too.
            await self._discard_runtime(layout)
            return None
        recorded = _read_json(layout.process_file)
        vm = _Vm(
            vm_id=vm_id,
            layout=layout,
            identity=identity,
            accelerator=str(recorded.get("accelerator") or self.accelerator()),
            qemu_version=self._qemu_version,
        )
        booted_at = recorded.get("booted_at")
        if isinstance(booted_at, int | float):
            vm.booted_at = float(booted_at)
        vm.watch = ProcessWatch.open(identity, lambda status: self._on_exit(vm, status))
        if vm.watch is None:
            await self._discard_runtime(layout)
            return None
        self._vms[vm_id] = vm
        state: VmState | None = None
        try:
            await self._connect(vm, asyncio.get_running_loop().time() + self.qmp_timeout)
            state = _RUNSTATES.get(await self._status(vm))
        except (_StartFailed, BackendError) as e:
            log.warning("cannot adopt VM %s: %s", vm_id, e)
        if state is None:
            vm.expecting_exit = True
            await vm.watch.kill_and_wait()
            await self._settle(vm)
            vm.watch.close()
            self._vms.pop(vm_id, None)
            self._remove_runtime_files(layout)
            return None
        vm.starting = False
        self._write_process_file(vm)
        return state

    async def remove_orphans(self, known_vm_ids: set[str]) -> list[str]:
        """Directories under vm_root that no known VM owns: their QEMU is killed when
        process.json names a live process whose command line is this VM's (anything less is
        not provably ours and is left alone, directory included), then the directory goes."""
        removed: list[str] = []
        if not self.vm_root.is_dir():
            return removed
        for entry in sorted(self.vm_root.iterdir()):
            name = entry.name
            if name in known_vm_ids or name in self._vms or not entry.is_dir():
                continue
            try:
                check_vm_id(name)
            except ValueError:
                continue
            layout = VmLayout(entry)
            recorded = self._recorded_identity(layout)
            if recorded is not None and is_alive(recorded):
                if not self._provably_ours(recorded, layout):
                    log.warning("orphan %s: pid %d is not provably ours; left", name, recorded.pid)
                    continue
                await _kill(recorded)
            await _remove_tree(entry)
            removed.append(name)
        return removed

    # ---------------------------------------------------------------- observation

    async def usage(self, vm_id: str) -> VmUsage:
        """CPU time and share (100 = one host CPU; since the last sample, or since the
        process started), RSS, block I/O totals from QMP, seconds since boot. Zeros when
        no QEMU process runs."""
        vm = self._vms.get(vm_id)
        if vm is None or not vm.alive:
            return VmUsage()
        stat = read_stat(vm.identity.pid)
        if stat is None or stat.start_time != vm.identity.start_time:
            return VmUsage()
        cpu_ns = stat.cpu_time_ns
        now = time.monotonic()
        if vm.last_cpu_sample is not None:
            prev_cpu, prev_at = vm.last_cpu_sample
            elapsed = now - prev_at
            percent = 100.0 * (cpu_ns - prev_cpu) / (elapsed * 1e9) if elapsed > 0 else 0.0
        else:
            age = process_age_seconds(vm.identity)
            percent = 100.0 * cpu_ns / (age * 1e9) if age > 0 else 0.0
        vm.last_cpu_sample = (cpu_ns, now)
        rd_bytes = wr_bytes = rd_ops = wr_ops = 0
        try:
            stats = await self._qmp(vm, "query-blockstats")
        except BackendError:
            stats = []
        if isinstance(stats, list):
            for device in stats:
                s = device.get("stats", {}) if isinstance(device, dict) else {}
                rd_bytes += int(s.get("rd_bytes", 0))
                wr_bytes += int(s.get("wr_bytes", 0))
                rd_ops += int(s.get("rd_operations", 0))
                wr_ops += int(s.get("wr_operations", 0))
        uptime = int(time.time() - vm.booted_at) if vm.booted_at is not None else 0
        return VmUsage(
            cpu_time_ns=cpu_ns,
            cpu_usage_percent=max(0.0, percent),
            memory_bytes=read_rss_bytes(vm.identity.pid),
            disk_read_bytes=rd_bytes,
            disk_write_bytes=wr_bytes,
            disk_read_ops=rd_ops,
            disk_write_ops=wr_ops,
            uptime_seconds=max(0, uptime),
        )

    def info(self, vm_id: str) -> dict[str, str]:
        try:
            layout = VmLayout(self.vm_dir(vm_id))
        except ValueError:
            return {}
        vm = self._vms.get(vm_id)
        result = {
            "accelerator": vm.accelerator if vm is not None else (self._accelerator or ""),
            "console_log": str(layout.console_log),
            "qmp_socket": str(layout.qmp_socket),
        }
        if self._qemu_version:
            result["qemu_version"] = self._qemu_version
        if vm is not None and vm.alive:
            result["pid"] = str(vm.identity.pid)
        if vm is not None and vm.exit_reason is not None:
            result["exit_reason"] = vm.exit_reason
        return result

    async def close(self) -> None:
        """Disconnect from every QEMU and stop watching; the processes keep running."""
        vms = list(self._vms.values())
        self._vms.clear()
        for vm in vms:
            if vm.watch is not None:
                vm.watch.detach()
            if vm.qmp is not None:
                with contextlib.suppress(Exception):
                    await vm.qmp.disconnect()
                vm.qmp = None
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # ---------------------------------------------------------------- exits

    def _on_exit(self, vm: _Vm, status: ExitStatus | None) -> None:
        """Called from the event loop the moment the QEMU process is seen to exit."""
        vm.exit_task = self._spawn_task(self._handle_exit(vm, status))

    async def _handle_exit(self, vm: _Vm, status: ExitStatus | None) -> None:
        event = None
        if vm.qmp is not None:
            # Disconnecting reads what QEMU sent before it went, SHUTDOWN event included.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(vm.qmp.disconnect(), 2.0)
            history = vm.qmp.events.history
            event = history[-1] if history else None
            vm.qmp = None
        vm.exit_reason = _exit_reason(event, status, vm.layout.stderr_log)
        if self._vms.get(vm.vm_id) is vm:
            self._remove_runtime_files(vm.layout)
        if vm.watch is not None:
            vm.watch.close()
        if vm.expecting_exit or vm.starting:
            return
        log.warning("VM %s: %s", vm.vm_id, vm.exit_reason)
        if self._exit_callback is not None:
            try:
                await self._exit_callback(vm.vm_id, vm.exit_reason)
            except Exception:
                log.exception("exit callback for VM %s failed", vm.vm_id)

    async def _kill_vm(self, vm: _Vm) -> None:
        """SIGKILL the VM's QEMU (through its pidfd) and wait until the exit is handled."""
        if vm.watch is not None and not vm.watch.exited and not await vm.watch.kill_and_wait():
            raise BackendError(f"VM {vm.vm_id}: its VMM did not exit after SIGKILL")
        await self._settle(vm)

    async def _settle(self, vm: _Vm) -> None:
        """Wait until an exit has been fully handled (QMP closed, runtime files gone)."""
        if vm.watch is not None and vm.watch.exited and vm.exit_task is not None:
            await asyncio.shield(vm.exit_task)

    def _spawn_task(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ---------------------------------------------------------------- helpers

    def _live(self, vm_id: str) -> _Vm:
        vm = self._vms.get(vm_id)
        if vm is None or not vm.alive or vm.qmp is None:
            raise BackendError(f"VM {vm_id} has no running VMM")
        return vm

    async def _qmp(self, vm: _Vm, command: str, arguments: dict[str, Any] | None = None) -> Any:
        if vm.qmp is None:
            raise BackendError(f"VM {vm.vm_id} has no QMP connection")
        try:
            return await asyncio.wait_for(vm.qmp.execute(command, arguments), self.qmp_timeout)
        except TimeoutError:
            raise BackendError(
                f"VM {vm.vm_id}: QMP {command} got no answer in {self.qmp_timeout:g} s"
            ) from None
        except Exception as e:
            raise BackendError(f"VM {vm.vm_id}: QMP {command} failed: {e}") from e

    async def _status(self, vm: _Vm) -> str:
        result = await self._qmp(vm, "query-status")
        if not isinstance(result, dict) or not isinstance(result.get("status"), str):
            raise BackendError(f"VM {vm.vm_id}: unexpected query-status answer")
        return str(result["status"])

    def _write_process_file(self, vm: _Vm) -> None:
        data = {
            "pid": vm.identity.pid,
            "start_time": vm.identity.start_time,
            "accelerator": vm.accelerator,
            "booted_at": vm.booted_at,
        }
        _write_atomic(vm.layout.process_file, json.dumps(data))

    def _recorded_identity(self, layout: VmLayout) -> ProcessIdentity | None:
        data = _read_json(layout.process_file)
        try:
            return ProcessIdentity(pid=int(data["pid"]), start_time=int(data["start_time"]))
        except (KeyError, TypeError, ValueError):
            return None

    def _provably_ours(self, identity: ProcessIdentity, layout: VmLayout) -> bool:
        """Same pid and start time, and its command line names this VM's QMP socket."""
        if not is_alive(identity):
            return False
        needle = str(layout.qmp_socket)
        return any(needle in arg for arg in read_cmdline(identity.pid))

    async def _discard_runtime(self, layout: VmLayout) -> None:
        """Kill the QEMU that process.json names, if it is provably ours; forget it."""
        recorded = self._recorded_identity(layout)
        if recorded is not None and self._provably_ours(recorded, layout):
            await _kill(recorded)
        self._remove_runtime_files(layout)

    def _remove_runtime_files(self, layout: VmLayout) -> None:
        for path in (layout.qmp_socket, layout.process_file):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _clean(self, message: str, spec: LaunchSpec, layout: VmLayout) -> str:
        """Drop host directory prefixes from a message (file names are kept)."""
        dirs: set[str] = {str(layout.dir), str(self.vm_root)}
        for path in _spec_paths(spec):
            dirs.add(str(path.parent))
        for d in sorted(dirs, key=len, reverse=True):
            if d and d != "/":
                message = message.replace(d + "/", "").replace(d, "")
        return message


class _StartFailed(Exception):
    pass


def _spec_paths(spec: LaunchSpec) -> Iterable[Path]:
    yield spec.kernel
    if spec.initrd is not None:
        yield spec.initrd
    for disk in spec.disks:
        yield disk.path


def _exit_reason(
    event: Mapping[str, Any] | None, status: ExitStatus | None, stderr_log: Path
) -> str:
    if event is not None:
        data = event.get("data") or {}
        reason = str(data.get("reason", ""))
        return _SHUTDOWN_REASONS.get(reason, f"vmm shut down ({reason or 'no reason given'})")
    if status is None:
        return "vmm exited unexpectedly"
    if status.signal is not None:
        return f"vmm exited unexpectedly (signal {status.signal})"
    detail = _first_line(stderr_log)
    suffix = f": {detail}" if detail and status.exit_code else ""
    return f"vmm exited unexpectedly (exit status {status.exit_code}){suffix}"


def _first_line(path: Path) -> str:
    """The first meaningful line QEMU wrote to stderr (warnings skipped if there is more)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read(64 * 1024)
    except OSError:
        return ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "warning:" not in ln.lower()]
    line = (errors or lines or [""])[0]
    prefix = "qemu-system-x86_64: "
    return line[len(prefix) :] if line.startswith(prefix) else line


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


async def _kill(identity: ProcessIdentity) -> None:
    try:
        await kill_identity(identity)
    except TimeoutError as e:
        raise BackendError(f"VMM process {identity.pid} did not exit after SIGKILL") from e


async def _remove_tree(path: Path) -> None:
    await asyncio.to_thread(shutil.rmtree, path, ignore_errors=True)


async def _sparse_copy(source: Path, dest: Path) -> None:
    """A per-VM copy of a disk: reflinked where the filesystem can, else sparse."""
    proc = await asyncio.create_subprocess_exec(
        "cp",
        "--reflink=auto",
        "--sparse=always",
        "--",
        str(source),
        str(dest),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, err = await proc.communicate()
    except BaseException:
        # Cancelled (another disk failed, or the caller gave up): no cp may outlive us.
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        message = err.decode(errors="replace").strip().splitlines()
        raise BackendError(
            f"could not copy disk {source.name}: {message[-1] if message else 'cp failed'}"
        )
    await asyncio.to_thread(os.chmod, dest, 0o600)

"""The QEMU backend: one `qemu-system-x86_64 -M microvm` process per VM, driven over QMP.

Each VM owns a directory ``<vm_root>/<vm_id>/`` (metald's records; root only):

    spec.json     the LaunchSpec (a VM booted again after a shutdown is relaunched from it)
    process.json  {pid, start_time, accelerator, booted_at} while a QEMU process runs
    jail.json     the JailSpec of its jailed QEMU (jailed VMs only)
    qemu.stderr   QEMU's own messages (a start failure is reported from its first line)
    disk<N>.img   sparse (reflinked where possible) copies of the writable disks
    qmp.sock      QEMU's QMP socket            } QEMUs run directly only; a jailed QEMU
    console.log   the guest's serial console   } has them in its jail's /run (see below)

Jailed (``jail=JailSettings(...)``; the daemon always jails when it runs as root): every QEMU
is started by the jailer (metald.jailer) unprivileged, in its own mount namespace with the
jail ``<chroot_base>/qemu/<vm_id>/root`` as its root, in the VM's cgroup, and, for a VM with
a NIC, inside the VM's network namespace with its TAP. The jail holds the kernel (/vmlinux),
initrd (/initrd), disks (/disk<N>.img: the VM directory's writable copy, handed to the jail
user, or the read-only original), QEMU with its libraries and firmware (read-only), a few
device nodes and a writable /run where QEMU makes qmp.sock and console.log; metald reaches
them at ``<jail root>/run/``. The console log of a jailed VM covers its current QEMU (one
started again after a shutdown begins a new one). When a jailed QEMU exits its TAP and
cgroup go at once; its jail directory (with the console log) stays until the VM is started
again or deleted.

The QEMU process runs in its own session, so it outlives metald; a restarted metald adopts it
again (pid + start time, its root must be its VM's jail (or its command line must name its
socket), and the QMP socket must answer). Processes are watched through a pidfd in the event
loop; an exit metald did not ask for is reported through the exit callback.

Lifecycle notes:
- A graceful shutdown sends Ctrl-Alt-Del (QMP send-key); the guest's init runs its shutdown
  path and powers off, and QEMU exits by itself. A paused VM is resumed first: a guest whose
  vCPUs are stopped cannot run its shutdown path.
- After a shutdown the QEMU process is gone but the directory stays (spec, disks, console);
  `boot` then starts a new QEMU from spec.json and returns its identity.
- `destroy` (DeleteVm) and `remove_orphans` are the only things that remove a directory
  (and a jail directory; a relaunch replaces one).
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
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from metald.backends.jail import (
    JailSettings,
    load_jail_spec,
    release_jail,
    remove_jail_at,
    remove_orphan_jails,
    rooted_at,
    save_jail_spec,
)
from metald.backends.qemu.accel import probe_kvm
from metald.backends.qemu.command import (
    ACCELERATORS,
    JAILED_CONSOLE_LOG,
    JAILED_INITRD,
    JAILED_KERNEL,
    JAILED_QMP_SOCKET,
    MAX_KERNEL_CMDLINE,
    MAX_UNIX_SOCKET_PATH,
    MAX_VM_ID,
    Drive,
    VmLayout,
    VmmPaths,
    build_argv,
    check_socket_path,
    check_vm_id,
    jailed_drives,
    kernel_cmdline_and_dropped,
    max_jailed_vm_id_length,
    max_vm_id_length,
    plan_drives,
    spec_from_json,
    spec_to_json,
)
from metald.core.errors import BackendError, InvalidArgument, MetaldError
from metald.core.models import LaunchSpec, ProcessIdentity, VmUsage
from metald.core.ports import ExitCallback
from metald.core.states import VmState
from metald.host.cpu import host_tsc_khz
from metald.host.files import write_atomic
from metald.host.process import (
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
from metald.host.sockets import UnsafeSocket, open_socket_path
from metald.jailer.errors import JailerError
from metald.jailer.host import qemu_host_paths, vmm_devices
from metald.jailer.launch import launch_jailed
from metald.jailer.spec import JailSpec, PlacedFile, TapSpec

log = logging.getLogger(__name__)

# set_tap_callback: (vm_id) -> None, once the VM's new TAP exists.
TapCallback = Callable[[str], Awaitable[None]]

DEBIAN_PACKAGE = "qemu-system-x86"
BACKEND = "qemu"  # also the jails' directory under the jail base
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
    jail: JailSpec | None = None  # the jail it runs in (None: run directly)
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

    @property
    def qmp_socket(self) -> Path:
        """The QMP socket's host path."""
        if self.jail is not None:
            return self.jail.host_path(JAILED_QMP_SOCKET)
        return self.layout.qmp_socket

    @property
    def socket_owner(self) -> int:
        """The uid a genuine QMP socket of this QEMU belongs to."""
        return self.jail.uid if self.jail is not None else os.geteuid()


class QemuBackend:
    """The Backend port (metald.core.ports.Backend) for QEMU microvm guests."""

    name = "qemu"

    def __init__(
        self,
        vm_root: Path,
        qemu_binary: str = "qemu-system-x86_64",
        accelerator: str = "auto",
        *,
        jail: JailSettings | None = None,
        guest_agent: bool = False,
        start_timeout: float = 30.0,
        qmp_timeout: float = 10.0,
        kvm_probe_timeout: float = 3.0,
    ) -> None:
        """`jail`: launch every QEMU through the jailer with these settings (needs root);
        None runs QEMU directly as metald's own user, without networking (for hosts and
        tests that cannot jail)."""
        if accelerator not in ("auto", *ACCELERATORS):
            raise ValueError("accelerator must be auto, kvm or tcg")
        self.vm_root = Path(vm_root)
        self.qemu_binary = qemu_binary
        self.jail = jail
        # A second serial port wired to agent.sock beside the QMP socket, and the guest told
        # to run a shell on it (guest-init.sh): for running commands in guests (tests).
        self.guest_agent = guest_agent
        self.accelerator_setting = accelerator
        self.start_timeout = start_timeout
        self.qmp_timeout = qmp_timeout
        self.kvm_probe_timeout = kvm_probe_timeout
        self._accelerator: str | None = None
        self.accelerator_reason = ""
        self._binary_path: str | None = None
        self._host_paths: tuple[str, ...] = ()  # what a jailed QEMU needs from the host
        self._cgroup_noted = False
        self._qemu_version = ""
        self._tsc_khz: int | None = None
        self._vms: dict[str, _Vm] = {}
        self._exit_callback: ExitCallback | None = None
        self._tap_callback: TapCallback | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # ---------------------------------------------------------------- set-up

    async def start(self) -> None:
        """Check the binary and the accelerator (probing KVM for `auto`), make vm_root."""
        path = await asyncio.to_thread(_find_binary, self.qemu_binary)
        if path is None:
            raise BackendError(
                f"QEMU binary {self.qemu_binary!r} not found: install the Debian package "
                f"{DEBIAN_PACKAGE} (apt-get install {DEBIAN_PACKAGE})"
            )
        self._binary_path = path
        self._qemu_version = await self._read_version(path)
        if self.jail is not None:
            await self._start_jail(self.jail, path)
        sockets_under = self.jail.backend_dir(BACKEND) if self.jail is not None else self.vm_root
        longest = self._max_vm_id()
        if longest < _ID_BUDGET:
            what = "jail base" if self.jail is not None else "VM directory"
            raise BackendError(
                f"the {what} {sockets_under} is too long for QMP socket paths "
                f"(AF_UNIX allows {MAX_UNIX_SOCKET_PATH} bytes): use a shorter one"
            )
        if longest < MAX_VM_ID:
            log.warning(
                "VM ids longer than %d characters cannot be used under %s (Unix socket path "
                "limit): a shorter directory lifts this",
                longest,
                sockets_under,
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

    async def _start_jail(self, jail: JailSettings, binary: str) -> None:
        if os.geteuid() != 0:
            raise BackendError(
                "jailing VMMs needs root: run metald as root (or without the jailer, "
                "which only a development host should do)"
            )
        await asyncio.to_thread(jail.check_base, BACKEND)
        try:
            self._host_paths = await asyncio.to_thread(qemu_host_paths, binary)
        except OSError as e:
            raise BackendError(f"cannot find what {binary} needs from the host: {e}") from e

    def _max_vm_id(self) -> int:
        if self.jail is not None:
            return max_jailed_vm_id_length(self.jail.backend_dir(BACKEND))
        return max_vm_id_length(self.vm_root)

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

    def set_tap_callback(self, callback: TapCallback | None) -> None:
        """Called with the VM id each time a QEMU of a VM with a NIC has started (its vCPUs
        still stopped), once the jailer has made the VM's TAP: create, and boot after a
        shutdown (every QEMU gets a new TAP). Connect the TAP to the VM's network there; the
        guest runs only after it returns. An exception fails that launch (the QEMU and its
        jail go) with a BackendError."""
        self._tap_callback = callback

    def accelerator(self) -> str:
        if self._accelerator is None:
            raise BackendError("the QEMU backend has not been started")
        return self._accelerator

    def vm_dir(self, vm_id: str) -> Path:
        check_vm_id(vm_id)
        return self.vm_root / vm_id

    def console_log(self, vm_id: str) -> Path:
        """The guest's console log (a host path; inside the jail's /run when jailed)."""
        return self._host_files(vm_id, VmLayout(self.vm_dir(vm_id)))[0]

    def jail_spec(self, vm_id: str) -> JailSpec | None:
        """The jail of the VM's QEMU (the running one, else the last one), None if the VM
        was not jailed."""
        vm = self._vms.get(vm_id)
        if vm is not None and vm.jail is not None:
            return vm.jail
        return self._saved_jail(VmLayout(self.vm_dir(vm_id)))

    def _host_files(self, vm_id: str, layout: VmLayout) -> tuple[Path, Path]:
        """(console log, QMP socket) on the host."""
        jail = self.jail_spec(vm_id)
        if jail is None and self.jail is not None and not layout.spec_file.exists():
            jail = self._jail_for(vm_id)  # not launched yet: where its jail will be
        if jail is not None:
            return jail.host_path(JAILED_CONSOLE_LOG), jail.host_path(JAILED_QMP_SOCKET)
        return layout.console_log, layout.qmp_socket

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
        if len(spec.vm_id) > self._max_vm_id():
            raise InvalidArgument(
                "vm_id",
                f"at most {self._max_vm_id()} characters on this host (Unix socket path limit)",
            )
        if spec.nic is not None and self.jail is None:
            raise BackendError(
                "a VM with a network interface needs the jailer (metald runs its VMMs "
                "unjailed here)"
            )
        if spec.vm_id in self._vms or layout.dir.exists():
            raise BackendError(f"VM {spec.vm_id} already has a directory on this host")
        try:
            layout.dir.mkdir(mode=0o700)
        except OSError as e:
            raise BackendError(f"cannot make the VM directory: {e.strerror}") from e
        try:
            await self._copy_disks(spec, layout)
            write_atomic(layout.spec_file, spec_to_json(spec))
            vm = await self._launch(spec, layout)
        except BaseException as e:
            try:
                await self._remove_vm_files(spec.vm_id, layout)
            except BackendError as cleanup_error:
                log.warning("VM %s: %s", spec.vm_id, cleanup_error.message)
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
        old = self._vms.get(vm_id)
        if old is not None:
            await self._settle(old)  # its exit fully handled (TAP and cgroup released)
        # A QEMU recorded for this VM that is still running (metald stopped mid-shutdown,
        # say) would share the disks with the new one: it is ours, so it goes first.
        await self._discard_runtime(layout)
        # The last jail goes whole: the jailer makes a new root (and TAP) every time.
        await self._remove_saved_jail(vm_id, layout)
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
        if spec.nic is not None and self.jail is None:
            # Run directly, QEMU would look for the TAP in metald's own network namespace.
            raise BackendError(
                f"cannot start VM {spec.vm_id}: its network interface needs the jailer"
            )
        drives = plan_drives(spec, layout)
        jail: JailSpec | None = None
        binary = self._binary_path or self.qemu_binary
        try:
            if self.jail is not None:
                argv = build_argv(
                    spec,
                    paths=VmmPaths.jailed(spec, agent=self.guest_agent),
                    drives=jailed_drives(drives),
                    accelerator=accelerator,
                    binary=binary,
                    tsc_khz=self._tsc_khz,
                )
                jail = self._jail_for(spec.vm_id, spec, argv, drives, accelerator)
                check_socket_path(jail.host_path(JAILED_QMP_SOCKET))
            else:
                argv = build_argv(
                    spec,
                    paths=VmmPaths.direct(spec, layout, agent=self.guest_agent),
                    drives=drives,
                    accelerator=accelerator,
                    binary=binary,
                    tsc_khz=self._tsc_khz,
                )
            _, dropped = kernel_cmdline_and_dropped(
                spec, accelerator=accelerator, tsc_khz=self._tsc_khz, agent=self.guest_agent
            )
        except ValueError as e:
            raise BackendError(f"cannot start VM {spec.vm_id}: {e}") from e
        if dropped:
            log.warning(
                "VM %s: %d kernel argument(s) dropped, the command line would exceed %d bytes",
                spec.vm_id,
                len(dropped),
                MAX_KERNEL_CMDLINE,
            )
        if jail is not None:
            try:
                identity = await self._launch_jailed(jail, layout)
            except BackendError as e:
                raise BackendError(self._clean(e.message, spec, layout)) from None
        else:
            with contextlib.suppress(FileNotFoundError):
                layout.qmp_socket.unlink()
            try:
                identity = ProcessIdentity(*spawn(argv, stderr_path=layout.stderr_log))
            except OSError as e:
                raise BackendError(f"cannot start {self.qemu_binary}: {e.strerror or e}") from e
        vm = _Vm(
            vm_id=spec.vm_id,
            layout=layout,
            identity=identity,
            accelerator=accelerator,
            jail=jail,
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
            if spec.nic is not None and self._tap_callback is not None:
                try:
                    await self._tap_callback(spec.vm_id)
                except Exception as e:
                    message = e.message if isinstance(e, MetaldError) else str(e)
                    raise _StartFailed(f"its TAP could not be connected: {message}") from e
        except BaseException as e:
            if vm.watch is not None:
                vm.expecting_exit = True
                await vm.watch.kill_and_wait()
                await self._settle(vm)
                vm.watch.close()
            if self._vms.get(spec.vm_id) is vm:
                del self._vms[spec.vm_id]
            if jail is not None:
                with contextlib.suppress(BackendError):  # logged; destroy tries again
                    await self._remove_saved_jail(spec.vm_id, layout)
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

    def _jail_for(
        self,
        vm_id: str,
        spec: LaunchSpec | None = None,
        argv: list[str] | None = None,
        drives: list[Drive] | None = None,
        accelerator: str = "tcg",
    ) -> JailSpec:
        """The jail a QEMU of this VM runs in. Without a spec: only its place (paths)."""
        settings = self.jail
        assert settings is not None
        jail = JailSpec(
            vm_id=vm_id,
            uid=settings.uid,
            gid=settings.gid,
            argv=tuple(argv or ("/",)),
            backend=BACKEND,
            jail_base=str(settings.chroot_base),
        )
        if spec is None:
            return jail
        files = [PlacedFile(str(spec.kernel), JAILED_KERNEL)]
        if spec.initrd is not None:
            files.append(PlacedFile(str(spec.initrd), JAILED_INITRD))
        for host, inside in zip(drives or [], jailed_drives(drives or []), strict=True):
            files.append(PlacedFile(str(host.path), str(inside.path), read_only=host.read_only))
        nic = spec.nic
        return replace(
            jail,
            netns=None if nic is None else nic.netns,
            tap=None if nic is None else TapSpec(nic.tap),
            files=tuple(files),
            devices=vmm_devices(kvm=accelerator == "kvm", tap=nic is not None),
            host_paths=self._host_paths,
            cgroup=settings.cgroup(memory_bytes=spec.memory_bytes, vcpu_count=spec.vcpu_count),
        )

    async def _launch_jailed(self, jail: JailSpec, layout: VmLayout) -> ProcessIdentity:
        """Run the jailer; its JailSpec is saved first, so a metald stopped at any point
        finds the jail again."""
        save_jail_spec(layout.jail_spec_file, jail)
        with contextlib.suppress(FileNotFoundError):
            layout.stderr_log.unlink()  # the jailer appends: one QEMU's messages only
        try:
            jailed = await launch_jailed(
                jail, stderr_path=layout.stderr_log, timeout=self.start_timeout
            )
        except JailerError as e:
            # Full text (host paths) for the operator; the caller gets a cleaned one.
            log.warning("VM %s: %s", jail.vm_id, e.message)
            if not e.leftovers:
                with contextlib.suppress(FileNotFoundError):
                    layout.jail_spec_file.unlink()
            raise BackendError(f"could not jail the VMM of VM {jail.vm_id}: {e.message}") from None
        if jailed.cgroup_note and not self._cgroup_noted:
            self._cgroup_noted = True
            log.warning("VM cgroup limits not (all) applied on this host: %s", jailed.cgroup_note)
        log.debug(
            "VM %s: jailed QEMU pid %d in %.1f ms",
            jail.vm_id,
            jailed.pid,
            jailed.launch_seconds * 1000,
        )
        return jailed.identity

    async def _connect(self, vm: _Vm, deadline: float) -> None:
        """Connect to QEMU's QMP socket, waiting while QEMU is still creating it (the file
        appears at bind(), connections are refused until listen()).

        The socket is opened without following symlinks and must be a socket owned by the
        QEMU's user (a jailed QEMU owns the directory it is in, and metald connects as root:
        see metald.backends.jail); the connection goes through /proc/self/fd to that very
        inode."""
        loop = asyncio.get_running_loop()
        path = vm.qmp_socket
        while True:
            try:
                fd: int | None = open_socket_path(path, vm.socket_owner)
            except FileNotFoundError:
                fd = None
            except UnsafeSocket as e:
                raise _StartFailed(f"cannot connect to QMP: {e.strerror}") from None
            except OSError as e:
                raise _StartFailed(f"cannot connect to QMP: {e.strerror or e}") from None
            if fd is not None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.setblocking(False)
                try:
                    await asyncio.wait_for(
                        loop.sock_connect(sock, f"/proc/self/fd/{fd}"),
                        max(0.1, deadline - loop.time()),
                    )
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    sock.close()
                except (OSError, TimeoutError) as e:
                    sock.close()
                    raise _StartFailed(f"cannot connect to QMP: {e}") from e
                finally:
                    os.close(fd)
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
        await self._remove_vm_files(vm_id, layout)

    async def _remove_vm_files(self, vm_id: str, layout: VmLayout) -> None:
        """Kill the recorded QEMU (when provably ours), remove the VM's jail (TAP, cgroup,
        jail directory), then its directory. A jail that cannot be removed entirely keeps
        the directory (and with it jail.json, for the next try) and raises BackendError."""
        recorded = self._recorded_identity(layout)
        if recorded is not None and self._provably_ours(recorded, layout):
            await _kill(recorded)
        await self._remove_saved_jail(vm_id, layout)
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
            jail=self._saved_jail(layout),
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
            await self._settle(vm)  # its exit handler released the TAP and cgroup
            vm.watch.close()
            self._vms.pop(vm_id, None)
            self._remove_runtime_files(layout)
            return None
        vm.starting = False
        self._write_process_file(vm)
        return state

    async def remove_orphans(self, known_vm_ids: set[str]) -> list[str]:
        """Directories under vm_root that no known VM owns: their QEMU is killed when
        process.json names a live process that is provably this VM's (its root is the VM's
        jail, or its command line names the VM's socket; anything less is not provably ours
        and is left alone, directory included), then its jail and the directory go. Then,
        when jailing, jail directories and VM cgroups of VMs that are neither known nor have
        a directory left (see metald.backends.jail.remove_orphan_jails)."""
        removed: list[str] = []
        if self.vm_root.is_dir():
            removed = await self._remove_orphan_dirs(known_vm_ids)
        if self.jail is not None:
            keep = known_vm_ids | set(self._vms) | set(self._vm_dir_names())
            for name in await remove_orphan_jails(self.jail, BACKEND, keep):
                if name not in removed:
                    removed.append(name)
        return removed

    def _vm_dir_names(self) -> list[str]:
        try:
            return [p.name for p in self.vm_root.iterdir() if p.is_dir()]
        except FileNotFoundError:
            return []

    async def _remove_orphan_dirs(self, known_vm_ids: set[str]) -> list[str]:
        removed: list[str] = []
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
            try:
                await self._remove_vm_files(name, layout)
            except BackendError as e:
                log.warning("orphan %s: %s", name, e.message)
                continue
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
        console_log, qmp_socket = self._host_files(vm_id, layout)
        result = {
            "accelerator": vm.accelerator if vm is not None else (self._accelerator or ""),
            "console_log": str(console_log),
            "qmp_socket": str(qmp_socket),
        }
        if self.guest_agent:
            result["agent_socket"] = str(qmp_socket.with_name("agent.sock"))
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
            if vm.jail is not None:
                # The TAP is persistent and would block the next launch; the cgroup is
                # empty now. The jail directory (console log) stays until boot or delete.
                try:
                    await release_jail(vm.jail, keep_dir=True)
                except JailerError as e:
                    log.warning("VM %s: %s", vm.vm_id, e.message)
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
        write_atomic(vm.layout.process_file, json.dumps(data))

    def _recorded_identity(self, layout: VmLayout) -> ProcessIdentity | None:
        data = _read_json(layout.process_file)
        try:
            return ProcessIdentity(pid=int(data["pid"]), start_time=int(data["start_time"]))
        except (KeyError, TypeError, ValueError):
            return None

    def _provably_ours(self, identity: ProcessIdentity, layout: VmLayout) -> bool:
        """Same pid and start time, and: jailed, its root is this VM's jail root; run
        directly, its command line names this VM's QMP socket."""
        if not is_alive(identity):
            return False
        jail = self._saved_jail(layout)
        if jail is not None:
            return rooted_at(identity, jail.jail_root)
        needle = str(layout.qmp_socket)
        return any(needle in arg for arg in read_cmdline(identity.pid))

    def _saved_jail(self, layout: VmLayout) -> JailSpec | None:
        return load_jail_spec(layout.jail_spec_file, layout.dir.name, BACKEND)

    async def _discard_runtime(self, layout: VmLayout) -> None:
        """Kill the QEMU that process.json names, if it is provably ours; forget it; release
        its jail's TAP and cgroup (its jail directory stays)."""
        recorded = self._recorded_identity(layout)
        if recorded is not None and self._provably_ours(recorded, layout):
            await _kill(recorded)
        self._remove_runtime_files(layout)
        jail = self._saved_jail(layout)
        if jail is not None:
            try:
                await release_jail(jail, keep_dir=True)
            except JailerError as e:
                log.warning("VM %s: %s", layout.dir.name, e.message)

    async def _remove_saved_jail(self, vm_id: str, layout: VmLayout) -> None:
        """Remove the VM's last jail entirely (its QEMU has exited or been killed): the one
        jail.json names, else, when jailing, whatever is where this VM's jail would be
        (nothing else has its id). Raises BackendError (details logged) if some of it
        remains; jail.json then stays."""
        jail = self._saved_jail(layout)
        if jail is not None:
            try:
                await release_jail(jail, keep_dir=False)
            except JailerError as e:
                log.warning("VM %s: %s", vm_id, e.message)
                raise BackendError(f"VM {vm_id}: its jail could not be removed entirely") from None
        if self.jail is not None:
            # No record, or a record of a jail elsewhere (the settings changed): this place
            # too, with any VMM still rooted in it.
            try:
                await remove_jail_at(self.jail, BACKEND, vm_id)
            except JailerError as e:
                log.warning("VM %s: %s", vm_id, e.message)
                raise BackendError(f"VM {vm_id}: its jail could not be removed entirely") from None
        with contextlib.suppress(FileNotFoundError):
            layout.jail_spec_file.unlink()

    def _remove_runtime_files(self, layout: VmLayout) -> None:
        for path in (layout.qmp_socket, layout.process_file):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _clean(self, message: str, spec: LaunchSpec, layout: VmLayout) -> str:
        """Drop host directory prefixes from a message (file names are kept)."""
        dirs: set[str] = {str(layout.dir), str(self.vm_root)}
        if self.jail is not None:
            jail_dir = self.jail.backend_dir(BACKEND) / spec.vm_id
            dirs |= {str(jail_dir / "root"), str(jail_dir), str(self.jail.chroot_base)}
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


def _find_binary(name: str) -> str | None:
    """The binary's absolute path (a jailed QEMU is executed by it), None if not found."""
    path = shutil.which(name)
    return None if path is None else os.path.abspath(path)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


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

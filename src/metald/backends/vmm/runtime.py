"""The VMM runtime: the Backend port (metald.core.ports.Backend) for any VMM, written once.

A driver (backends/vmm/driver.py) supplies what is particular to a VMM — its command line,
its control connection and a handful of verbs. Everything else is here:

- the VM's directory and files (backends/vmm/layout.py, records.py), disk copies (disks.py);
- jails: when `jail` is given (the daemon always jails when it runs as root) every VMM is
  started by the jailer (metald.jailer) unprivileged, in its own mount namespace with
  `<chroot_base>/<driver>/<vm_id>/root` as its root, in the VM's cgroup, and, for a VM with a
  NIC, inside the VM's network namespace with its TAP. The jail holds the kernel (/vmlinux),
  initrd (/initrd), disks (/disk<N>.img: the VM directory's writable copy, handed to the jail
  user, or the read-only original), the VMM's binary, libraries and firmware (read-only), a
  few device nodes and a writable /run where the VMM makes its control socket and the console
  log; metald reaches them at `<jail root>/run/`. When a jailed VMM exits its TAP and cgroup go
  at once; its jail directory (with the console log) stays until the VM starts again or is
  deleted. Without `jail`, VMMs run directly as metald's own user with their files in the VM
  directory (development hosts and tests that cannot jail; no networking);
- launching and supervision: the VMM runs in its own session, so it outlives metald, and is
  watched through a pidfd in the event loop; an exit metald did not ask for is reported
  through the exit callback with the driver's reason;
- adoption after a restart: pid + start time, the process's root must be its VM's jail (or,
  run directly, its command line must name its socket), and its control socket must answer;
- orphans: directories, jails and cgroups no known VM owns go, with any VMM provably in them;
- usage: CPU time and memory from /proc; disk and network counters from the driver;
- budgets: the control socket's path (AF_UNIX) and the kernel command line.

Lifecycle notes:
- A graceful shutdown asks the guest to stop (Ctrl-Alt-Del) every CAD_REPEAT_SECONDS until
  the VMM exits or the timeout passes, then kills it. A paused VM is resumed first: a guest
  whose vCPUs are stopped cannot run its shutdown path.
- After a shutdown the process is gone but the directory stays (spec, disks, console);
  `boot` then starts a new VMM from spec.json. A driver whose guest reset ends the process
  (`reboot_needs_new_process`) is rebooted the same way: a new process, same disks.
- `destroy` (DeleteVm) and `remove_orphans` are the only things that remove a directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import time
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from metald.backends.vmm.cmdline import (
    MAX_KERNEL_CMDLINE,
    GuestBoot,
    kernel_cmdline_and_dropped,
)
from metald.backends.vmm.console import UnsafeConsole, read_console
from metald.backends.vmm.disks import copy_writable_disks
from metald.backends.vmm.driver import (
    Drive,
    LaunchContext,
    VmmControl,
    VmmDriver,
    VmmFiles,
    VmmHost,
)
from metald.backends.vmm.jail import (
    JailSettings,
    load_jail_spec,
    release_jail,
    remove_jail_at,
    remove_orphan_jails,
    rooted_at,
    save_jail_spec,
)
from metald.backends.vmm.layout import (
    AGENT_SOCKET,
    CONSOLE_LOG,
    JAILED_RUN_DIR,
    MAX_UNIX_SOCKET_PATH,
    MAX_VM_ID,
    VmLayout,
    check_socket_path,
    check_vm_id,
    max_vm_id_length,
    plan_drives,
    vmm_files,
)
from metald.backends.vmm.records import (
    ProcessRecord,
    load_process,
    load_spec,
    remove_process,
    save_process,
    save_spec,
)
from metald.core.errors import BackendError, InvalidArgument, MetaldError
from metald.core.models import ConsoleChunk, LaunchSpec, ProcessIdentity, VmUsage
from metald.core.ports import ExitCallback, TapCallback
from metald.core.states import VmState
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
from metald.host.sockets import UnsafeSocket, fd_path, open_socket_path
from metald.jailer.errors import JailerError
from metald.jailer.host import vmm_devices
from metald.jailer.launch import launch_jailed
from metald.jailer.spec import JailSpec, PlacedFile, TapSpec

log = logging.getLogger(__name__)

# start() refuses a socket directory too long for ids of this length (generated ids are 19).
_ID_BUDGET = 24
CAD_REPEAT_SECONDS = 2.0
CAD_REPEAT_MAX_SECONDS = 16.0


@dataclass
class _Vmm:
    """One VMM process of a VM (a VM started again after a shutdown gets a new one)."""

    vm_id: str
    layout: VmLayout
    identity: ProcessIdentity
    accelerator: str
    control_socket: Path  # its host path
    owner_uid: int  # the user a genuine control socket belongs to
    host_run_dir: Path
    jail: JailSpec | None = None  # the jail it runs in (None: run directly)
    watch: ProcessWatch | None = None
    control: VmmControl | None = None
    socket_fd: int | None = None  # O_PATH of the checked control socket, while connected
    booted_at: float | None = None
    starting: bool = True  # exits while starting are reported by create/boot, not the callback
    expecting_exit: bool = False
    exit_reason: str | None = None
    exit_by_guest: bool = False
    exit_task: asyncio.Task[None] | None = None
    last_cpu_sample: tuple[int, float] | None = None

    @property
    def alive(self) -> bool:
        return self.watch is not None and not self.watch.exited


class _StartFailed(Exception):
    pass


class VmmRuntime:
    """The Backend port for the VMM its driver describes."""

    def __init__(
        self,
        driver: VmmDriver,
        vm_root: Path,
        *,
        jail: JailSettings | None = None,
        guest_agent: bool = False,
        start_timeout: float = 30.0,
        control_timeout: float = 10.0,
    ) -> None:
        """`jail`: launch every VMM through the jailer with these settings (needs root); None
        runs VMMs directly as metald's own user, without networking (for hosts and tests that
        cannot jail). `guest_agent`: a second serial port wired to agent.sock beside the
        control socket, and the guest told to run a shell on it (tests; QEMU only)."""
        self.driver = driver
        self.vm_root = Path(vm_root)
        self.jail = jail
        self.guest_agent = guest_agent and driver.supports_guest_agent
        self.start_timeout = start_timeout
        self.control_timeout = control_timeout
        self._host: VmmHost | None = None
        self._cgroup_noted = False
        self._vms: dict[str, _Vmm] = {}
        self._exit_callback: ExitCallback | None = None
        self._tap_callback: TapCallback | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def name(self) -> str:
        return self.driver.name

    # ---------------------------------------------------------------- set-up

    async def start(self) -> None:
        """Check the host through the driver, the jail base and the socket budget; make
        vm_root."""
        host = await self.driver.probe()
        if self.jail is not None:
            if os.geteuid() != 0:
                raise BackendError(
                    "jailing VMMs needs root: run metald as root (or without the jailer, "
                    "which only a development host should do)"
                )
            await asyncio.to_thread(self.jail.check_base, self.name)
        sockets_under = self._sockets_under()
        longest = self._max_vm_id()
        if longest < _ID_BUDGET:
            what = "jail base" if self.jail is not None else "VM directory"
            raise BackendError(
                f"the {what} {sockets_under} is too long for control socket paths "
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
        self._host = host
        log.info(
            "%s %s: accelerator %s (%s)",
            self.name,
            host.version or "(version unknown)",
            host.accelerator,
            host.accelerator_reason,
        )

    def _sockets_under(self) -> Path:
        return self.jail.backend_dir(self.name) if self.jail is not None else self.vm_root

    def _max_vm_id(self) -> int:
        socket_name = self.driver.control_socket_name
        if self.jail is not None:
            suffix = f"/root{JAILED_RUN_DIR}/{socket_name}"
            return max_vm_id_length(self.jail.backend_dir(self.name), suffix)
        return max_vm_id_length(self.vm_root, f"/run/{socket_name}")

    def set_exit_callback(self, callback: ExitCallback) -> None:
        self._exit_callback = callback

    def set_tap_callback(self, callback: TapCallback | None) -> None:
        """Called with the VM id each time a VMM of a VM with a NIC has started (its vCPUs
        still stopped), once the jailer has made the VM's TAP: create, and boot after a
        shutdown (every VMM gets a new TAP). Connect the TAP to the VM's network there; the
        guest runs only after it returns. An exception fails that launch (the VMM and its
        jail go) with a BackendError."""
        self._tap_callback = callback

    @property
    def host(self) -> VmmHost:
        if self._host is None:
            raise BackendError(f"the {self.name} backend has not been started")
        return self._host

    def accelerator(self) -> str:
        return self.host.accelerator

    def vm_dir(self, vm_id: str) -> Path:
        check_vm_id(vm_id)
        return self.vm_root / vm_id

    def jail_spec(self, vm_id: str) -> JailSpec | None:
        """The jail of the VM's VMM (the running one, else the last one), None if the VM was
        not jailed."""
        vm = self._vms.get(vm_id)
        if vm is not None and vm.jail is not None:
            return vm.jail
        return self._saved_jail(VmLayout(self.vm_dir(vm_id)))

    def _host_files(self, vm_id: str, layout: VmLayout) -> tuple[Path, Path]:
        """(console log, control socket) on the host."""
        socket_name = self.driver.control_socket_name
        jail = self.jail_spec(vm_id)
        if jail is None and self.jail is not None and not layout.spec_file.exists():
            jail = self._jail_place(vm_id)  # not launched yet: where its jail will be
        if jail is not None:
            run = jail.host_path(str(JAILED_RUN_DIR))
            return run / CONSOLE_LOG, run / socket_name
        return layout.console_log, layout.run_dir / socket_name

    # ---------------------------------------------------------------- create / boot

    async def create(self, spec: LaunchSpec) -> ProcessIdentity:
        if self._host is None:
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
            await copy_writable_disks(spec, layout)
            save_spec(layout, spec)
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
        control = self._control(vm)
        state = await control.runstate()
        if state is VmState.CREATED:
            await control.start_vcpus()
        elif state is VmState.PAUSED:
            await control.resume()
        elif state is not VmState.RUNNING:
            raise BackendError(f"cannot boot VM {vm_id}: its VMM cannot carry on")
        self._booted(vm)
        return vm.identity

    def _booted(self, vm: _Vmm) -> None:
        vm.booted_at = time.time()
        vm.last_cpu_sample = None
        self._save_process(vm)

    async def _relaunch(self, vm_id: str) -> _Vmm:
        """A new VMM (vCPUs stopped) from the saved spec, for a VM whose process is gone."""
        if self._host is None:
            await self.start()
        layout = VmLayout(self.vm_dir(vm_id))
        spec = load_spec(layout)
        old = self._vms.get(vm_id)
        if old is not None:
            await self._settle(old)  # its exit fully handled (TAP and cgroup released)
        # A VMM recorded for this VM that is still running (metald stopped mid-shutdown,
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

    def _files(self, spec: LaunchSpec, layout: VmLayout) -> tuple[VmmFiles, Path]:
        """The VMM's files as it names them, and its run directory's host path."""
        jailed = self.jail is not None
        files = vmm_files(
            spec, layout, self.driver.control_socket_name, jailed=jailed, agent=self.guest_agent
        )
        if jailed:
            return files, self._jail_place(spec.vm_id).host_path(str(files.run_dir))
        return files, layout.run_dir

    def _launch_context(self, spec: LaunchSpec, layout: VmLayout) -> LaunchContext:
        host = self.host
        files, host_run_dir = self._files(spec, layout)
        boot = GuestBoot(
            reboot=self.driver.guest_reboot_arg,
            on_shutdown=self.driver.guest_on_shutdown,
            accelerator=host.accelerator,
            tsc_khz=host.tsc_khz,
            agent=files.agent_socket is not None,
        )
        cmdline, dropped = kernel_cmdline_and_dropped(spec, boot)
        if dropped:
            log.warning(
                "VM %s: %d kernel argument(s) dropped, the command line would exceed %d bytes",
                spec.vm_id,
                len(dropped),
                MAX_KERNEL_CMDLINE,
            )
        uid, gid = (
            (self.jail.uid, self.jail.gid)
            if self.jail is not None
            else (os.geteuid(), os.getegid())
        )
        return LaunchContext(
            spec=spec,
            files=files,
            host_run_dir=host_run_dir,
            uid=uid,
            gid=gid,
            kernel_cmdline=cmdline,
        )

    async def _launch(self, spec: LaunchSpec, layout: VmLayout) -> _Vmm:
        """Start the VMM with its vCPUs stopped, connect, join its TAP, let the driver
        configure it. Leaves no process if it fails (the caller removes files)."""
        host = self.host
        if spec.nic is not None and self.jail is None:
            # Run directly, the VMM would look for the TAP in metald's own network namespace.
            raise BackendError(
                f"cannot start VM {spec.vm_id}: its network interface needs the jailer"
            )
        jail: JailSpec | None = None
        try:
            launch = self._launch_context(spec, layout)
            argv = self.driver.argv(host, launch)
            control_socket = launch.host_run_dir / self.driver.control_socket_name
            if self.jail is not None:
                jail = self._jail_for(spec, argv, plan_drives(spec, layout), launch.files)
            check_socket_path(control_socket)
        except ValueError as e:
            raise BackendError(f"cannot start VM {spec.vm_id}: {e}") from e
        if jail is not None:
            try:
                identity = await self._launch_jailed(jail, layout)
            except BackendError as e:
                raise BackendError(self._clean(e.message, spec, layout)) from None
        else:
            # A new run directory for every launch: nothing of the last VMM's is found there.
            await asyncio.to_thread(shutil.rmtree, layout.run_dir, ignore_errors=True)
            layout.run_dir.mkdir(mode=0o700)
            try:
                identity = ProcessIdentity(*spawn(argv, stderr_path=layout.stderr_log))
            except OSError as e:
                raise BackendError(f"cannot start {argv[0]}: {e.strerror or e}") from e
        vm = _Vmm(
            vm_id=spec.vm_id,
            layout=layout,
            identity=identity,
            accelerator=host.accelerator,
            control_socket=control_socket,
            owner_uid=launch.uid,
            host_run_dir=launch.host_run_dir,
            jail=jail,
        )
        vm.watch = ProcessWatch.open(identity, lambda status: self._on_exit(vm, status))
        self._vms[spec.vm_id] = vm
        try:
            if vm.watch is None:
                raise _StartFailed(f"{self.name} exited at once")
            self._save_process(vm)
            deadline = asyncio.get_running_loop().time() + self.start_timeout
            await self._connect(vm, deadline, launch)
            if spec.nic is not None and self._tap_callback is not None:
                try:
                    await self._tap_callback(spec.vm_id)
                except Exception as e:
                    message = e.message if isinstance(e, MetaldError) else str(e)
                    raise _StartFailed(f"its TAP could not be connected: {message}") from e
            control = self._control(vm)
            await control.prepare(launch)
            state = await control.runstate()
            if state is not VmState.CREATED:
                raise _StartFailed(f"{self.name} started in state {state}, not ready to boot")
        except BaseException as e:
            exited_itself = vm.watch is None or vm.watch.exited
            if vm.watch is not None:
                vm.expecting_exit = True
                await vm.watch.kill_and_wait()
                await self._settle(vm)
                vm.watch.close()
            await self._disconnect(vm)
            if self._vms.get(spec.vm_id) is vm:
                del self._vms[spec.vm_id]
            if jail is not None:
                with contextlib.suppress(BackendError):  # logged; destroy tries again
                    await self._remove_saved_jail(spec.vm_id, layout)
            if not isinstance(e, Exception):
                raise
            # A VMM that ended by itself says most in its first error line (bad kernel,
            # missing file, ...); otherwise what failed here (a refused API call, say) does.
            said = e.message if isinstance(e, MetaldError) else str(e)
            first_line = self._first_line(layout.stderr_log, argv[0]) if exited_itself else ""
            detail = first_line or said
            message = f"{self.name} failed to start VM {spec.vm_id}: {detail}"
            raise BackendError(self._clean(message, spec, layout)) from None
        vm.starting = False
        return vm

    def _jail_place(self, vm_id: str) -> JailSpec:
        """Where a VM's jail is (paths only)."""
        settings = self.jail
        assert settings is not None
        return JailSpec(
            vm_id=vm_id,
            uid=settings.uid,
            gid=settings.gid,
            argv=("/",),
            backend=self.name,
            jail_base=str(settings.chroot_base),
        )

    def _jail_for(
        self, spec: LaunchSpec, argv: list[str], drives: list[Drive], files: VmmFiles
    ) -> JailSpec:
        """The jail one VMM process of this VM runs in."""
        settings = self.jail
        assert settings is not None
        placed = [PlacedFile(str(spec.kernel), str(files.kernel))]
        if spec.initrd is not None and files.initrd is not None:
            placed.append(PlacedFile(str(spec.initrd), str(files.initrd)))
        for host_drive, inside in zip(drives, files.drives, strict=True):
            placed.append(
                PlacedFile(str(host_drive.source), str(inside.path), read_only=host_drive.read_only)
            )
        nic = spec.nic
        host = self.host
        return replace(
            self._jail_place(spec.vm_id),
            argv=tuple(argv),
            netns=None if nic is None else nic.netns,
            tap=None if nic is None else TapSpec(nic.tap),
            files=tuple(placed),
            devices=vmm_devices(
                kvm=host.needs_kvm or host.accelerator == "kvm", tap=nic is not None
            ),
            host_paths=host.jail_paths,
            cgroup=settings.cgroup(memory_bytes=spec.memory_bytes, vcpu_count=spec.vcpu_count),
        )

    async def _launch_jailed(self, jail: JailSpec, layout: VmLayout) -> ProcessIdentity:
        """Run the jailer; its JailSpec is saved first, so a metald stopped at any point
        finds the jail again."""
        save_jail_spec(layout.jail_spec_file, jail)
        with contextlib.suppress(FileNotFoundError):
            layout.stderr_log.unlink()  # the jailer appends: one VMM's messages only
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
            "VM %s: jailed %s pid %d in %.1f ms",
            jail.vm_id,
            self.name,
            jailed.pid,
            jailed.launch_seconds * 1000,
        )
        return jailed.identity

    async def _connect(self, vm: _Vmm, deadline: float, launch: LaunchContext | None) -> None:
        """Connect to the VMM's control socket, waiting while the VMM is still creating it
        (the file appears at bind(), connections are refused until listen()).

        The socket is opened without following symlinks and must be a socket owned by the
        VMM's user (host/sockets.py); the driver connects through /proc/self/fd to that very
        inode, held open until the connection is dropped."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                fd: int | None = open_socket_path(vm.control_socket, vm.owner_uid)
            except FileNotFoundError:
                fd = None
            except UnsafeSocket as e:
                raise _StartFailed(f"cannot connect to its control socket: {e.strerror}") from None
            except OSError as e:
                raise _StartFailed(
                    f"cannot connect to its control socket: {e.strerror or e}"
                ) from None
            if fd is not None:
                if await _accepts(fd_path(fd), max(0.1, deadline - loop.time())):
                    break
                os.close(fd)
            if vm.watch is None or vm.watch.exited:
                raise _StartFailed(f"{self.name} exited while starting")
            if loop.time() > deadline:
                raise _StartFailed(
                    f"its control socket was not ready after {self.start_timeout:g} s"
                )
            await asyncio.sleep(0.01)
        vm.socket_fd = fd
        try:
            vm.control = await self.driver.connect(
                vm.vm_id,
                fd_path(fd),
                host_run_dir=vm.host_run_dir,
                uid=vm.owner_uid,
                launch=launch,
                timeout=max(0.1, deadline - loop.time()),
            )
        except BaseException:
            os.close(fd)
            vm.socket_fd = None
            raise

    async def _disconnect(self, vm: _Vmm) -> None:
        if vm.control is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(vm.control.close(), 2.0)
        if vm.socket_fd is not None:
            os.close(vm.socket_fd)
            vm.socket_fd = None

    # ---------------------------------------------------------------- operations

    async def pause(self, vm_id: str) -> None:
        await self._control(self._live(vm_id)).pause()

    async def resume(self, vm_id: str) -> None:
        await self._control(self._live(vm_id)).resume()

    async def reboot(self, vm_id: str) -> ProcessIdentity:
        """A guest-visible hard reset: in place, or, where a guest reset ends the VMM, a
        new process from the same spec and disks. Returns the VMM's identity."""
        vm = self._live(vm_id)
        if not self.driver.reboot_needs_new_process:
            await self._control(vm).reset()
            return vm.identity
        vm.expecting_exit = True
        await self._kill_vm(vm)
        new = await self._relaunch(vm_id)
        await self._control(new).start_vcpus()
        self._booted(new)
        return new.identity

    async def shutdown(self, vm_id: str, *, timeout: float, force: bool) -> str:
        """Graceful: ask the guest to stop, wait up to `timeout` for the VMM to exit, then
        SIGKILL. A paused VM is resumed first (a stopped guest cannot run its shutdown path);
        one whose vCPUs never started has no guest to ask and is killed."""
        vm = self._vms.get(vm_id)
        if vm is None or vm.watch is None or vm.watch.exited:
            # Already gone: graceful only if the guest itself ended it.
            if vm is not None:
                await self._settle(vm)
            return "graceful" if vm is not None and vm.exit_by_guest else "forced"
        vm.expecting_exit = True
        how = "forced"
        try:
            if not force and vm.control is not None:
                try:
                    state = await vm.control.runstate()
                    if state is VmState.PAUSED:
                        await vm.control.resume()
                        state = VmState.RUNNING
                    if state is VmState.RUNNING and await self._ask_guest_to_stop(vm, timeout):
                        how = "graceful"
                except BackendError as e:
                    if not vm.watch.exited:
                        log.warning("graceful shutdown of %s failed, killing it: %s", vm_id, e)
            await self._kill_vm(vm)
        finally:
            # Interrupted (cancelled) with the VMM still up: its exit is news again.
            if not vm.watch.exited:
                vm.expecting_exit = False
                if vm.control is not None:
                    with contextlib.suppress(BackendError):
                        await vm.control.stop_abandoned()
        return how

    async def _ask_guest_to_stop(self, vm: _Vmm, timeout: float) -> bool:
        """Ctrl-Alt-Del until the VMM exits or `timeout` passes.

        Sent again after CAD_REPEAT_SECONDS, then after twice as long each time (at most
        CAD_REPEAT_MAX_SECONDS): a guest still booting (just created or rebooted) loses the
        keys until its keyboard driver and its init's trap are up, and one that takes them
        before its init has told the kernel otherwise resets itself and starts booting
        again. Repeating at a fixed 2 s kept a slow guest (TCG on a busy host: 8 s and more
        to its init) resetting until the timeout; growing gaps let it reach its init
        between two presses. A guest already shutting down ignores repeats."""
        watch = vm.watch
        assert watch is not None  # the caller checked: a live, watched VMM
        deadline = time.monotonic() + timeout
        gap = CAD_REPEAT_SECONDS
        while True:
            await self._control(vm).ask_guest_to_stop()
            left = deadline - time.monotonic()
            if await watch.wait(min(gap, max(left, 0.0))):
                return True
            if time.monotonic() >= deadline:
                return False
            gap = min(gap * 2, CAD_REPEAT_MAX_SECONDS)

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
        """Kill the recorded VMM (when provably ours), remove the VM's jail (TAP, cgroup,
        jail directory), then its directory. A jail that cannot be removed entirely keeps
        the directory (and with it jail.json, for the next try) and raises BackendError."""
        recorded = load_process(layout)
        if recorded is not None and self._provably_ours(recorded.identity, layout):
            await _kill(recorded.identity)
        await self._remove_saved_jail(vm_id, layout)
        await asyncio.to_thread(shutil.rmtree, layout.dir, ignore_errors=True)

    # ---------------------------------------------------------------- restart

    async def adopt(self, vm_id: str, identity: ProcessIdentity) -> VmState | None:
        """Re-attach to a VMM left by an earlier metald. If it is gone, or does not answer on
        its control socket, or is in a state it cannot carry on from, the process (when
        provably ours) is killed, its runtime files go and None is returned. spec.json, the
        disks and the console log stay: the VM is SHUTDOWN now, and `boot` can start it
        again."""
        if self._host is None:
            await self.start()
        try:
            layout = VmLayout(self.vm_dir(vm_id))
        except ValueError:
            return None
        current = self._vms.get(vm_id)
        if current is not None and current.alive:
            return await self._control(current).runstate()
        if not (is_alive(identity) and self._provably_ours(identity, layout)):
            # process.json may name a newer VMM than the store does (metald stopped between
            # starting it and recording it): nobody knows it, so it goes too.
            await self._discard_runtime(layout)
            return None
        recorded = load_process(layout)
        jail = self._saved_jail(layout)
        _, control_socket = self._host_files(vm_id, layout)
        vm = _Vmm(
            vm_id=vm_id,
            layout=layout,
            identity=identity,
            accelerator=recorded.accelerator if recorded is not None else self.accelerator(),
            control_socket=control_socket,
            owner_uid=jail.uid if jail is not None else os.geteuid(),
            host_run_dir=control_socket.parent,
            jail=jail,
        )
        if recorded is not None and recorded.identity == identity:
            vm.booted_at = recorded.booted_at
        vm.watch = ProcessWatch.open(identity, lambda status: self._on_exit(vm, status))
        if vm.watch is None:
            await self._discard_runtime(layout)
            return None
        self._vms[vm_id] = vm
        state: VmState | None = None
        try:
            await self._connect(vm, asyncio.get_running_loop().time() + self.control_timeout, None)
            state = await self._control(vm).runstate()
        except (_StartFailed, BackendError) as e:
            log.warning("cannot adopt VM %s: %s", vm_id, e)
        if state is None:
            vm.expecting_exit = True
            await vm.watch.kill_and_wait()
            await self._settle(vm)  # its exit handler released the TAP and cgroup
            vm.watch.close()
            await self._disconnect(vm)
            self._vms.pop(vm_id, None)
            remove_process(layout)
            return None
        vm.starting = False
        self._save_process(vm)
        return state

    async def remove_orphans(self, known_vm_ids: set[str]) -> list[str]:
        """Directories under vm_root that no known VM owns and that are this backend's (or
        nobody's): their VMM is killed when process.json names a live process that is provably
        this VM's (its root is the VM's jail, or its command line names the VM's socket;
        anything less is not provably ours and is left alone, directory included), then its
        jail and the directory go. Then, when jailing, jail directories and VM cgroups of VMs
        that are neither known nor have a directory left (metald.backends.vmm.jail)."""
        removed: list[str] = []
        if self.vm_root.is_dir():
            removed = await self._remove_orphan_dirs(known_vm_ids)
        if self.jail is not None:
            keep = known_vm_ids | set(self._vms) | set(self._vm_dir_names())
            for name in await remove_orphan_jails(self.jail, self.name, keep):
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
            recorded = load_process(layout)
            if recorded is not None and is_alive(recorded.identity):
                if not self._provably_ours(recorded.identity, layout):
                    log.warning("orphan %s: pid %d is not provably ours; left", name, recorded.pid)
                    continue
                await _kill(recorded.identity)
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
        process started), RSS, disk counters from the driver, seconds since boot. Zeros
        when no VMM process runs."""
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
        io = None
        if vm.control is not None:
            try:
                io = await vm.control.io_stats()
            except BackendError as e:
                log.debug("VM %s: no I/O counters: %s", vm_id, e.message)
        uptime = int(time.time() - vm.booted_at) if vm.booted_at is not None else 0
        return VmUsage(
            cpu_time_ns=cpu_ns,
            cpu_usage_percent=max(0.0, percent),
            memory_bytes=read_rss_bytes(vm.identity.pid),
            disk_read_bytes=io.disk_read_bytes if io else 0,
            disk_write_bytes=io.disk_write_bytes if io else 0,
            disk_read_ops=io.disk_read_ops if io else 0,
            disk_write_ops=io.disk_write_ops if io else 0,
            uptime_seconds=max(0, uptime),
        )

    def info(self, vm_id: str) -> dict[str, str]:
        try:
            layout = VmLayout(self.vm_dir(vm_id))
        except ValueError:
            return {}
        vm = self._vms.get(vm_id)
        console_log, control_socket = self._host_files(vm_id, layout)
        host = self._host
        result = {
            "accelerator": vm.accelerator if vm is not None else (host.accelerator if host else ""),
            "console_log": str(console_log),
            self.driver.info_socket_key: str(control_socket),
        }
        if self.guest_agent:
            result["agent_socket"] = str(control_socket.with_name(AGENT_SOCKET))
        if host is not None and host.version:
            result[f"{self.name}_version"] = host.version
        if vm is not None and vm.alive:
            result["pid"] = str(vm.identity.pid)
        if vm is not None and vm.exit_reason is not None:
            result["exit_reason"] = vm.exit_reason
        return result

    async def console(self, vm_id: str, offset: int, max_bytes: int) -> ConsoleChunk:
        """The console log of the VM's VMM (the running one, else the last one); see
        backends/vmm/console.py for how it is read."""
        try:
            layout = VmLayout(self.vm_dir(vm_id))
        except ValueError:
            return ConsoleChunk(data=b"", offset=0, next_offset=0, size=0)
        console_log, _ = self._host_files(vm_id, layout)
        try:
            return await asyncio.to_thread(read_console, console_log, offset, max_bytes)
        except (UnsafeConsole, OSError) as e:
            log.warning("VM %s: console log %s not read: %s", vm_id, console_log, e)
            raise BackendError(f"VM {vm_id}: its console log cannot be read") from None

    async def close(self) -> None:
        """Disconnect from every VMM and stop watching; the processes keep running."""
        vms = list(self._vms.values())
        self._vms.clear()
        for vm in vms:
            if vm.watch is not None:
                vm.watch.detach()
            await self._disconnect(vm)
            vm.control = None
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # ---------------------------------------------------------------- exits

    def _on_exit(self, vm: _Vmm, status: ExitStatus | None) -> None:
        """Called from the event loop the moment the VMM process is seen to exit."""
        vm.exit_task = self._spawn_task(self._handle_exit(vm, status))

    async def _handle_exit(self, vm: _Vmm, status: ExitStatus | None) -> None:
        event = None
        if vm.control is not None:
            # Closing reads what the VMM sent before it went (QEMU's SHUTDOWN event).
            await self._disconnect(vm)
            event = vm.control.exit_event()
            vm.control = None
        else:
            await self._disconnect(vm)
        report = self.driver.describe_exit(
            event, status, self._first_line(vm.layout.stderr_log, self.host.binary)
        )
        vm.exit_reason, vm.exit_by_guest = report.reason, report.by_guest
        if self._vms.get(vm.vm_id) is vm:
            self._remove_runtime_files(vm)
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

    async def _kill_vm(self, vm: _Vmm) -> None:
        """SIGKILL the VM's VMM (through its pidfd) and wait until the exit is handled."""
        if vm.watch is not None and not vm.watch.exited and not await vm.watch.kill_and_wait():
            raise BackendError(f"VM {vm.vm_id}: its VMM did not exit after SIGKILL")
        await self._settle(vm)

    async def _settle(self, vm: _Vmm) -> None:
        """Wait until an exit has been fully handled (control closed, runtime files gone)."""
        if vm.watch is not None and vm.watch.exited and vm.exit_task is not None:
            await asyncio.shield(vm.exit_task)

    def _spawn_task(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ---------------------------------------------------------------- helpers

    def _live(self, vm_id: str) -> _Vmm:
        vm = self._vms.get(vm_id)
        if vm is None or not vm.alive or vm.control is None:
            raise BackendError(f"VM {vm_id} has no running VMM")
        return vm

    def _control(self, vm: _Vmm) -> VmmControl:
        if vm.control is None:
            raise BackendError(f"VM {vm.vm_id} has no control connection")
        return vm.control

    def _save_process(self, vm: _Vmm) -> None:
        save_process(
            vm.layout,
            ProcessRecord(
                pid=vm.identity.pid,
                start_time=vm.identity.start_time,
                accelerator=vm.accelerator,
                booted_at=vm.booted_at,
            ),
        )

    def _provably_ours(self, identity: ProcessIdentity, layout: VmLayout) -> bool:
        """Same pid and start time, and: jailed, its root is this VM's jail root; run
        directly, its command line names this VM's control socket."""
        if not is_alive(identity):
            return False
        jail = self._saved_jail(layout)
        if jail is not None:
            return rooted_at(identity, jail.jail_root)
        needle = str(layout.run_dir / self.driver.control_socket_name)
        return any(needle in arg for arg in read_cmdline(identity.pid))

    def _saved_jail(self, layout: VmLayout) -> JailSpec | None:
        return load_jail_spec(layout.jail_spec_file, layout.vm_id, self.name)

    async def _discard_runtime(self, layout: VmLayout) -> None:
        """Kill the VMM that process.json names, if it is provably ours; forget it; release
        its jail's TAP and cgroup (its jail directory stays)."""
        recorded = load_process(layout)
        if recorded is not None and self._provably_ours(recorded.identity, layout):
            await _kill(recorded.identity)
        remove_process(layout)
        await asyncio.to_thread(shutil.rmtree, layout.run_dir, ignore_errors=True)
        jail = self._saved_jail(layout)
        if jail is not None:
            try:
                await release_jail(jail, keep_dir=True)
            except JailerError as e:
                log.warning("VM %s: %s", layout.vm_id, e.message)

    async def _remove_saved_jail(self, vm_id: str, layout: VmLayout) -> None:
        """Remove the VM's last jail entirely (its VMM has exited or been killed): the one
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
                await remove_jail_at(self.jail, self.name, vm_id)
            except JailerError as e:
                log.warning("VM %s: %s", vm_id, e.message)
                raise BackendError(f"VM {vm_id}: its jail could not be removed entirely") from None
        with contextlib.suppress(FileNotFoundError):
            layout.jail_spec_file.unlink()

    def _remove_runtime_files(self, vm: _Vmm) -> None:
        remove_process(vm.layout)
        if vm.jail is None:
            shutil.rmtree(vm.layout.run_dir, ignore_errors=True)

    def _first_line(self, path: Path, binary: str) -> str:
        """The first meaningful line the VMM wrote to stderr (warnings skipped if there is
        more), without its "<program>: " prefix."""
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read(64 * 1024)
        except OSError:
            return ""
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        errors = [ln for ln in lines if "warning:" not in ln.lower()]
        line = (errors or lines or [""])[0]
        prefix = os.path.basename(binary) + ": "
        return line[len(prefix) :] if line.startswith(prefix) else line

    def _clean(self, message: str, spec: LaunchSpec, layout: VmLayout) -> str:
        """Drop host directory prefixes from a message (file names are kept)."""
        dirs: set[str] = {str(layout.dir), str(self.vm_root)}
        if self.jail is not None:
            jail_dir = self.jail.backend_dir(self.name) / spec.vm_id
            dirs |= {str(jail_dir / "root"), str(jail_dir), str(self.jail.chroot_base)}
        for path in _spec_paths(spec):
            dirs.add(str(path.parent))
        for d in sorted(dirs, key=len, reverse=True):
            if d and d != "/":
                message = message.replace(d + "/", "").replace(d, "")
        return message


def _spec_paths(spec: LaunchSpec) -> Iterable[Path]:
    yield spec.kernel
    if spec.initrd is not None:
        yield spec.initrd
    for disk in spec.disks:
        yield disk.path


async def _accepts(path: str, timeout: float) -> bool:
    """Whether a Unix socket at `path` accepts a connection now (False while the VMM has
    bound it but not yet listens)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, path), timeout)
    except (FileNotFoundError, ConnectionRefusedError, TimeoutError):
        return False
    except OSError as e:
        raise _StartFailed(f"cannot connect to its control socket: {e}") from e
    finally:
        sock.close()
    return True


async def _kill(identity: ProcessIdentity) -> None:
    try:
        await kill_identity(identity)
    except TimeoutError as e:
        raise BackendError(f"VMM process {identity.pid} did not exit after SIGKILL") from e

"""The VMM runtime: the Backend port (metald.core.ports.Backend) for any VMM, written once.

A driver (backends/vmm/driver.py) supplies what is particular to a VMM — its command line,
its control connection and a handful of verbs. Everything else is the runtime's, one job to a
module of backends/vmm/:

- context.py: what the parts share (the driver, where VMs and jails live, the jail settings,
  timeouts, the host found at start-up) and the start-up checks, among them the control
  socket's path budget (AF_UNIX);
- process.py: the record of one VMM process, and the table of them (this class owns it);
- launch.py: starting a VMM with its vCPUs stopped, jailed (the daemon always jails when it
  runs as root) or run directly (development hosts and tests; no networking); control.py:
  connecting to its control socket;
- supervision.py: the pidfd watch, exits (an exit metald did not ask for goes to the exit
  callback with the driver's reason), kills;
- adoption.py: adoption after a restart and orphan removal; cleanup.py: removing what a VM
  leaves, and only what is provably its;
- usage.py: CPU time and memory from /proc, disk counters from the driver; messages.py: the
  text a caller gets (host paths stripped);
- the VM's directory and files (layout.py, records.py), disk copies (disks.py), the guest's
  kernel command line and its budget (cmdline.py), the backends' side of jails (jail.py).

This class is the port's surface: it checks a request, runs the verbs on the VMM's control
and hands the rest to those parts.

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
import re
import time
from collections.abc import Callable
from pathlib import Path

from metald.backends.vmm.adoption import Adopter
from metald.backends.vmm.cleanup import remove_vm_files
from metald.backends.vmm.console import UnsafeConsole, read_console
from metald.backends.vmm.context import LogCaps, VmmContext
from metald.backends.vmm.disks import copy_writable_disks
from metald.backends.vmm.driver import VmmDriver, VmmHost
from metald.backends.vmm.jail import JailSettings
from metald.backends.vmm.launch import Launcher
from metald.backends.vmm.layout import AGENT_SOCKET, VmLayout
from metald.backends.vmm.logcaps import CappedFile, LogCapper
from metald.backends.vmm.messages import clean_message
from metald.backends.vmm.process import VmmProcess, VmmTable
from metald.backends.vmm.records import save_spec, sync_in_background
from metald.backends.vmm.supervision import Supervisor
from metald.backends.vmm.usage import (
    IO_MAX_AGE_SECONDS,
    USAGE_MAX_AGE_SECONDS,
    fresh_usage,
    latest_usage,
)
from metald.backends.vmm.usage import (
    sample_usage as sample_now,
)
from metald.core import timing
from metald.core.errors import BackendError, InvalidArgument, ResourceExhausted
from metald.core.models import ConsoleChunk, LaunchSpec, ProcessIdentity, VmUsage
from metald.core.ports import ExitCallback, JailIds, TapCallback
from metald.core.states import VmState
from metald.jailer.spec import JailSpec

log = logging.getLogger(__name__)

CAD_REPEAT_SECONDS = 2.0
CAD_REPEAT_MAX_SECONDS = 16.0


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
        jail_ids: JailIds | None = None,
        log_caps: LogCaps | None = None,
        usage_max_age: float = USAGE_MAX_AGE_SECONDS,
        io_max_age: float = IO_MAX_AGE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`jail`: launch every VMM through the jailer with these settings (needs root); None
        runs VMMs directly as metald's own user, without networking (for hosts and tests that
        cannot jail). `guest_agent`: a second serial port wired to agent.sock beside the
        control socket, and the guest told to run a shell on it (tests; QEMU only).
        `jail_ids`: where each VM's own VMM uid is claimed (needed when `jail` has a uid
        range). `log_caps`: the console log's and stderr's caps (logcaps.py).
        `usage_max_age`: how old a usage sample usage() hands out may be (usage.py);
        `clock` measures that age (monotonic seconds). `io_max_age`: how old the disk
        counters of a sample may be (a VMM round trip each: usage.py)."""
        self._usage_max_age = usage_max_age
        self._io_max_age = io_max_age
        self._clock = clock
        pattern = getattr(driver, "vcpu_thread", "")
        self._vcpu_thread = re.compile(pattern) if pattern else None
        self._ctx = VmmContext(
            driver,
            vm_root,
            jail=jail,
            guest_agent=guest_agent,
            start_timeout=start_timeout,
            control_timeout=control_timeout,
            jail_ids=jail_ids,
            log_caps=log_caps,
        )
        self._log_capper = LogCapper(self._capped_files, self._ctx.log_caps.interval)
        self._vms: VmmTable = {}
        self._supervisor = Supervisor(self._ctx, self._vms)
        self._launcher = Launcher(self._ctx, self._vms, self._supervisor)
        self._adopter = Adopter(self._ctx, self._vms, self._supervisor)

    @property
    def name(self) -> str:
        return self._ctx.name

    @property
    def driver(self) -> VmmDriver:
        return self._ctx.driver

    @property
    def jail(self) -> JailSettings | None:
        return self._ctx.jail

    @property
    def host(self) -> VmmHost:
        return self._ctx.host

    # ---------------------------------------------------------------- set-up

    async def start(self) -> None:
        """Check the host through the driver, the jail base and the socket budget; make
        vm_root. Starts trimming the VMMs' console logs and stderr files."""
        await self._ctx.start()
        self._log_capper.start()

    def _capped_files(self) -> list[CappedFile]:
        """The files of every live VMM that metald keeps bounded: the console log (the VMM's
        own file) and its stderr (metald made it for the VMM)."""
        caps = self._ctx.log_caps
        files = []
        for vm in list(self._vms.values()):
            if not vm.alive:
                continue
            console, _ = self._ctx.host_files(vm, vm.layout)
            files.append(CappedFile(console, caps.console_bytes, vm.owner_uid))
            files.append(CappedFile(vm.layout.stderr_log, caps.stderr_bytes, os.geteuid()))
        return files

    def set_exit_callback(self, callback: ExitCallback) -> None:
        self._supervisor.exit_callback = callback

    def set_tap_callback(self, callback: TapCallback | None) -> None:
        """Called with the VM id each time a VMM of a VM with a NIC has started (its vCPUs
        still stopped), once the jailer has made the VM's TAP: create, and boot after a
        shutdown (every VMM gets a new TAP). Connect the TAP to the VM's network there; the
        guest runs only after it returns. An exception fails that launch (the VMM and its
        jail go) with a BackendError."""
        self._launcher.tap_callback = callback

    def accelerator(self) -> str:
        return self.host.accelerator

    def vm_dir(self, vm_id: str) -> Path:
        return self._ctx.vm_dir(vm_id)

    def jail_spec(self, vm_id: str) -> JailSpec | None:
        """The jail of the VM's VMM (the running one, else the last one), None if the VM was
        not jailed."""
        return self._ctx.jail_of(self._vms.get(vm_id), VmLayout(self.vm_dir(vm_id)))

    # ---------------------------------------------------------------- create / boot

    async def create(self, spec: LaunchSpec) -> ProcessIdentity:
        ctx = self._ctx
        await ctx.ensure_started()
        try:
            layout = VmLayout(self.vm_dir(spec.vm_id))
        except ValueError as e:
            raise InvalidArgument("vm_id", str(e)) from e
        if len(spec.vm_id) > ctx.max_vm_id():
            raise InvalidArgument(
                "vm_id",
                f"at most {ctx.max_vm_id()} characters on this host (Unix socket path limit)",
            )
        if spec.nic is not None and ctx.jail is None:
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
            with timing.step("disks"):
                await copy_writable_disks(spec, layout)
                save_spec(layout, spec, sync=False)
            # Flushed to disk while the VMM starts; durable before the create answers.
            spec_saved = sync_in_background(layout.spec_file)
            vm = await self._launcher.launch(spec, layout)
            with timing.step("sync"):
                await spec_saved
        except BaseException as e:
            try:
                await remove_vm_files(ctx, spec.vm_id, layout)
            except BackendError as cleanup_error:
                log.warning("VM %s: %s", spec.vm_id, cleanup_error.message)
            if isinstance(e, BackendError):
                raise BackendError(clean_message(ctx, e.message, spec, layout)) from None
            if isinstance(e, ResourceExhausted):
                raise  # no jail id left: the caller's answer as it is
            if isinstance(e, Exception):
                message = f"could not create VM {spec.vm_id}: {e}"
                raise BackendError(clean_message(ctx, message, spec, layout)) from None
            raise
        return vm.identity

    async def boot(self, vm_id: str) -> ProcessIdentity:
        vm = self._vms.get(vm_id)
        if vm is None or not vm.alive:
            vm = await self._launcher.relaunch(vm_id)
        control = vm.connected_control()
        state = await control.runstate()
        if state is VmState.CREATED:
            await control.start_vcpus()
        elif state is VmState.PAUSED:
            await control.resume()
        elif state is not VmState.RUNNING:
            raise BackendError(f"cannot boot VM {vm_id}: its VMM cannot carry on")
        vm.mark_booted()
        return vm.identity

    # ---------------------------------------------------------------- operations

    async def pause(self, vm_id: str) -> None:
        await self._live(vm_id).connected_control().pause()

    async def resume(self, vm_id: str) -> None:
        await self._live(vm_id).connected_control().resume()

    async def reboot(self, vm_id: str) -> ProcessIdentity:
        """A guest-visible hard reset: in place, or, where a guest reset ends the VMM, a
        new process from the same spec and disks. Returns the VMM's identity."""
        vm = self._live(vm_id)
        if not self.driver.reboot_needs_new_process:
            await vm.connected_control().reset()
            return vm.identity
        vm.expecting_exit = True
        await self._supervisor.kill(vm)
        new = await self._launcher.relaunch(vm_id)
        await new.connected_control().start_vcpus()
        new.mark_booted()
        return new.identity

    async def shutdown(self, vm_id: str, *, timeout: float, force: bool) -> str:
        """Graceful: ask the guest to stop, wait up to `timeout` for the VMM to exit, then
        SIGKILL. A paused VM is resumed first (a stopped guest cannot run its shutdown path);
        one whose vCPUs never started has no guest to ask and is killed."""
        vm = self._vms.get(vm_id)
        if vm is None or vm.watch is None or vm.watch.exited:
            # Already gone: graceful only if the guest itself ended it.
            if vm is not None:
                await self._supervisor.settle(vm)
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
            await self._supervisor.kill(vm)
        finally:
            # Interrupted (cancelled) with the VMM still up: its exit is news again.
            if not vm.watch.exited:
                vm.expecting_exit = False
                if vm.control is not None:
                    with contextlib.suppress(BackendError):
                        await vm.control.stop_abandoned()
        return how

    async def _ask_guest_to_stop(self, vm: VmmProcess, timeout: float) -> bool:
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
            await vm.connected_control().ask_guest_to_stop()
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
            await self._supervisor.kill(vm)
            if vm.watch is not None:
                vm.watch.close()
        await remove_vm_files(self._ctx, vm_id, layout)

    # ---------------------------------------------------------------- restart

    async def adopt(self, vm_id: str, identity: ProcessIdentity) -> VmState | None:
        """Re-attach to a VMM left by an earlier metald (adoption.py); None if it cannot
        carry on (it is gone now: the VM is SHUTDOWN, `boot` starts it again)."""
        return await self._adopter.adopt(vm_id, identity)

    async def remove_orphans(self, known_vm_ids: set[str]) -> list[str]:
        """Remove directories, jails and cgroups no known VM owns (adoption.py); their names."""
        return await self._adopter.remove_orphans(known_vm_ids)

    # ---------------------------------------------------------------- observation

    async def usage(self, vm_id: str) -> VmUsage:
        """CPU time and share, RSS, disk counters, seconds since boot (usage.py), sampled
        at most `usage_max_age` seconds ago; zeros when no VMM process runs."""
        return await latest_usage(
            self._vms.get(vm_id),
            self._usage_max_age,
            self._clock,
            self._vcpu_thread,
            self._io_max_age,
        )

    async def sample_usage(self, vm_id: str, *, exact: bool = False) -> VmUsage:
        """A usage sample taken now, which usage() then hands out: the hook for a
        periodic collector (metering). Its disk counters are at most `io_max_age` old,
        unless `exact` (a VM's final sample before it stops): then all are read now."""
        vm = self._vms.get(vm_id)
        if exact:
            return await sample_now(vm, self._vcpu_thread, 0.0)
        return await fresh_usage(
            vm, self._usage_max_age, self._clock, self._vcpu_thread, self._io_max_age
        )

    def info(self, vm_id: str) -> dict[str, str]:
        """What a running VMM's info holds does not change while it runs (its paths, pid,
        accelerator, version): made once per process, as GetVmInfo asks for it each call."""
        vm = self._vms.get(vm_id)
        if vm is not None and vm.info is not None and vm.alive:
            return dict(vm.info)
        try:
            layout = VmLayout(self.vm_dir(vm_id))
        except ValueError:
            return {}
        console_log, control_socket = self._ctx.host_files(vm, layout)
        host = self._ctx.found_host
        result = {
            "accelerator": vm.accelerator if vm is not None else (host.accelerator if host else ""),
            "console_log": str(console_log),
            self._ctx.driver.info_socket_key: str(control_socket),
        }
        if self._ctx.guest_agent:
            result["agent_socket"] = str(control_socket.with_name(AGENT_SOCKET))
        if host is not None and host.version:
            result[f"{self.name}_version"] = host.version
        if vm is not None and vm.alive:
            result["pid"] = str(vm.identity.pid)
        if vm is not None and vm.exit_reason is not None:
            result["exit_reason"] = vm.exit_reason
        if vm is not None and vm.alive and vm.exit_reason is None:
            vm.info = dict(result)
        return result

    async def console(self, vm_id: str, offset: int, max_bytes: int) -> ConsoleChunk:
        """The console log of the VM's VMM (the running one, else the last one); see
        backends/vmm/console.py for how it is read."""
        try:
            layout = VmLayout(self.vm_dir(vm_id))
        except ValueError:
            return ConsoleChunk(data=b"", offset=0, next_offset=0, size=0)
        console_log, _ = self._ctx.host_files(self._vms.get(vm_id), layout)
        try:
            return await asyncio.to_thread(read_console, console_log, offset, max_bytes)
        except (UnsafeConsole, OSError) as e:
            log.warning("VM %s: console log %s not read: %s", vm_id, console_log, e)
            raise BackendError(f"VM {vm_id}: its console log cannot be read") from None

    async def close(self) -> None:
        """Disconnect from every VMM and stop watching; the processes keep running."""
        await self._log_capper.stop()
        await self._supervisor.close()
        if self._ctx.spares is not None:
            self._ctx.spares.close()

    def _live(self, vm_id: str) -> VmmProcess:
        vm = self._vms.get(vm_id)
        if vm is None or not vm.alive or vm.control is None:
            raise BackendError(f"VM {vm_id} has no running VMM")
        return vm

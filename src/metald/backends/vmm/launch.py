"""Launching one VMM process of a VM, with its vCPUs stopped, ready to boot.

A launch builds what the driver works from (the VMM's files as it names them, the guest's
kernel command line within its budget, the user it runs as: a LaunchContext), then starts
the VMM one of two ways:
- jailed (when `jail` is given; the daemon always jails when it runs as root): the jailer
  (metald.jailer) starts it unprivileged, in its own mount namespace with
  `<chroot_base>/<driver>/<vm_id>/root` as its root, in the VM's cgroup and, for a VM with a
  NIC, inside the VM's network namespace with its TAP. The jail holds the kernel (/vmlinux),
  initrd (/initrd), disks (/disk<N>.img: the VM directory's writable copy, handed to the jail
  user, or the read-only original), the VMM's binary, libraries and firmware (read-only), a
  few device nodes and a writable /run where the VMM makes its control socket and the console
  log; metald reaches them at `<jail root>/run/`. The JailSpec is saved (jail.json) before
  the jailer runs, so a metald stopped at any point finds the jail again;
- directly, as metald's own user, with its files in the VM directory (development hosts and
  tests that cannot jail; no networking).
Then it connects to the control socket within the start deadline, lets the TAP callback put
the VM's TAP on its network, and has the driver configure the VMM. A launch that fails
leaves no process and no jail; its message is cleaned of host paths.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
from dataclasses import replace
from pathlib import Path

from metald.backends.vmm.cleanup import discard_runtime, remove_saved_jail
from metald.backends.vmm.cmdline import MAX_KERNEL_CMDLINE, GuestBoot, kernel_cmdline_and_dropped
from metald.backends.vmm.context import VmmContext
from metald.backends.vmm.control import connect_control
from metald.backends.vmm.driver import Drive, LaunchContext, VmmFiles
from metald.backends.vmm.jail import save_jail_spec
from metald.backends.vmm.layout import VmLayout, check_socket_path, plan_drives, vmm_files
from metald.backends.vmm.messages import clean_message, first_stderr_line
from metald.backends.vmm.process import StartFailed, VmmProcess, VmmTable
from metald.backends.vmm.records import load_spec, sync_in_background
from metald.backends.vmm.supervision import Supervisor
from metald.core import timing
from metald.core.errors import BackendError, MetaldError
from metald.core.models import LaunchSpec, ProcessIdentity
from metald.core.ports import TapCallback
from metald.core.states import VmState
from metald.host.process import spawn
from metald.jailer.errors import JailerError
from metald.jailer.host import vmm_devices
from metald.jailer.launch import launch_jailed
from metald.jailer.spec import JailSpec, PlacedFile, TapSpec

log = logging.getLogger(__name__)


class Launcher:
    """Starts VMM processes and adds them to the runtime's table."""

    def __init__(self, ctx: VmmContext, vms: VmmTable, supervisor: Supervisor) -> None:
        self._ctx = ctx
        self._vms = vms
        self._supervisor = supervisor
        self.tap_callback: TapCallback | None = None
        self._cgroup_noted = False

    async def relaunch(self, vm_id: str) -> VmmProcess:
        """A new VMM (vCPUs stopped) from the saved spec, for a VM whose process is gone."""
        ctx = self._ctx
        await ctx.ensure_started()
        layout = VmLayout(ctx.vm_dir(vm_id))
        spec = load_spec(layout)
        old = self._vms.get(vm_id)
        if old is not None:
            await self._supervisor.settle(old)  # its exit fully handled (TAP, cgroup released)
        # A VMM recorded for this VM that is still running (metald stopped mid-shutdown,
        # say) would share the disks with the new one: it is ours, so it goes first.
        await discard_runtime(ctx, layout)
        # The last jail goes whole: the jailer makes a new root (and TAP) every time.
        await remove_saved_jail(ctx, vm_id, layout)
        try:
            return await self.launch(spec, layout)
        except BackendError:
            raise
        except Exception as e:
            message = f"could not start VM {vm_id}: {e}"
            raise BackendError(clean_message(ctx, message, spec, layout)) from e

    async def launch(self, spec: LaunchSpec, layout: VmLayout) -> VmmProcess:
        """Start the VMM with its vCPUs stopped, connect, join its TAP, let the driver
        configure it. Leaves no process if it fails (the caller removes files)."""
        ctx = self._ctx
        host = ctx.host
        if spec.nic is not None and ctx.jail is None:
            # Run directly, the VMM would look for the TAP in metald's own network namespace.
            raise BackendError(
                f"cannot start VM {spec.vm_id}: its network interface needs the jailer"
            )
        jail: JailSpec | None = None
        with timing.step("ids"):
            ids = await ctx.vmm_ids(spec.vm_id)
        try:
            launch = self._launch_context(spec, layout, ids)
            argv = ctx.driver.argv(host, launch)
            control_socket = launch.host_run_dir / ctx.driver.control_socket_name
            if ctx.jail is not None:
                drives = plan_drives(spec, layout)
                jail = self._jail_for(spec, argv, drives, launch.files, ids)
            check_socket_path(control_socket)
        except ValueError as e:
            raise BackendError(f"cannot start VM {spec.vm_id}: {e}") from e
        if jail is not None:
            try:
                identity = await self._start_jailed(jail, layout)
            except BackendError as e:
                if ctx.spares is not None:
                    ctx.spares.fill_soon()
                raise BackendError(clean_message(ctx, e.message, spec, layout)) from None
        else:
            identity = await self._start_directly(argv, layout)
        vm = VmmProcess(
            vm_id=spec.vm_id,
            layout=layout,
            identity=identity,
            accelerator=host.accelerator,
            control_socket=control_socket,
            owner_uid=launch.uid,
            host_run_dir=launch.host_run_dir,
            jail=jail,
        )
        self._supervisor.watch(vm)
        self._vms[spec.vm_id] = vm
        try:
            await self._make_ready(vm, launch)
        except BaseException as e:
            if ctx.spares is not None:
                ctx.spares.fill_soon()
            await self._supervisor.abandon(vm)
            # Whether it ended by itself comes from its exit status, not from whether the
            # loop had seen the exit yet: a VMM that dies on a bad kernel breaks the control
            # handshake before its pidfd is read, and our kill then finds it already gone.
            status = vm.watch.status if vm.watch is not None else None
            exited_itself = status is None or status.signal != signal.SIGKILL
            if jail is not None:
                with contextlib.suppress(BackendError):  # logged; destroy tries again
                    await remove_saved_jail(ctx, spec.vm_id, layout)
            if not isinstance(e, Exception):
                raise
            # A VMM that ended by itself says most in its first error line (bad kernel,
            # missing file, ...); otherwise what failed here (a refused API call, say) does.
            said = e.message if isinstance(e, MetaldError) else str(e)
            first_line = first_stderr_line(layout.stderr_log, argv[0]) if exited_itself else ""
            detail = first_line or said
            message = f"{ctx.name} failed to start VM {spec.vm_id}: {detail}"
            raise BackendError(clean_message(ctx, message, spec, layout)) from None
        vm.starting = False
        if ctx.spares is not None:
            ctx.spares.fill_soon()  # now that the VMM has started (jailer/spares.py)
        return vm

    async def _make_ready(self, vm: VmmProcess, launch: LaunchContext) -> None:
        """A started VMM: record it, connect, join its TAP, have the driver configure it;
        it must then be ready to boot (vCPUs not started)."""
        ctx = self._ctx
        if vm.watch is None:
            raise StartFailed(f"{ctx.name} exited at once")
        vm.save_record(sync=False)
        record_saved = sync_in_background(vm.layout.process_file)  # while the VMM starts
        deadline = asyncio.get_running_loop().time() + ctx.start_timeout
        await connect_control(ctx, vm, deadline, launch)
        if launch.spec.nic is not None and self.tap_callback is not None:
            try:
                with timing.step("tap"):
                    await self.tap_callback(vm.vm_id)
            except Exception as e:
                message = e.message if isinstance(e, MetaldError) else str(e)
                raise StartFailed(f"its TAP could not be connected: {message}") from e
        control = vm.connected_control()
        with timing.step("configure"):
            await control.prepare(launch)
            state = await control.runstate()
        with timing.step("sync"):
            await record_saved
        if state is not VmState.CREATED:
            raise StartFailed(f"{ctx.name} started in state {state}, not ready to boot")

    def _launch_context(
        self, spec: LaunchSpec, layout: VmLayout, ids: tuple[int, int]
    ) -> LaunchContext:
        ctx = self._ctx
        host = ctx.host
        files, host_run_dir = self._files(spec, layout)
        boot = GuestBoot(
            reboot=ctx.driver.guest_reboot_arg,
            on_shutdown=ctx.driver.guest_on_shutdown,
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
        uid, gid = ids
        return LaunchContext(
            spec=spec,
            files=files,
            host_run_dir=host_run_dir,
            uid=uid,
            gid=gid,
            kernel_cmdline=cmdline,
        )

    def _files(self, spec: LaunchSpec, layout: VmLayout) -> tuple[VmmFiles, Path]:
        """The VMM's files as it names them, and its run directory's host path."""
        ctx = self._ctx
        jailed = ctx.jail is not None
        files = vmm_files(
            spec, layout, ctx.driver.control_socket_name, jailed=jailed, agent=ctx.guest_agent
        )
        if jailed:
            return files, ctx.jail_place(spec.vm_id).host_path(str(files.run_dir))
        return files, layout.run_dir

    def _jail_for(
        self,
        spec: LaunchSpec,
        argv: list[str],
        drives: list[Drive],
        files: VmmFiles,
        ids: tuple[int, int],
    ) -> JailSpec:
        """The jail one VMM process of this VM runs in: as the VM's own ids, in its own PID
        namespace and (NIC-less) an empty network namespace (the jailer's defaults), with
        rlimits that let it write its largest disk to the end and no file beyond."""
        ctx = self._ctx
        settings = ctx.jail
        assert settings is not None
        placed = [PlacedFile(str(spec.kernel), str(files.kernel))]
        if spec.initrd is not None and files.initrd is not None:
            placed.append(PlacedFile(str(spec.initrd), str(files.initrd)))
        for host_drive, inside in zip(drives, files.drives, strict=True):
            placed.append(
                PlacedFile(str(host_drive.source), str(inside.path), read_only=host_drive.read_only)
            )
        nic = spec.nic
        host = ctx.host
        largest = max((os.stat(d.source).st_size for d in drives if not d.read_only), default=0)
        return replace(
            ctx.jail_place(spec.vm_id),
            uid=ids[0],
            gid=ids[1],
            rlimits=settings.rlimits(largest),
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

    async def _start_directly(self, argv: list[str], layout: VmLayout) -> ProcessIdentity:
        """Spawn the VMM as metald's own user, in its own session."""
        # A new run directory for every launch: nothing of the last VMM's is found there.
        await asyncio.to_thread(shutil.rmtree, layout.run_dir, ignore_errors=True)
        layout.run_dir.mkdir(mode=0o700)
        try:
            return ProcessIdentity(*spawn(argv, stderr_path=layout.stderr_log))
        except OSError as e:
            raise BackendError(f"cannot start {argv[0]}: {e.strerror or e}") from e

    async def _start_jailed(self, jail: JailSpec, layout: VmLayout) -> ProcessIdentity:
        """Run the jailer; its JailSpec is saved first, so a metald stopped at any point
        finds the jail again."""
        ctx = self._ctx
        save_jail_spec(layout.jail_spec_file, jail)
        with contextlib.suppress(FileNotFoundError):
            layout.stderr_log.unlink()  # the jailer appends: one VMM's messages only
        try:
            with timing.step("jailer"):
                jailed = await launch_jailed(
                    jail,
                    stderr_path=layout.stderr_log,
                    timeout=ctx.start_timeout,
                    spares=ctx.spares,
                )
        except JailerError as e:
            # Full text (host paths) for the operator; the caller gets a cleaned one.
            log.warning("VM %s: %s", jail.vm_id, e.message)
            if not e.leftovers:
                with contextlib.suppress(FileNotFoundError):
                    layout.jail_spec_file.unlink()
            raise BackendError(f"could not jail the VMM of VM {jail.vm_id}: {e.message}") from None
        # The helper's own steps, as it measured them (inside the "jailer" step above).
        timing.record_run([(f"jailer.{s.step}", s.ms / 1000) for s in jailed.steps])
        if jailed.cgroup_note and not self._cgroup_noted:
            self._cgroup_noted = True
            log.warning("VM cgroup limits not (all) applied on this host: %s", jailed.cgroup_note)
        log.debug(
            "VM %s: jailed %s pid %d in %.1f ms",
            jail.vm_id,
            ctx.name,
            jailed.pid,
            jailed.launch_seconds * 1000,
        )
        return jailed.identity

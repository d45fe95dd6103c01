"""Watching VMM processes and handling their exits.

Every VMM runs in its own session, so it outlives metald; metald watches it through a pidfd
in the event loop (host/process.py ProcessWatch). The moment a VMM is seen to exit, a task
reads what it said (the control's exit event, its stderr), asks the driver why it ended,
removes its runtime files and, when jailed, releases its TAP and cgroup at once (its jail
directory, with the console log, stays until the VM starts again or is deleted). An exit
metald did not ask for, and not during start-up (create and boot report those), goes to the
exit callback with the driver's reason.

Killing goes through the pidfd too, and every kill waits until the exit has been handled
(`settle`), so a caller that goes on (to relaunch, to delete) finds the TAP and cgroup gone.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Coroutine
from typing import Any

from metald.backends.vmm.context import VmmContext
from metald.backends.vmm.jail import release_jail
from metald.backends.vmm.messages import first_stderr_line
from metald.backends.vmm.process import VmmProcess, VmmTable
from metald.backends.vmm.records import remove_process
from metald.core.errors import BackendError
from metald.core.ports import ExitCallback
from metald.host.process import ExitStatus, ProcessWatch
from metald.jailer.errors import JailerError

log = logging.getLogger(__name__)


class Supervisor:
    """The pidfd watches of the runtime's VMMs, their exits, and the tasks that handle them."""

    def __init__(self, ctx: VmmContext, vms: VmmTable) -> None:
        self._ctx = ctx
        self._vms = vms
        self.exit_callback: ExitCallback | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    def watch(self, vm: VmmProcess) -> None:
        """Open the VMM's pidfd watch (`vm.watch` stays None if the process is gone)."""
        vm.watch = ProcessWatch.open(vm.identity, lambda status: self._on_exit(vm, status))

    async def kill(self, vm: VmmProcess) -> None:
        """SIGKILL the VM's VMM (through its pidfd) and wait until the exit is handled."""
        if vm.watch is not None and not vm.watch.exited and not await vm.watch.kill_and_wait():
            raise BackendError(f"VM {vm.vm_id}: its VMM did not exit after SIGKILL")
        await self.settle(vm)

    async def settle(self, vm: VmmProcess) -> None:
        """Wait until an exit has been fully handled (control closed, runtime files gone)."""
        if vm.watch is not None and vm.watch.exited and vm.exit_task is not None:
            await asyncio.shield(vm.exit_task)

    async def abandon(self, vm: VmmProcess) -> None:
        """A VMM that will not be kept (a failed launch or adoption): kill it, wait until
        its exit is handled (TAP and cgroup released), disconnect, forget it."""
        if vm.watch is not None:
            vm.expecting_exit = True
            await vm.watch.kill_and_wait()
            await self.settle(vm)
            vm.watch.close()
        await vm.disconnect()
        if self._vms.get(vm.vm_id) is vm:
            del self._vms[vm.vm_id]

    async def close(self) -> None:
        """Disconnect from every VMM and stop watching; the processes keep running."""
        vms = list(self._vms.values())
        self._vms.clear()
        for vm in vms:
            if vm.watch is not None:
                vm.watch.detach()
            await vm.disconnect()
            vm.control = None
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _on_exit(self, vm: VmmProcess, status: ExitStatus | None) -> None:
        """Called from the event loop the moment the VMM process is seen to exit."""
        vm.exit_task = self._spawn_task(self._handle_exit(vm, status))

    async def _handle_exit(self, vm: VmmProcess, status: ExitStatus | None) -> None:
        event = None
        if vm.control is not None:
            # Closing reads what the VMM sent before it went (QEMU's SHUTDOWN event).
            await vm.disconnect()
            event = vm.control.exit_event()
            vm.control = None
        else:
            await vm.disconnect()
        report = self._ctx.driver.describe_exit(
            event, status, first_stderr_line(vm.layout.stderr_log, self._ctx.host.binary)
        )
        vm.exit_reason, vm.exit_by_guest = report.reason, report.by_guest
        if self._vms.get(vm.vm_id) is vm:
            _remove_runtime_files(vm)
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
        if self.exit_callback is not None:
            try:
                await self.exit_callback(vm.vm_id, vm.exit_reason)
            except Exception:
                log.exception("exit callback for VM %s failed", vm.vm_id)

    def _spawn_task(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def _remove_runtime_files(vm: VmmProcess) -> None:
    remove_process(vm.layout)
    if vm.jail is None:
        shutil.rmtree(vm.layout.run_dir, ignore_errors=True)

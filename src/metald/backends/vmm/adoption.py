"""What an earlier metald left: VMMs to adopt, and orphans to remove.

A VMM runs in its own session and outlives metald. After a restart the service hands each
VM the store knows to `adopt`: its VMM is taken back only if it is provably this VM's (pid
+ start time, and its root is the VM's jail, or, run directly, its command line names its
socket: cleanup.py) and its control socket answers in a state it can carry on from.
Anything less is killed (when provably ours) and its runtime files go; spec.json, the disks
and the console log stay, so the VM is SHUTDOWN and `boot` starts it again.

Then `remove_orphans`: directories, jails and cgroups that no known VM owns go, with any VMM
provably in them; a live process that is not provably ours keeps its directory.
"""

from __future__ import annotations

import asyncio
import logging
import os

from metald.backends.vmm.cleanup import (
    discard_runtime,
    kill_process,
    provably_ours,
    remove_vm_files,
)
from metald.backends.vmm.context import VmmContext
from metald.backends.vmm.control import connect_control
from metald.backends.vmm.jail import remove_orphan_jails
from metald.backends.vmm.layout import VmLayout, check_vm_id
from metald.backends.vmm.process import StartFailed, VmmProcess, VmmTable
from metald.backends.vmm.records import load_process, remove_process
from metald.backends.vmm.supervision import Supervisor
from metald.core.errors import BackendError
from metald.core.models import ProcessIdentity
from metald.core.states import VmState
from metald.host.process import is_alive

log = logging.getLogger(__name__)


class Adopter:
    """Takes back the VMMs an earlier metald left, and removes what nobody owns."""

    def __init__(self, ctx: VmmContext, vms: VmmTable, supervisor: Supervisor) -> None:
        self._ctx = ctx
        self._vms = vms
        self._supervisor = supervisor

    async def adopt(self, vm_id: str, identity: ProcessIdentity) -> VmState | None:
        """Re-attach to a VMM left by an earlier metald. If it is gone, or does not answer on
        its control socket, or is in a state it cannot carry on from, the process (when
        provably ours) is killed, its runtime files go and None is returned. spec.json, the
        disks and the console log stay: the VM is SHUTDOWN now, and `boot` can start it
        again."""
        ctx = self._ctx
        await ctx.ensure_started()
        try:
            layout = VmLayout(ctx.vm_dir(vm_id))
        except ValueError:
            return None
        current = self._vms.get(vm_id)
        if current is not None and current.alive:
            return await current.connected_control().runstate()
        if not (is_alive(identity) and provably_ours(ctx, identity, layout)):
            # process.json may name a newer VMM than the store does (metald stopped between
            # starting it and recording it): nobody knows it, so it goes too.
            await discard_runtime(ctx, layout)
            return None
        recorded = load_process(layout)
        jail = ctx.saved_jail(layout)
        _, control_socket = ctx.host_files(current, layout)
        vm = VmmProcess(
            vm_id=vm_id,
            layout=layout,
            identity=identity,
            accelerator=recorded.accelerator if recorded is not None else ctx.host.accelerator,
            control_socket=control_socket,
            owner_uid=jail.uid if jail is not None else os.geteuid(),
            host_run_dir=control_socket.parent,
            jail=jail,
        )
        if recorded is not None and recorded.identity == identity:
            vm.booted_at = recorded.booted_at
        self._supervisor.watch(vm)
        if vm.watch is None:
            await discard_runtime(ctx, layout)
            return None
        self._vms[vm_id] = vm
        state: VmState | None = None
        try:
            deadline = asyncio.get_running_loop().time() + ctx.control_timeout
            await connect_control(ctx, vm, deadline, None)
            state = await vm.connected_control().runstate()
        except (StartFailed, BackendError) as e:
            log.warning("cannot adopt VM %s: %s", vm_id, e)
        if state is None:
            await self._supervisor.abandon(vm)  # its exit handler released the TAP and cgroup
            remove_process(layout)
            return None
        vm.starting = False
        vm.save_record()
        return state

    async def remove_orphans(self, known_vm_ids: set[str]) -> list[str]:
        """Directories under vm_root that no known VM owns and that are this backend's (or
        nobody's): their VMM is killed when process.json names a live process that is provably
        this VM's (its root is the VM's jail, or its command line names the VM's socket;
        anything less is not provably ours and is left alone, directory included), then its
        jail and the directory go. Then, when jailing, jail directories and VM cgroups of VMs
        that are neither known nor have a directory left (metald.backends.vmm.jail)."""
        ctx = self._ctx
        removed: list[str] = []
        if ctx.vm_root.is_dir():
            removed = await self._remove_orphan_dirs(known_vm_ids)
        if ctx.jail is not None:
            keep = known_vm_ids | set(self._vms) | set(self._vm_dir_names())
            for name in await remove_orphan_jails(ctx.jail, ctx.name, keep):
                if name not in removed:
                    removed.append(name)
            if ctx.jail_ids is not None:
                # Ids held for VMs that are gone (metald stopped between a claim and its
                # record): nothing runs as them any more, their jails went above.
                for name in sorted(set(await ctx.jail_ids.all()) - keep):
                    await ctx.jail_ids.release(name)
                    if name not in removed:
                        removed.append(name)
        return removed

    def _vm_dir_names(self) -> list[str]:
        try:
            return [p.name for p in self._ctx.vm_root.iterdir() if p.is_dir()]
        except FileNotFoundError:
            return []

    async def _remove_orphan_dirs(self, known_vm_ids: set[str]) -> list[str]:
        ctx = self._ctx
        removed: list[str] = []
        for entry in sorted(ctx.vm_root.iterdir()):
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
                if not provably_ours(ctx, recorded.identity, layout):
                    log.warning("orphan %s: pid %d is not provably ours; left", name, recorded.pid)
                    continue
                await kill_process(recorded.identity)
            try:
                await remove_vm_files(ctx, name, layout)
            except BackendError as e:
                log.warning("orphan %s: %s", name, e.message)
                continue
            removed.append(name)
        return removed

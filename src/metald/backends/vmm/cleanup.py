"""Removing what a VM leaves on the host, and only what is provably its.

A process is killed only when it is provably this VM's VMM: same pid and start time, and,
jailed, its root is the VM's jail root (which only the jailer makes), or, run directly, its
command line names the VM's control socket. Anything less is left alone.

Three depths of removal:
- the runtime files (`discard_runtime`): the recorded VMM, process.json, the run directory,
  the jail's TAP and cgroup; the jail directory (console log) and the VM directory stay;
- the jail (`remove_saved_jail`): the last jail entirely, before a new launch or a delete;
- the VM (`remove_vm_files`): its jail and its directory (DeleteVm, a failed create, orphans).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil

from metald.backends.vmm.context import VmmContext
from metald.backends.vmm.jail import release_jail, remove_jail_at, rooted_at
from metald.backends.vmm.layout import VmLayout
from metald.backends.vmm.records import load_process, remove_process
from metald.core.errors import BackendError
from metald.core.models import ProcessIdentity
from metald.host.process import is_alive, kill_identity, read_cmdline
from metald.jailer.errors import JailerError

log = logging.getLogger(__name__)


def provably_ours(ctx: VmmContext, identity: ProcessIdentity, layout: VmLayout) -> bool:
    """Same pid and start time, and: jailed, its root is this VM's jail root; run
    directly, its command line names this VM's control socket."""
    if not is_alive(identity):
        return False
    jail = ctx.saved_jail(layout)
    if jail is not None:
        return rooted_at(identity, jail.jail_root)
    needle = str(layout.run_dir / ctx.driver.control_socket_name)
    return any(needle in arg for arg in read_cmdline(identity.pid))


async def kill_recorded_vmm(ctx: VmmContext, layout: VmLayout) -> None:
    """Kill the VMM that process.json names, if it is provably ours."""
    recorded = load_process(layout)
    if recorded is not None and provably_ours(ctx, recorded.identity, layout):
        await kill_process(recorded.identity)


async def kill_process(identity: ProcessIdentity) -> None:
    try:
        await kill_identity(identity)
    except TimeoutError as e:
        raise BackendError(f"VMM process {identity.pid} did not exit after SIGKILL") from e


async def discard_runtime(ctx: VmmContext, layout: VmLayout) -> None:
    """Kill the VMM that process.json names, if it is provably ours; forget it; release
    its jail's TAP and cgroup (its jail directory stays)."""
    await kill_recorded_vmm(ctx, layout)
    remove_process(layout)
    await asyncio.to_thread(shutil.rmtree, layout.run_dir, ignore_errors=True)
    jail = ctx.saved_jail(layout)
    if jail is not None:
        try:
            await release_jail(jail, keep_dir=True)
        except JailerError as e:
            log.warning("VM %s: %s", layout.vm_id, e.message)


async def remove_saved_jail(ctx: VmmContext, vm_id: str, layout: VmLayout) -> None:
    """Remove the VM's last jail entirely (its VMM has exited or been killed): the one
    jail.json names, else, when jailing, whatever is where this VM's jail would be
    (nothing else has its id). Raises BackendError (details logged) if some of it
    remains; jail.json then stays."""
    jail = ctx.saved_jail(layout)
    if jail is not None:
        try:
            await release_jail(jail, keep_dir=False)
        except JailerError as e:
            log.warning("VM %s: %s", vm_id, e.message)
            raise BackendError(f"VM {vm_id}: its jail could not be removed entirely") from None
    if ctx.jail is not None:
        # No record, or a record of a jail elsewhere (the settings changed): this place
        # too, with any VMM still rooted in it.
        try:
            await remove_jail_at(ctx.jail, ctx.name, vm_id)
        except JailerError as e:
            log.warning("VM %s: %s", vm_id, e.message)
            raise BackendError(f"VM {vm_id}: its jail could not be removed entirely") from None
    with contextlib.suppress(FileNotFoundError):
        layout.jail_spec_file.unlink()


async def remove_vm_files(ctx: VmmContext, vm_id: str, layout: VmLayout) -> None:
    """Kill the recorded VMM (when provably ours), remove the VM's jail (TAP, cgroup,
    jail directory), then its directory. A jail that cannot be removed entirely keeps
    the directory (and with it jail.json, for the next try) and raises BackendError. Then
    the VM's jail id goes back to the range (nothing of the VM runs as it any more)."""
    await kill_recorded_vmm(ctx, layout)
    await remove_saved_jail(ctx, vm_id, layout)
    await asyncio.to_thread(shutil.rmtree, layout.dir, ignore_errors=True)
    await ctx.release_ids(vm_id)

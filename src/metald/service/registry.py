"""The VM registry: every live VM of this host in memory, so reads need no database.

GetVmInfo is the API's hot read, and it used to read the VM's row from the store on every
call (a query through the engine's worker thread, then a VmRecord built from the row's
JSON). The registry holds the record of each VM the store has as live here (CREATED,
RUNNING, PAUSED, not deleted): the VMs that have a VMM and that callers poll. A VM that is
not live (SHUTDOWN) is read from the store as before, so memory follows the live VMs, not
the rows (a store of 100,000 stopped VMs costs nothing here).

The store stays the source of truth. The service writes every change to the store first
and then here (`put`, after the write returned), before it answers: a failed write leaves
the registry as it was, and no caller is ever told of a change the store does not hold. At
start-up the registry is filled from the store, after adoption has corrected the rows.
Only this daemon changes the rows of its host's VMs (rows carry their node), so nothing
else can make the two differ.

Records are copied in and out: a caller that changes a record it got (the service's
`_save` does, before writing it) cannot change the registry behind the store's back.
"""

from __future__ import annotations

from dataclasses import replace

from metald.core.models import VmRecord
from metald.core.states import LIVE_STATES


class VmRegistry:
    def __init__(self) -> None:
        self._vms: dict[str, VmRecord] = {}

    def put(self, vm: VmRecord) -> None:
        """Record what the store now holds for `vm` (call it after the store's write): kept
        while live, dropped once SHUTDOWN or deleted."""
        if vm.deleted_at is None and vm.state in LIVE_STATES:
            self._vms[vm.id] = replace(vm)
        else:
            self._vms.pop(vm.id, None)

    def drop(self, vm_id: str) -> None:
        """The VM's row is gone from the store (a create undone)."""
        self._vms.pop(vm_id, None)

    def get(self, vm_id: str) -> VmRecord | None:
        """A copy of the live VM's record, None if the VM is not live here (read the store)."""
        vm = self._vms.get(vm_id)
        return replace(vm) if vm is not None else None

    def records(self) -> list[VmRecord]:
        """The live records themselves, not copies: for a reader that only reads (the
        metering collector lists them ten times a second). Never change one."""
        return list(self._vms.values())

    def snapshot(self) -> dict[str, VmRecord]:
        """Every live VM's record, copied (tests compare it with the store)."""
        return {vm_id: replace(vm) for vm_id, vm in self._vms.items()}

    def __len__(self) -> int:
        return len(self._vms)

"""A fake VMM Backend: VMM "processes" are entries in a dict, so a test can see exactly what
the service asked for, make any call fail, and make a VMM exit on its own.

It keeps the real backends' rules that the service relies on, and refuses what a real VMM
would refuse (pausing a VM that is not running, a second create of the same id), so a
service bug shows up as a BackendError instead of being absorbed:

- `vmms`: live VMM processes by VM id, each with its identity and its state (CREATED while
  its vCPUs have not started, RUNNING, PAUSED);
- `saved`: the per-VM directories (the launch spec); a shut-down VM keeps its directory,
  so a later boot starts a new process from it; destroy removes both.

Processes outlive a service, as VMMs outlive metald: a second VmService over the same fake
backend and store is a restarted daemon (`adoption` overrides what adopt() finds).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import Any

from metald.core.errors import BackendError
from metald.core.models import ConsoleChunk, LaunchSpec, ProcessIdentity, VmUsage
from metald.core.ports import ExitCallback, TapCallback
from metald.core.states import VmState

from .faults import Faults


@dataclass
class FakeVmm:
    identity: ProcessIdentity
    state: VmState


@dataclass(frozen=True)
class Call:
    method: str
    vm_id: str = ""
    args: dict[str, Any] = field(default_factory=dict)


class FakeBackend:
    def __init__(self, name: str = "fake", *, accelerator: str = "tcg") -> None:
        self.name = name
        self._accelerator = accelerator
        self.calls: list[Call] = []
        self.vmms: dict[str, FakeVmm] = {}
        self.saved: dict[str, LaunchSpec] = {}
        self.adoption: dict[str, VmState | None] = {}
        self.orphans: set[str] = set()  # leftovers no VM row owns, for remove_orphans
        self.consoles: dict[str, bytes] = {}  # what each VM's console log holds
        # What sample_usage reads of each VM (its VMM's counters; a test moves them).
        self.readings: dict[str, VmUsage] = {}
        self.faults = Faults()
        self.exit_callback: ExitCallback | None = None
        self.tap_callback: TapCallback | None = None
        self.started = False
        self.closed = False
        self._pids = itertools.count(1000)

    # -- the port -------------------------------------------------------------------------

    async def start(self) -> None:
        self.calls.append(Call("start"))
        await self.faults.enter("start")
        self.started = True

    def set_exit_callback(self, callback: ExitCallback) -> None:
        self.exit_callback = callback

    def set_tap_callback(self, callback: TapCallback | None) -> None:
        self.tap_callback = callback

    def accelerator(self) -> str:
        return self._accelerator

    async def create(self, spec: LaunchSpec) -> ProcessIdentity:
        self.calls.append(Call("create", spec.vm_id, {"spec": spec}))
        await self.faults.enter("create")
        if spec.vm_id in self.saved:
            raise BackendError(f"{self.name}: VM {spec.vm_id} already has a directory")
        self.saved[spec.vm_id] = spec
        try:
            return await self._launch(spec.vm_id, VmState.CREATED)
        except BaseException:
            self.saved.pop(spec.vm_id, None)
            raise

    async def boot(self, vm_id: str) -> ProcessIdentity:
        self.calls.append(Call("boot", vm_id))
        await self.faults.enter("boot")
        if vm_id not in self.saved:
            raise BackendError(f"{self.name}: no VM {vm_id}")
        vmm = self.vmms.get(vm_id)
        if vmm is None:  # after a shutdown: a new VMM from the saved spec
            return await self._launch(vm_id, VmState.RUNNING)
        if vmm.state is not VmState.CREATED:
            raise BackendError(f"{self.name}: VM {vm_id} is already booted ({vmm.state})")
        vmm.state = VmState.RUNNING
        return vmm.identity

    async def pause(self, vm_id: str) -> None:
        self.calls.append(Call("pause", vm_id))
        await self.faults.enter("pause")
        self._vmm(vm_id, VmState.RUNNING).state = VmState.PAUSED

    async def resume(self, vm_id: str) -> None:
        self.calls.append(Call("resume", vm_id))
        await self.faults.enter("resume")
        self._vmm(vm_id, VmState.PAUSED).state = VmState.RUNNING

    async def reboot(self, vm_id: str) -> ProcessIdentity:
        self.calls.append(Call("reboot", vm_id))
        await self.faults.enter("reboot")
        return self._vmm(vm_id, VmState.RUNNING).identity

    async def shutdown(self, vm_id: str, *, timeout: float, force: bool) -> str:
        self.calls.append(Call("shutdown", vm_id, {"timeout": timeout, "force": force}))
        await self.faults.enter("shutdown")
        self._vmm(vm_id, VmState.RUNNING, VmState.PAUSED)
        del self.vmms[vm_id]
        return "forced" if force else "graceful"

    async def destroy(self, vm_id: str) -> None:
        self.calls.append(Call("destroy", vm_id))
        await self.faults.enter("destroy")
        self.vmms.pop(vm_id, None)
        self.saved.pop(vm_id, None)

    async def adopt(self, vm_id: str, identity: ProcessIdentity) -> VmState | None:
        self.calls.append(Call("adopt", vm_id, {"identity": identity}))
        await self.faults.enter("adopt")
        if vm_id in self.adoption:
            live = self.adoption[vm_id]
            if live is None:
                self.vmms.pop(vm_id, None)
            else:
                self.vmms[vm_id] = FakeVmm(identity, live)
            return live
        vmm = self.vmms.get(vm_id)
        if vmm is None or vmm.identity != identity:
            return None  # gone, or its pid now names another process
        return vmm.state

    async def remove_orphans(self, known_vm_ids: set[str]) -> list[str]:
        self.calls.append(Call("remove_orphans", args={"known": set(known_vm_ids)}))
        await self.faults.enter("remove_orphans")
        leftovers = (set(self.vmms) | set(self.saved) | self.orphans) - known_vm_ids
        for vm_id in leftovers:
            self.vmms.pop(vm_id, None)
            self.saved.pop(vm_id, None)
            self.orphans.discard(vm_id)
        return sorted(leftovers)

    async def usage(self, vm_id: str) -> VmUsage:
        self.calls.append(Call("usage", vm_id))
        await self.faults.enter("usage")
        vmm = self._vmm(vm_id, VmState.CREATED, VmState.RUNNING, VmState.PAUSED)
        return VmUsage(
            cpu_time_ns=1_000_000, memory_bytes=64 * 1024 * 1024, uptime_seconds=vmm.identity.pid
        )

    async def sample_usage(self, vm_id: str, *, exact: bool = False) -> VmUsage:
        """`readings[vm_id]` of its live VMM (not recorded in `calls`: a collector asks
        ten times a second)."""
        await self.faults.enter("sample_usage")
        vmm = self._vmm(vm_id, VmState.CREATED, VmState.RUNNING, VmState.PAUSED)
        found = self.readings.get(vm_id, VmUsage())
        return replace(found, process=vmm.identity)

    def info(self, vm_id: str) -> dict[str, str]:
        self.faults.check("info")
        vmm = self.vmms.get(vm_id)
        info = {"backend": self.name, "accelerator": self._accelerator}
        if vmm is not None:
            info["pid"] = str(vmm.identity.pid)
            info["console_log"] = f"/srv/fake/{vm_id}/run/console.log"
        return info

    async def console(self, vm_id: str, offset: int, max_bytes: int) -> ConsoleChunk:
        """`consoles[vm_id]` read as the real backend reads its log."""
        self.calls.append(Call("console", vm_id, {"offset": offset, "max_bytes": max_bytes}))
        await self.faults.enter("console")
        log = self.consoles.get(vm_id, b"")
        size = len(log)
        start = max(0, size + offset) if offset < 0 else (0 if offset > size else offset)
        data = log[start : start + max_bytes]
        return ConsoleChunk(data=data, offset=start, next_offset=start + len(data), size=size)

    async def close(self) -> None:
        self.calls.append(Call("close"))
        self.closed = True

    # -- for tests --------------------------------------------------------------------------

    async def exit(self, vm_id: str, reason: str) -> None:
        """The VMM of vm_id exits on its own (guest poweroff, crash): as a real backend's
        supervisor does, forget the process and tell the service."""
        del self.vmms[vm_id]
        assert self.exit_callback is not None, "the service never set an exit callback"
        await self.exit_callback(vm_id, reason)

    def methods(self, vm_id: str | None = None) -> list[str]:
        """The names of the calls made (for one VM when vm_id is given), in order."""
        return [c.method for c in self.calls if vm_id is None or c.vm_id == vm_id]

    async def _launch(self, vm_id: str, state: VmState) -> ProcessIdentity:
        identity = ProcessIdentity(pid=next(self._pids), start_time=7)
        self.vmms[vm_id] = FakeVmm(identity, state)
        spec = self.saved[vm_id]
        if spec.nic is not None and self.tap_callback is not None:
            try:
                await self.tap_callback(vm_id)
            except BaseException:
                del self.vmms[vm_id]
                raise
        return identity

    def _vmm(self, vm_id: str, *allowed: VmState) -> FakeVmm:
        vmm = self.vmms.get(vm_id)
        if vmm is None:
            raise BackendError(f"{self.name}: VM {vm_id} has no VMM process")
        if vmm.state not in allowed:
            raise BackendError(f"{self.name}: VM {vm_id} is {vmm.state}, not {'/'.join(allowed)}")
        return vmm

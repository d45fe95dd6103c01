"""Admission: whether a CreateVm or a BootVm may take what it asks for, decided atomically
against the customer's quotas and this host's ceiling (core/quotas.py says what counts).

Why here and not in the VM service: the service's per-VM locks order operations on one VM;
admission orders operations across VMs (a customer's, a host's). Its own state is one lock:

- Within one daemon, an asyncio lock around every admission step serialises them, so the
  database's locks are never contended by our own requests (SQLite's busy wait is slow).
- Across daemons sharing a database, `Quotas.admit` counts and records in one transaction
  behind per-customer and per-host lock rows (store/quotas.py): two daemons admitting the
  same customer's VMs queue on that customer's row and cannot both see the old usage.

The claim is recorded before the VMM starts (create: before the VM row exists; boot: while
the row still says SHUTDOWN) and held until the row says what the VM holds, so a second
admission counts a VM that is still starting. A failed create releases its claim; a failed
boot ends its hold (the VM is SHUTDOWN again, which holds nothing); a crash in between is
undone by `start` (sweep) before the next admission.

Also here: the per-VM checks that need the resolved disks (how many, how big) and the cap
on a tenant's network rate limits (refused, never clamped: a VM gets exactly what its config
says, and GetVmInfo echoes it; the operator default applies when the request gives none).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

from metald.core import timing
from metald.core.errors import InvalidArgument
from metald.core.models import ResolvedDisk, VmConfig, VmRecord
from metald.core.ports import Quotas
from metald.core.quotas import (
    BOOT_CHECKS,
    CREATE_CHECKS,
    AdmissionView,
    Claim,
    HostCeiling,
    QuotaDefaults,
    Resource,
    VmMaxima,
    check_admission,
)
from metald.core.states import LIVE_STATES

log = logging.getLogger(__name__)

DiskSize = Callable[[Path], int]


class Admission:
    def __init__(
        self,
        quotas: Quotas,
        defaults: QuotaDefaults,
        host: HostCeiling,
        maxima: VmMaxima,
        disk_size: DiskSize,
    ) -> None:
        """`disk_size`: the size in bytes of a resolved disk image (the most its per-VM copy
        can grow to)."""
        self._quotas = quotas
        self._defaults = defaults
        self._host = host
        self._maxima = maxima
        self._disk_size = disk_size
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        swept = await self._quotas.sweep()
        if swept:
            log.info("dropped %d admission claims whose VM was never recorded", swept)

    def check_request(self, config: VmConfig, disks: Sequence[ResolvedDisk]) -> Claim:
        """The per-VM maxima and rate-limit cap (InvalidArgument naming the field); returns
        what the VM will hold."""
        if len(config.storage) > self._maxima.disks:
            raise InvalidArgument(
                "config.storage", f"at most {self._maxima.disks} devices on this host"
            )
        disk_bytes = 0
        for i, disk in enumerate(disks):
            size = self._disk_size(disk.path)
            if size > self._maxima.disk_bytes:
                raise InvalidArgument(
                    f"config.storage[{i}].path",
                    f"the image is {size} bytes; this host's maximum is "
                    f"{self._maxima.disk_bytes} bytes per disk",
                )
            if not disk.read_only:
                disk_bytes += size
        cap = self._maxima.rate_limit_bandwidth
        for i, iface in enumerate(config.network):
            for name, limit in (("rx", iface.rx_rate_limit), ("tx", iface.tx_rate_limit)):
                if cap and limit is not None and limit.bandwidth > cap:
                    raise InvalidArgument(
                        f"config.network[{i}].{name}_rate_limit.bandwidth",
                        f"must be at most {cap} bytes/s (this host's maximum)",
                    )
        return Claim(
            vcpus=config.vcpu_count, memory_bytes=config.memory_bytes, disk_bytes=disk_bytes
        )

    @asynccontextmanager
    async def creating(self, customer_id: str, vm_id: str, claim: Claim) -> AsyncIterator[None]:
        """Admit a new VM (QuotaExceeded if it does not fit) for the body, which creates it.
        If the body fails, the claim goes; if it succeeds, the VM's row counts from now on."""
        with timing.step("admission"):
            await self._admit(customer_id, vm_id, claim, CREATE_CHECKS, new=True)
        try:
            yield
        except BaseException:
            await self._quiet(self._quotas.release, vm_id, "release")
            raise
        with timing.step("admission"):
            await self._quiet(self._quotas.settle, vm_id, "settle")

    @asynccontextmanager
    async def booting(self, vm: VmRecord) -> AsyncIterator[None]:
        """Admit a new VMM for the body, which boots the VM and records its state; afterwards
        the state says whether it holds anything. A VM whose VMM is alive (CREATED) holds
        what it needs already: nothing to admit."""
        if vm.state in LIVE_STATES:
            yield
            return
        claim = Claim(vm.config.vcpu_count, vm.config.memory_bytes, disk_bytes=0)
        await self._admit(vm.customer_id, vm.id, claim, BOOT_CHECKS, new=False)
        try:
            yield
        finally:
            await self._quiet(self._quotas.settle, vm.id, "settle")

    async def release(self, vm_id: str) -> None:
        """The VM is deleted: forget its claim (a failure is only logged: a deleted VM's
        claim counts nothing, and the next start sweeps it)."""
        await self._quiet(self._quotas.release, vm_id, "release")

    async def _admit(
        self,
        customer_id: str,
        vm_id: str,
        claim: Claim,
        checks: tuple[Resource, ...],
        *,
        new: bool,
    ) -> None:
        def check(view: AdmissionView) -> None:
            check_admission(checks, claim, view, self._defaults, self._host)

        async with self._lock:
            await self._quotas.admit(customer_id, vm_id, claim, check, new=new)

    @staticmethod
    async def _quiet(step: Callable[[str], Awaitable[None]], vm_id: str, what: str) -> None:
        try:
            await step(vm_id)
        except Exception:
            log.exception("vm %s: could not %s its admission claim", vm_id, what)

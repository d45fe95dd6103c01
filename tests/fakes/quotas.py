"""Fake Quotas: overrides and claims in dicts, usage counted against a MemoryStore's rows
as the SQL adapter counts against the vms table (every VM is on this one host).

Atomic as the port promises: nothing awaits between counting and recording, so admissions
cannot interleave (a gate or an injected error on "admit" acts before the count).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from metald.core.errors import AlreadyExists
from metald.core.ports import AdmissionCheck
from metald.core.quotas import (
    AdmissionView,
    Claim,
    HostCeiling,
    Limit,
    QuotaDefaults,
    Resource,
    Usage,
    VmMaxima,
)
from metald.core.states import LIVE_STATES
from metald.service.admission import Admission

from .faults import Faults
from .store import MemoryStore


@dataclass
class FakeClaim:
    customer_id: str
    claim: Claim
    held: bool


class MemoryQuotas:
    def __init__(self, store: MemoryStore | None = None) -> None:
        self.store = store or MemoryStore()
        self.limits: dict[str, dict[Resource, Limit]] = {}
        self.claims: dict[str, FakeClaim] = {}
        self.faults = Faults()
        self.admitted: list[str] = []  # vm ids, in the order their admission succeeded

    async def overrides(self, customer_id: str) -> dict[Resource, Limit]:
        await self.faults.enter("overrides")
        return dict(self.limits.get(customer_id, {}))

    async def all_overrides(self) -> dict[str, dict[Resource, Limit]]:
        await self.faults.enter("all_overrides")
        return copy.deepcopy({c: o for c, o in self.limits.items() if o})

    async def set_override(self, customer_id: str, resource: Resource, limit: Limit) -> None:
        await self.faults.enter("set_override")
        if limit is not None and limit < 0:
            raise ValueError("a limit is a number >= 0, or None for unlimited")
        self.limits.setdefault(customer_id, {})[resource] = limit

    async def clear_override(self, customer_id: str, resource: Resource | None = None) -> int:
        await self.faults.enter("clear_override")
        mine = self.limits.get(customer_id, {})
        if resource is None:
            gone = len(mine)
            self.limits.pop(customer_id, None)
            return gone
        return 1 if mine.pop(resource, "absent") != "absent" else 0

    async def usage(self, customer_id: str) -> Usage:
        await self.faults.enter("usage")
        return self._count(customer_id, "")[0]

    async def admit(
        self, customer_id: str, vm_id: str, claim: Claim, check: AdmissionCheck, *, new: bool
    ) -> None:
        await self.faults.enter("admit")
        customer, host = self._count(customer_id, vm_id)
        check(AdmissionView(customer, host, dict(self.limits.get(customer_id, {}))))
        existing = self.claims.get(vm_id)
        if new and existing is not None:
            raise AlreadyExists(f"a VM with id {vm_id!r} exists or existed")
        if existing is not None:
            existing.held = True
        else:
            self.claims[vm_id] = FakeClaim(customer_id, claim, held=True)
        self.admitted.append(vm_id)

    async def settle(self, vm_id: str) -> None:
        await self.faults.enter("settle")
        if vm_id in self.claims:
            self.claims[vm_id].held = False

    async def release(self, vm_id: str) -> None:
        await self.faults.enter("release")
        self.claims.pop(vm_id, None)

    async def sweep(self) -> int:
        await self.faults.enter("sweep")
        for each in self.claims.values():
            each.held = False
        kept = set(self.store.live())
        gone = [vm_id for vm_id in self.claims if vm_id not in kept]
        for vm_id in gone:
            del self.claims[vm_id]
        return len(gone)

    def _count(self, customer_id: str, vm_id: str) -> tuple[Usage, Usage]:
        customer: dict[str, int] = dict.fromkeys(Resource, 0)
        host: dict[str, int] = dict.fromkeys(Resource, 0)
        for claim_id, each in self.claims.items():
            if claim_id == vm_id:
                continue
            row = self.store.rows.get(claim_id)
            if row is not None and row.deleted_at is not None:
                continue
            live = each.held or row is None or row.state in LIVE_STATES
            tallies = [host] + ([customer] if each.customer_id == customer_id else [])
            for tally in tallies:
                tally[Resource.VMS] += 1
                tally[Resource.DISK_BYTES] += each.claim.disk_bytes
                if live:
                    tally[Resource.RUNNING_VMS] += 1
                    tally[Resource.VCPUS] += each.claim.vcpus
                    tally[Resource.MEMORY_BYTES] += each.claim.memory_bytes
        return Usage(**customer), Usage(**host)


# Fake disk images have no files behind them: each is this big unless a test says otherwise.
FAKE_DISK_BYTES = 64 * 1024 * 1024
ROOMY_HOST = HostCeiling(memory_bytes=1024 * 1024**3, vcpus=1024)
ROOMY_MAXIMA = VmMaxima(disks=8, disk_bytes=1024**4)


def fake_admission(
    quotas: MemoryQuotas,
    defaults: QuotaDefaults | None = None,
    host: HostCeiling = ROOMY_HOST,
    maxima: VmMaxima = ROOMY_MAXIMA,
    disk_sizes: dict[Path, int] | None = None,
) -> Admission:
    """The real Admission on the fake port; by default nothing limits (no quotas, a host
    far bigger than any test asks for)."""
    sizes = disk_sizes if disk_sizes is not None else {}
    return Admission(
        quotas,
        defaults or QuotaDefaults(),
        host,
        maxima,
        lambda path: sizes.get(path, FAKE_DISK_BYTES),
    )

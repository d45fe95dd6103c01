"""An in-memory Store: the port's contract (ids never reused, soft delete, stable pages)
without SQL, so service tests run in microseconds and can look at every row.

Records are copied in and out, as a real database does: the service cannot change a stored
row by mutating an object it holds, so a missing `update` shows up as a stale row.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from metald.core.errors import AlreadyExists
from metald.core.models import VmRecord, VmSummary
from metald.core.states import LIVE_STATES, VmState

from .faults import Faults


class MemoryStore:
    def __init__(self) -> None:
        # Every row ever written, deleted ones included (their ids stay taken).
        self.rows: dict[str, VmRecord] = {}
        self.faults = Faults()
        self.migrated = False
        self.closed = False

    async def migrate(self) -> None:
        await self.faults.enter("migrate")
        self.migrated = True

    async def insert(self, vm: VmRecord) -> None:
        await self.faults.enter("insert")
        if vm.id in self.rows:
            raise AlreadyExists(f"vm_id {vm.id!r} is taken")  # what the primary key refuses
        self.rows[vm.id] = copy.deepcopy(vm)

    async def get(self, vm_id: str) -> VmRecord | None:
        await self.faults.enter("get")
        row = self.rows.get(vm_id)
        if row is None or row.deleted_at is not None:
            return None
        return copy.deepcopy(row)

    async def update(self, vm: VmRecord) -> None:
        await self.faults.enter("update")
        if vm.id in self.rows:  # an UPDATE of a missing row changes nothing
            self.rows[vm.id] = copy.deepcopy(vm)

    async def remove(self, vm_id: str) -> None:
        await self.faults.enter("remove")
        self.rows.pop(vm_id, None)

    async def list_live(self) -> list[VmRecord]:
        await self.faults.enter("list_live")
        return [copy.deepcopy(r) for r in self.rows.values() if r.deleted_at is None]

    async def list_for_start(self) -> tuple[list[VmRecord], set[str]]:
        await self.faults.enter("list_for_start")
        mine = [r for r in self.rows.values() if r.deleted_at is None]
        wanted = [r for r in mine if r.state in LIVE_STATES or r.config.network]
        return [copy.deepcopy(r) for r in wanted], {r.id for r in mine}

    async def live_backends(self) -> set[str]:
        await self.faults.enter("live_backends")
        return {r.backend for r in self.rows.values() if r.deleted_at is None}

    async def list_for_customer(
        self,
        customer_id: str | None,
        states: Sequence[VmState],
        limit: int,
        after: tuple[float, str] | None,
    ) -> tuple[list[VmSummary], int]:
        await self.faults.enter("list_for_customer")
        matching = sorted(
            (
                r
                for r in self.rows.values()
                if customer_id in (None, r.customer_id)
                and r.deleted_at is None
                and (not states or r.state in states)
            ),
            key=lambda r: (r.created_at, r.id),
        )
        page = [r for r in matching if after is None or (r.created_at, r.id) > after][:limit]
        return [VmSummary.of(r) for r in page], len(matching)

    async def count_by_state_and_backend(self) -> dict[tuple[VmState, str], int]:
        await self.faults.enter("count_by_state_and_backend")
        counts: dict[tuple[VmState, str], int] = {}
        for row in self.rows.values():
            if row.deleted_at is None:
                counts[row.state, row.backend] = counts.get((row.state, row.backend), 0) + 1
        return counts

    async def ping(self) -> None:
        await self.faults.enter("ping")

    async def close(self) -> None:
        self.closed = True

    # -- for tests --------------------------------------------------------------------------

    def live(self) -> dict[str, VmRecord]:
        """Rows that are not deleted, by id (copies are not needed: tests only read)."""
        return {k: r for k, r in self.rows.items() if r.deleted_at is None}

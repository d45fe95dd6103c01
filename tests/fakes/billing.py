"""A fake Billing port: records every call in order, and can be told to fail.

`calls` holds every call that succeeded, as (method, vm_id, customer_id, payload); a
failure injected with `faults.fail(method, error)` (BillingUnavailable: "retry later",
BillingRejected: "never again") is raised before anything is recorded, as a call that did
not arrive. `down` makes every call raise BillingUnavailable until it is cleared (an
outage); `attempts` counts every call, failed ones included.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from metald.core.errors import BillingUnavailable
from metald.core.metering import UsageRecord

from .faults import Faults


@dataclass(frozen=True)
class BillingCall:
    method: str
    vm_id: str
    customer_id: str
    payload: Any


class FakeBilling:
    def __init__(self) -> None:
        self.calls: list[BillingCall] = []
        self.faults = Faults()
        self.down = False
        self.attempts = 0
        self.closed = False

    async def _enter(self, method: str) -> None:
        self.attempts += 1
        if self.down:
            raise BillingUnavailable("billing is down (fake)")
        await self.faults.enter(method)

    async def send_batch(
        self, vm_id: str, customer_id: str, records: Sequence[UsageRecord]
    ) -> None:
        await self._enter("send_batch")
        self.calls.append(BillingCall("send_batch", vm_id, customer_id, tuple(records)))

    async def heartbeat(self, instance_id: str, active_vm_ids: Sequence[str]) -> None:
        await self._enter("heartbeat")
        self.calls.append(BillingCall("heartbeat", "", "", (instance_id, tuple(active_vm_ids))))

    async def vm_started(self, vm_id: str, customer_id: str, at_ns: int) -> None:
        await self._enter("vm_started")
        self.calls.append(BillingCall("vm_started", vm_id, customer_id, at_ns))

    async def vm_stopped(self, vm_id: str, customer_id: str, at_ns: int) -> None:
        await self._enter("vm_stopped")
        self.calls.append(BillingCall("vm_stopped", vm_id, customer_id, at_ns))

    async def possible_gap(
        self, vm_id: str, customer_id: str, last_sent_ns: int, resume_ns: int
    ) -> None:
        await self._enter("possible_gap")
        self.calls.append(
            BillingCall("possible_gap", vm_id, customer_id, (last_sent_ns, resume_ns))
        )

    async def close(self) -> None:
        self.closed = True

    # -- for tests ------------------------------------------------------------------------

    def records(self, vm_id: str) -> list[UsageRecord]:
        """Every record billing received for the VM, in arrival order (duplicates kept)."""
        return [
            r
            for c in self.calls
            if c.method == "send_batch" and c.vm_id == vm_id
            for r in c.payload
        ]

    def of_vm(self, vm_id: str) -> list[str]:
        """The methods called for the VM, in order (a batch once per call)."""
        return [c.method for c in self.calls if c.vm_id == vm_id]

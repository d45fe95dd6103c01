"""Billing calls as spans: a core.ports.Billing that wraps another one.

Every call to the billing service (billing.v1: the existing billaged or `metald
billing-sink`) is a step an operator wants to see in a trace: a child of the RPC that caused
it (BootVm's NotifyVmStarted, ShutdownVm's final batch), or a trace of its own when the
metering delivery sends from its background task. Wrapping the port keeps the billing client
and the metering service free of tracing; with tracing off each call costs one test.
Spans go through the tracing port (core/tracing.py), so this module needs no OpenTelemetry.
"""

from __future__ import annotations

from collections.abc import Sequence

from metald.core import tracing
from metald.core.metering import UsageRecord
from metald.core.ports import Billing


class TracedBilling:
    def __init__(self, inner: Billing) -> None:
        self._inner = inner

    async def send_batch(
        self, vm_id: str, customer_id: str, records: Sequence[UsageRecord]
    ) -> None:
        attributes = _ids(vm_id, customer_id) | {"metald.billing.records": len(records)}
        with tracing.span("billing.send_batch", attributes):
            await self._inner.send_batch(vm_id, customer_id, records)

    async def heartbeat(self, instance_id: str, active_vm_ids: Sequence[str]) -> None:
        attributes = {"metald.billing.active_vms": len(active_vm_ids)}
        with tracing.span("billing.heartbeat", attributes):
            await self._inner.heartbeat(instance_id, active_vm_ids)

    async def vm_started(self, vm_id: str, customer_id: str, at_ns: int) -> None:
        with tracing.span("billing.vm_started", _ids(vm_id, customer_id)):
            await self._inner.vm_started(vm_id, customer_id, at_ns)

    async def vm_stopped(self, vm_id: str, customer_id: str, at_ns: int) -> None:
        with tracing.span("billing.vm_stopped", _ids(vm_id, customer_id)):
            await self._inner.vm_stopped(vm_id, customer_id, at_ns)

    async def possible_gap(
        self, vm_id: str, customer_id: str, last_sent_ns: int, resume_ns: int
    ) -> None:
        with tracing.span("billing.possible_gap", _ids(vm_id, customer_id)):
            await self._inner.possible_gap(vm_id, customer_id, last_sent_ns, resume_ns)

    async def close(self) -> None:
        await self._inner.close()


def _ids(vm_id: str, customer_id: str) -> dict[str, str | int]:
    return {"metald.vm_id": vm_id, "metald.customer_id": customer_id}

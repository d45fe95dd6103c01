"""UNKEY_METALD_BILLING_MOCK_MODE=true: billing that goes nowhere, one JSON log line a call.

For a host without a billing service where metering should still run end to end (the
records are stored, "delivered" and pruned as usual): every call succeeds and is logged as
one JSON object on the `metald.billing.mock` logger, with the fields the real call would
carry (a batch as its count and its first and last sample, not every sample).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from metald.core.metering import UsageRecord

log = logging.getLogger("metald.billing.mock")


class MockBilling:
    """core.ports.Billing that only logs."""

    def __init__(self, logger: logging.Logger = log) -> None:
        self._log = logger

    async def send_batch(
        self, vm_id: str, customer_id: str, records: Sequence[UsageRecord]
    ) -> None:
        self._emit(
            "SendMetricsBatch",
            tenant=customer_id,
            vm_id=vm_id,
            customer_id=customer_id,
            records=len(records),
            first=_sample(records[0]) if records else None,
            last=_sample(records[-1]) if records else None,
        )

    async def heartbeat(self, instance_id: str, active_vm_ids: Sequence[str]) -> None:
        self._emit("SendHeartbeat", instance_id=instance_id, active_vms=list(active_vm_ids))

    async def vm_started(self, vm_id: str, customer_id: str, at_ns: int) -> None:
        self._emit(
            "NotifyVmStarted", tenant=customer_id, vm_id=vm_id, customer_id=customer_id,
            start_time=at_ns,
        )  # fmt: skip

    async def vm_stopped(self, vm_id: str, customer_id: str, at_ns: int) -> None:
        self._emit("NotifyVmStopped", tenant=customer_id, vm_id=vm_id, stop_time=at_ns)

    async def possible_gap(
        self, vm_id: str, customer_id: str, last_sent_ns: int, resume_ns: int
    ) -> None:
        self._emit(
            "NotifyPossibleGap", tenant=customer_id, vm_id=vm_id, last_sent=last_sent_ns,
            resume_time=resume_ns,
        )  # fmt: skip

    async def close(self) -> None:
        pass

    def _emit(self, rpc: str, **fields: Any) -> None:
        line = json.dumps({"event": "billing_mock", "rpc": rpc, **fields}, sort_keys=True)
        self._log.info("%s", line)


def _sample(record: UsageRecord) -> dict[str, int]:
    return {
        "timestamp_ns": record.timestamp_ns,
        "cpu_time_ns": record.cpu_time_ns,
        "memory_bytes": record.memory_bytes,
        "disk_read_bytes": record.disk_read_bytes,
        "disk_write_bytes": record.disk_write_bytes,
        "network_rx_bytes": record.network_rx_bytes,
        "network_tx_bytes": record.network_tx_bytes,
    }

"""Metering's two loops (the collector and the delivery), started and stopped together.

The collector ticks and the delivery flushes as tasks of the daemon. Stopping ends the
collector first (no new records), then the delivery's loop, then makes one last attempt,
bounded by `flush_timeout`, to deliver what is pending: what it cannot send waits in the
database for the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from metald.core.ports import Billing
from metald.service.delivery import Delivery
from metald.service.metering import Collector

log = logging.getLogger(__name__)


class MeteringLoops:
    def __init__(
        self, collector: Collector, delivery: Delivery, billing: Billing, flush_timeout: float
    ) -> None:
        self.collector = collector
        self.delivery = delivery
        self._billing = billing
        self._flush_timeout = flush_timeout
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """After the service has adopted its VMs (gap notices need the live ones)."""
        await self.collector.start()
        self._tasks = [
            asyncio.create_task(self.collector.run(), name="metering-collector"),
            asyncio.create_task(self.delivery.run(), name="billing-delivery"),
        ]

    async def stop(self) -> None:
        """Idempotent. The final flush only when the loops ran; the client is closed always."""
        started, self._tasks = self._tasks, []
        for task in started:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if started:
            try:
                await self.delivery.final_flush(self._flush_timeout)
            except Exception:
                log.exception("billing: final flush failed; entries wait in the database")
        with contextlib.suppress(Exception):
            await self._billing.close()

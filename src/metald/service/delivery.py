"""Delivery of the usage outbox to billing (core.ports.Billing): in order, at least once.

Every flush interval (or at once when a notice is stored) the undelivered entries of each
VM are read from the outbox and sent as their calls (core.outbox.send_units: batches of
samples, each notice alone), the VMs side by side and each VM's calls one after another.
An entry is marked delivered only after its call returned, so a crash or an outage between
the two sends it again (billing drops a duplicate sample by (vm, timestamp); the deltas it
bills do not change). A VM whose call fails stops there for this round: its later entries
wait, so they never overtake it.

Failures: BillingUnavailable (unreachable, or an answer that may not mean arrival) keeps
the entries and backs off exponentially with jitter (`retry_initial` doubling to
`retry_max`, each wait drawn from its upper half), records piling up in the database
meanwhile (bounded: service/metering.py). BillingRejected (billing answered no) is not
retried: the entries are logged loudly and marked delivered, since sending them again
would only be refused again and would hold the VM's later records back for good.

Also here: the heartbeat (every `heartbeat_interval`, with the host's instance id and its
live VMs; not stored: a missed one says nothing a later one does not), and pruning of
entries delivered more than `retention` ago.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from metald.core.errors import BillingRejected, BillingUnavailable
from metald.core.metering import MeteringStats, UsageRecord
from metald.core.outbox import Entry, EntryKind, send_units
from metald.core.ports import Billing, UsageLog

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeliverySettings:
    batch_size: int = 100  # records per SendMetricsBatch
    flush_interval: float = 1.0  # seconds between rounds
    retry_initial: float = 0.5  # first wait after a failure
    retry_max: float = 30.0
    heartbeat_interval: float = 30.0
    retention: float = 24 * 3600.0  # delivered entries kept this long
    prune_interval: float = 60.0


class Delivery:
    def __init__(
        self,
        usage_log: UsageLog,
        billing: Billing,
        stats: MeteringStats,
        instance_id: str,
        active_vm_ids: Callable[[], Sequence[str]],
        settings: DeliverySettings = DeliverySettings(),
        *,
        clock: Callable[[], float] = time.time,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._log = usage_log
        self._billing = billing
        self.stats = stats
        self._instance_id = instance_id
        self._active = active_vm_ids
        self.settings = settings
        self._clock = clock
        self._jitter = jitter
        self._wake = asyncio.Event()
        self.failures = 0  # consecutive rounds that failed
        self._next_heartbeat = 0.0
        self._next_prune = 0.0

    def wake(self) -> None:
        """Start a round now (a notice was stored)."""
        self._wake.set()

    def retry_delay(self) -> float:
        """The wait after `failures` failed rounds: exponential, capped, jittered."""
        s = self.settings
        ceiling = min(s.retry_max, s.retry_initial * 2.0 ** max(0, self.failures - 1))
        return ceiling * (0.5 + 0.5 * self._jitter())

    async def run(self) -> None:
        """Rounds until cancelled."""
        while True:
            try:
                ok = await self.round()
            except Exception:
                log.exception("billing delivery round failed")
                ok = False
            wait = self.settings.flush_interval if ok else self.retry_delay()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)
            self._wake.clear()

    async def round(self) -> bool:
        """One flush (and a heartbeat and pruning when due); False if billing failed."""
        ok = await self.flush()
        now = self._clock()
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self.settings.heartbeat_interval
            ok = await self._heartbeat() and ok
        if now >= self._next_prune:
            self._next_prune = now + self.settings.prune_interval
            try:
                await self._log.prune(now - self.settings.retention)
            except Exception:
                log.exception("pruning delivered usage records failed")
        if ok and self.failures:
            log.info("billing reachable again after %d failed rounds", self.failures)
        self.failures = 0 if ok else self.failures + 1
        return ok

    async def flush(self, max_rounds: int = 1000) -> bool:
        """Send what is pending, in order, until a call fails or what is left was stored
        after the round began (a backlog is read `per_vm` entries at a time; records that
        arrive meanwhile wait for the next flush, so a steady stream goes in batches)."""
        per_vm = self.settings.batch_size * 4
        for _ in range(max_rounds):
            pending = await self._log.pending(per_vm=per_vm)
            results = await asyncio.gather(*(self._send_vm(es) for es in pending.values()))
            # One mark for the round: an entry sent but not marked (a crash now) is sent
            # again at the next start, which billing's (vm, timestamp) rule absorbs.
            sent = [e for ok_entries, _ in results for e in ok_entries]
            if sent:
                await self._log.delivered(sent, self._clock())
                self.stats.last_delivery_unix = self._clock()
            self.stats.backlog_records = await self._log.backlog()
            if not all(ok for _, ok in results):
                return False
            if all(len(es) < per_vm for es in pending.values()):
                break  # every VM's backlog was read whole
        return True

    async def _send_vm(self, entries: list[Entry]) -> tuple[list[Entry], bool]:
        """Send the VM's entries in order; those delivered (or refused for good), and
        whether all went."""
        done: list[Entry] = []
        for unit in send_units(entries, self.settings.batch_size):
            try:
                await self._send(unit)
            except BillingUnavailable as exc:
                self._failed(unit, exc)
                return done, False
            except BillingRejected as exc:
                self.stats.send_failures_total += 1
                log.error(
                    "billing REFUSED %d %s entries of vm %s (seq %d-%d), dropped: %s",
                    len(unit),
                    unit[0].kind.value,
                    unit[0].vm_id,
                    unit[0].seq,
                    unit[-1].seq,
                    exc,
                )
            done += unit
        return done, True

    def _failed(self, unit: list[Entry], exc: Exception) -> None:
        self.stats.send_failures_total += 1
        if self.failures:
            self.stats.send_retries_total += 1
        # One warning per outage (its first failure); the retries that follow at debug.
        log.log(
            logging.DEBUG if self.failures else logging.WARNING,
            "billing unreachable (vm %s: %d entries, of %d undelivered, wait in the "
            "database; retrying with backoff): %s",
            unit[0].vm_id,
            len(unit),
            self.stats.backlog_records,
            exc,
        )

    async def _send(self, unit: list[Entry]) -> None:
        first = unit[0]
        vm, customer = first.vm_id, first.customer_id
        if first.kind is EntryKind.SAMPLE:
            records: list[UsageRecord] = [e.record for e in unit if e.record is not None]
            await self._billing.send_batch(vm, customer, records)
            self.stats.batches_sent_total += 1
            self.stats.records_sent_total += len(records)
            return
        if first.kind is EntryKind.STARTED:
            await self._billing.vm_started(vm, customer, first.at_ns)
        elif first.kind is EntryKind.STOPPED:
            await self._billing.vm_stopped(vm, customer, first.at_ns)
        else:
            await self._billing.possible_gap(vm, customer, first.gap_from_ns, first.at_ns)
        self.stats.notices_sent_total += 1

    async def _heartbeat(self) -> bool:
        try:
            await self._billing.heartbeat(self._instance_id, list(self._active()))
        except (BillingUnavailable, BillingRejected) as exc:
            self.stats.send_failures_total += 1
            log.warning("billing heartbeat failed: %s", exc)
            return False
        self.stats.notices_sent_total += 1
        return True

    async def final_flush(self, timeout: float) -> None:
        """At shutdown: one last try to deliver what is pending, within `timeout`."""
        try:
            await asyncio.wait_for(self.flush(), timeout)
        except TimeoutError:
            log.warning("billing: final flush did not finish in %.1f s; entries wait", timeout)
        backlog = await self._log.backlog()
        if backlog:
            log.info("billing: %d usage entries wait in the database for the next start", backlog)

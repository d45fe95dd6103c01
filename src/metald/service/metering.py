"""The metering collector: every interval, one usage record of every running VM, stored.

Each tick samples every live VM with a VMM (RUNNING and PAUSED: a paused VM still holds its
memory; its vCPU threads do not run, so it accrues no CPU time) through its backend's
`sample_usage` (which GetVmInfo's `usage` then hands out: its figures are the collector's
latest sample) and its network's counters, turns the reading into cumulative counters
(core/counters.py) and stores every VM's record and state in ONE transaction (the outbox,
core/outbox.py): delivery to billing (service/delivery.py) reads from there.

Sampling one VM does not hold up the others: a sample reads /proc and counters kept from
the last reads of the slow sources, whose refreshes run in the background (the runtime's
disk counters, a VM's network counters here), so a slow VMM or netlink only makes those
counters older; a sample that still waits is given up after `sample_timeout` (one timer
runs over the tick's samples, not one per VM: bench/metering.py). One that fails or times
out skips that VM's tick (counted in MeteringStats.sample_errors_total) and
the VM's counters carry on at its next sample. A final sample (`exact`) reads everything
now, under a timeout of its own.

One lock orders everything that advances a VM's counters or adds to the outbox (ticks, a
final sample before a shutdown, notices): a VM's entries are stored in the order they
happened, and a reading is never advanced from a state newer than itself (which would look
like a counter that went back, and bill its whole value again).

The service calls the hooks (`started`, `final_sample`, `stopped`, `deleted`); at start-up
(`start`) the counters continue from the stored states, and every VM that was metered and
is still live gets a possible-gap notice from its last stored record to now.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from metald.core.counters import Meter, RawUsage, advance
from metald.core.metering import MeteringStats, UsageRecord
from metald.core.models import VmRecord
from metald.core.outbox import EntryKind, Notice
from metald.core.ports import Backend, Network, UsageLog
from metald.core.states import VmState

log = logging.getLogger(__name__)

METERED_STATES = frozenset({VmState.RUNNING, VmState.PAUSED})
TRAFFIC_MAX_AGE = 1.0  # seconds between reads of a VM's network counters


@dataclass(frozen=True)
class CollectorSettings:
    interval: float = 0.1  # seconds between ticks (UNKEY_METALD_METERING_INTERVAL_MS)
    sample_timeout: float = 1.0  # one VM's sample; past it the VM skips the tick
    backlog_max: int = 100_000  # undelivered entries kept before records replace records


class Collector:
    def __init__(
        self,
        usage_log: UsageLog,
        backends: Mapping[str, Backend],
        network: Network,
        live_vms: Callable[[], Iterable[VmRecord]],
        stats: MeteringStats,
        settings: CollectorSettings = CollectorSettings(),
        *,
        wall_ns: Callable[[], int] = time.time_ns,
        on_stored: Callable[[], None] | None = None,
    ) -> None:
        """`live_vms`: the VMs live now (the service's registry). `on_stored`: called after
        each stored entry (delivery wakes on a notice)."""
        self._log = usage_log
        self._backends = backends
        self._network = network
        self._live_vms = live_vms
        self.stats = stats
        self.settings = settings
        self._wall_ns = wall_ns
        self._on_stored = on_stored
        self._meters: dict[str, Meter] = {}
        # Each networked VM's last traffic counters (rx, tx), when read, and the read under way.
        self._traffic: dict[str, tuple[int, int]] = {}
        self._traffic_at: dict[str, float] = {}
        self._traffic_tasks: dict[str, asyncio.Task[None]] = {}
        self._lock = asyncio.Lock()
        self._full_logged = False
        self.stats.backlog_limit = settings.backlog_max

    # -- life ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the stored states; a possible-gap notice for each live VM metered before."""
        self._meters = await self._log.meters()
        now = self._wall_ns()
        gaps = [
            Notice(EntryKind.GAP, vm.id, vm.customer_id, now, meter.record.timestamp_ns)
            for vm in self._live_vms()
            if vm.state in METERED_STATES and (meter := self._meters.get(vm.id)) is not None
        ]
        if gaps:
            log.info(
                "metering resumed: possible gaps for %d VMs since their last records", len(gaps)
            )
            await self._store_notices(gaps)
        self.stats.backlog_records = await self._log.backlog()

    async def run(self) -> None:
        """Tick every interval until cancelled; a late tick starts at once, missed ones are
        skipped (they would read the same counters)."""
        interval = self.settings.interval
        next_at = time.monotonic()
        while True:
            lag = time.monotonic() - next_at
            self.stats.tick_lag_seconds = max(0.0, lag)
            try:
                await self.tick()
            except Exception:
                log.exception("metering tick failed (records of this tick not stored)")
            next_at += interval
            now = time.monotonic()
            if next_at < now:
                next_at = now + interval - (now - next_at) % interval
            await asyncio.sleep(next_at - now)

    # -- ticks -----------------------------------------------------------------------------

    async def tick(self) -> None:
        # (a VM of a backend this daemon does not run is left alone, as the service does)
        vms = [
            vm
            for vm in self._live_vms()
            if vm.state in METERED_STATES and vm.backend in self._backends
        ]
        if not vms:
            return
        async with self._lock:
            # One after another, in this task: a sample does not wait on anything slow (the
            # runtime refreshes disk counters in the background, and network counters are
            # refreshed below, in tasks of their own), so a task per VM (tens of us each,
            # the tick's largest cost: bench/metering.py) buys nothing; a sample that does
            # wait is given up at the timeout.
            readings = await self._read_all(vms)
            meters = [
                advance(self._meters.get(vm.id), raw, vm.id, vm.customer_id, at)
                for vm, (raw, at) in zip(vms, readings, strict=True)
                if raw is not None
            ]
            await self._store(meters)

    async def _read_all(self, vms: list[VmRecord]) -> list[tuple[RawUsage | None, int]]:
        """Each VM's reading, one after another under one timer: a tick's sample waits on
        nothing slow (disk and network counters are refreshed in the background), so a
        timer per VM (armed and cancelled: a quarter of a sample's cost) buys nothing. A
        sample that still hangs is given up when the timer fires and the VMs after it are
        read under a new one."""
        readings: list[tuple[RawUsage | None, int]] = []
        while len(readings) < len(vms):
            try:
                async with asyncio.timeout(self.settings.sample_timeout):
                    for vm in vms[len(readings) :]:
                        readings.append(await self._read_one(vm, exact=False))
            except TimeoutError:
                vm = vms[len(readings)]
                log.debug("vm %s: usage sample timed out", vm.id)
                self.stats.samples_total += 1
                self.stats.sample_errors_total += 1
                readings.append((None, self._wall_ns()))
        return readings

    async def _read(self, vm: VmRecord, exact: bool = False) -> tuple[RawUsage | None, int]:
        """One VM's reading, given up after the sample timeout."""
        try:
            async with asyncio.timeout(self.settings.sample_timeout):
                return await self._read_one(vm, exact)
        except TimeoutError:
            self.stats.samples_total += 1
            self.stats.sample_errors_total += 1
            log.debug("vm %s: usage sample timed out", vm.id)
            return None, self._wall_ns()

    async def _read_one(self, vm: VmRecord, exact: bool) -> tuple[RawUsage | None, int]:
        try:
            raw = await self._raw(vm, exact)
        except Exception as exc:  # one VM's failure is that VM's tick only
            raw = None
            log.debug("vm %s: usage sample failed: %r", vm.id, exc)
        at = self._wall_ns()
        self.stats.samples_total += 1
        if raw is None:
            self.stats.sample_errors_total += 1
        return raw, at

    async def _raw(self, vm: VmRecord, exact: bool) -> RawUsage | None:
        backend = self._backends.get(vm.backend)
        if backend is None:
            return None
        usage = await backend.sample_usage(vm.id, exact=exact)
        if usage.process is None:
            return None  # no VMM (it is exiting): nothing to read
        before = self._meters.get(vm.id)
        rx = before.raw.network_rx_bytes if before else 0
        tx = before.raw.network_tx_bytes if before else 0
        if vm.config.network:
            if exact:
                await self._read_traffic(vm)
            else:
                self._refresh_traffic(vm)
            rx, tx = self._traffic.get(vm.id, (rx, tx))
        return RawUsage(
            vmm=f"{usage.process.pid}:{usage.process.start_time}",
            cpu_time_ns=usage.vcpu_time_ns,
            memory_bytes=usage.memory_bytes,
            disk_read_bytes=usage.disk_read_bytes,
            disk_write_bytes=usage.disk_write_bytes,
            network_rx_bytes=rx,
            network_tx_bytes=tx,
        )

    def _refresh_traffic(self, vm: VmRecord) -> None:
        """Read the VM's network counters in the background when the last read is a
        second old (the network's own reading is as old: network/port.py)."""
        task = self._traffic_tasks.get(vm.id)
        if task is not None and not task.done():
            return
        if time.monotonic() - self._traffic_at.get(vm.id, -1e9) < TRAFFIC_MAX_AGE:
            return
        self._traffic_tasks[vm.id] = asyncio.ensure_future(self._read_traffic(vm))

    async def _read_traffic(self, vm: VmRecord) -> None:
        asked = time.monotonic()
        try:
            async with asyncio.timeout(self.settings.sample_timeout):
                info = await self._network.describe(vm.id, vm.customer_id, vm.config.network)
        except Exception as exc:
            log.debug("vm %s: network counters not read: %r", vm.id, exc)
            return
        self._traffic_at[vm.id] = asked
        if info is not None and info.counters is not None:
            c = info.counters
            self._traffic[vm.id] = (c.bytes_received, c.bytes_transmitted)

    async def _store(self, meters: list[Meter], notices: list[Notice] | None = None) -> None:
        limit = self.settings.backlog_max
        replaced = await self._log.record_tick(meters, notices or [], limit)
        for meter in meters:
            self._meters[meter.record.vm_id] = meter  # only once stored
        backlog = await self._log.backlog()
        self.stats.backlog_records = backlog
        if replaced:
            self.stats.backlog_full_total += replaced
            if not self._full_logged:
                log.error(
                    "METERING BACKLOG FULL: %d undelivered entries (UNKEY_METALD_BILLING_"
                    "BACKLOG_MAX=%d); billing is not taking records: each VM's newest "
                    "undelivered record is now replaced by the next (usage is kept, its "
                    "resolution is not)",
                    backlog,
                    limit,
                )
                self._full_logged = True
        elif self._full_logged and backlog < limit:
            log.warning("metering backlog below its bound again (%d entries)", backlog)
            self._full_logged = False
        if notices and self._on_stored is not None:
            self._on_stored()

    async def _store_notices(self, notices: list[Notice]) -> None:
        await self._store([], notices)

    # -- hooks of the service ------------------------------------------------------------

    async def started(self, vm: VmRecord) -> None:
        """The VM's vCPUs were started (BootVm). A VM metered for the first time also gets a
        baseline record of zeros at this instant: billing bills the deltas between a VM's
        records and takes the first as the baseline, so without it what the VM used before
        its first tick (up to an interval of CPU, the boot's first disk reads) would never
        be billed. Its VMM identity is none, so the first reading counts from zero."""
        async with self._lock:
            now = self._wall_ns()
            await self._store_notices([Notice(EntryKind.STARTED, vm.id, vm.customer_id, now)])
            if vm.id not in self._meters:
                baseline = UsageRecord(vm_id=vm.id, customer_id=vm.customer_id, timestamp_ns=now)
                await self._store([Meter(raw=RawUsage(vmm=""), record=baseline)])

    async def final_sample(self, vm: VmRecord) -> None:
        """One record now, before the VMM is stopped (ShutdownVm, DeleteVm). A failure is
        logged: the last tick's record stands."""
        async with self._lock:
            raw, at = await self._read(vm, exact=True)
            if raw is not None:
                await self._store(
                    [advance(self._meters.get(vm.id), raw, vm.id, vm.customer_id, at)]
                )

    async def stopped(self, vm: VmRecord) -> None:
        """The VM's VMM has ended (after its last record)."""
        async with self._lock:
            await self._store_notices(
                [Notice(EntryKind.STOPPED, vm.id, vm.customer_id, self._wall_ns())]
            )

    async def deleted(self, vm_id: str) -> None:
        """The VM is gone for good: its state goes (its entries stay until delivered)."""
        async with self._lock:
            self._meters.pop(vm_id, None)
            self._traffic.pop(vm_id, None)
            self._traffic_at.pop(vm_id, None)
            self._traffic_tasks.pop(vm_id, None)
            with contextlib.suppress(Exception):
                await self._log.forget(vm_id)

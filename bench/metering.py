"""Issue 9's metering benchmark: the collector's CPU per VM at its 100 ms interval (target
below 0.2% of one core per VM).

In one process, as in metald: the real VMM runtime (QEMU, run directly) with N VMs, the
real collector (vCPU threads' schedstat, RSS, QMP query-blockstats per VM per tick), the
real SQLite outbox (one transaction per tick) and the real delivery, to a billing that
accepts every call at once (its wire cost is the billing client's, measured elsewhere).
The VMs are booted and then paused, so the guests leave the machine's two cores to what is
measured; a paused VM is sampled exactly like a running one. The cost is this process's
CPU time (every thread: the event loop and the database's worker) over a fixed span with N
VMs metered, minus the same VMs not metered (the runtime's own timers: log caps, process
watches), per VM, as a share of one core.

    .venv/bin/python -m bench.metering [--counts 0,5,10] [--span 10] [--repeat 3] [--tiny]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from metald.assets.store import LocalAssetStore
from metald.backends.qemu.driver import QemuDriver
from metald.backends.vmm.runtime import VmmRuntime
from metald.core.metering import MeteringStats, UsageRecord
from metald.core.models import LaunchSpec, VmConfig, VmRecord
from metald.core.states import VmState
from metald.network.port import NoNetwork
from metald.service.delivery import Delivery, DeliverySettings
from metald.service.metering import Collector, CollectorSettings
from metald.store.database import Database
from metald.store.usage_log import SqlUsageLog

from .harness import ROOT, Report, Spread, arguments

MIB = 1024 * 1024


class AcceptingBilling:
    """Billing that takes every call (what it costs to send is the client's part)."""

    def __init__(self) -> None:
        self.records = 0

    async def send_batch(
        self, vm_id: str, customer_id: str, records: Sequence[UsageRecord]
    ) -> None:
        self.records += len(records)

    async def heartbeat(self, instance_id: str, active_vm_ids: Sequence[str]) -> None:
        return None

    async def vm_started(self, vm_id: str, customer_id: str, at_ns: int) -> None:
        return None

    async def vm_stopped(self, vm_id: str, customer_id: str, at_ns: int) -> None:
        return None

    async def possible_gap(
        self, vm_id: str, customer_id: str, last_sent_ns: int, resume_ns: int
    ) -> None:
        return None

    async def close(self) -> None:
        return None


async def measure(
    runtime: VmmRuntime,
    database: Database,
    vms: dict[str, VmRecord],
    span: float,
    interval: float,
    deliver: bool = True,
    meter: bool = True,
) -> tuple[float, MeteringStats, int]:
    """CPU seconds this process used over `span` with the collector and delivery running
    (`meter` False: neither, the runtime alone with its VMs: the baseline)."""
    stats = MeteringStats()
    usage_log = SqlUsageLog(database, node="bench")
    billing = AcceptingBilling()
    collector = Collector(
        usage_log,
        {"qemu": runtime},
        NoNetwork(),
        lambda: list(vms.values()),
        stats,
        CollectorSettings(interval=interval),
    )
    delivery = Delivery(usage_log, billing, stats, "bench", list, DeliverySettings())
    await collector.start()
    tasks = []
    if meter:
        tasks.append(asyncio.create_task(collector.run()))
    if meter and deliver:
        tasks.append(asyncio.create_task(delivery.run()))
    try:
        await asyncio.sleep(1.0)  # warm: first samples, thread ids, the pool's connection
        before_samples = stats.samples_total
        cpu0 = time.process_time()
        await asyncio.sleep(span)
        cpu = time.process_time() - cpu0
        samples = stats.samples_total - before_samples
    finally:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return cpu, stats, samples


async def run(args: argparse.Namespace, report: Report) -> None:
    store = LocalAssetStore(ROOT / "var" / "assets")
    if store.default() is None:
        raise SystemExit("no default guest in var/assets (make guest)")
    kernel, initrd = store.default_boot()
    counts: list[int] = [0, 1] if args.tiny else sorted({int(c) for c in args.counts.split(",")})
    span = 2.0 if args.tiny else args.span
    repeat = 1 if args.tiny else args.repeat
    work = Path(tempfile.mkdtemp(prefix="mb"))
    runtime = VmmRuntime(QemuDriver(), work / "vms")
    await runtime.start()
    database = Database(f"sqlite+aiosqlite:///{work / 'metald.db'}")
    await database.migrate()
    vms: dict[str, VmRecord] = {}
    try:
        for count in counts:
            while len(vms) < count:
                vm_id = f"bench-{len(vms)}"
                spec = LaunchSpec(vm_id, 1, args.memory_mib * MIB, kernel, initrd, "", ())
                await runtime.create(spec)
                await runtime.boot(vm_id)
                await runtime.pause(vm_id)
                vms[vm_id] = VmRecord(
                    id=vm_id,
                    customer_id="bench",
                    config=VmConfig(),
                    state=VmState.PAUSED,
                    backend="qemu",
                    created_at=0.0,
                    updated_at=0.0,
                )
            runs, idle_runs = [], []
            last_stats = MeteringStats()
            samples = 0
            for _ in range(repeat):
                # the same VMs without metering (the runtime's own timers: log caps,
                # process watches), then with it: the difference is metering's
                idle, _, _ = await measure(
                    runtime, database, vms, span, args.interval_ms / 1000, meter=False
                )
                idle_runs.append(100.0 * idle / span)
                cpu, last_stats, samples = await measure(
                    runtime, database, vms, span, args.interval_ms / 1000, not args.no_delivery
                )
                runs.append(100.0 * cpu / span)
            share, idle_share = Spread.of(runs), Spread.of(idle_runs)
            metering = Spread.of([m - i for m, i in zip(runs, idle_runs, strict=True)])
            per_vm = metering.median / count if count else None
            report.add(
                "cpu",
                {
                    "vms": count,
                    "idle_cpu_percent": idle_share,
                    "cpu_percent_of_a_core": share,
                    "metering_percent": metering,
                    "per_vm_percent": per_vm,
                    "target_per_vm_percent": 0.2,
                    "samples_per_second": samples / span,
                    "expected_samples_per_second": count * 1000 / args.interval_ms,
                    "sample_errors": last_stats.sample_errors_total,
                    "records_delivered": last_stats.records_sent_total,
                    "tick_lag_ms": last_stats.tick_lag_seconds * 1000,
                },
            )
    finally:
        for vm_id in list(vms):
            with contextlib.suppress(Exception):
                await runtime.destroy(vm_id)
        await runtime.close()
        await database.close()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--counts", default="0,5,10", help="metered VMs at each step")
    parser.add_argument("--span", type=float, default=10.0, help="seconds measured per run")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--interval-ms", type=int, default=100)
    parser.add_argument("--memory-mib", type=int, default=128)
    parser.add_argument("--no-delivery", action="store_true", help="the collector alone")
    args = arguments(__doc__ or "", parser)
    report = Report(
        "metering",
        args.tiny,
        parameters={
            "counts": args.counts,
            "span_seconds": args.span,
            "repeat": args.repeat,
            "interval_ms": args.interval_ms,
            "memory_mib": args.memory_mib,
            "delivery": not args.no_delivery,
        },
    )
    asyncio.run(run(args, report))
    report.table(
        "cpu",
        [
            ("vms", "VMs (paused)"),
            ("idle_cpu_percent", "runtime alone % of a core"),
            ("cpu_percent_of_a_core", "with metering %"),
            ("metering_percent", "metering's %"),
            ("per_vm_percent", "per VM %"),
            ("target_per_vm_percent", "target %"),
            ("samples_per_second", "samples/s"),
            ("expected_samples_per_second", "expected"),
            ("sample_errors", "errors"),
            ("tick_lag_ms", "last tick lag ms"),
        ],
        title="metering: the collector's CPU by metered VMs (100 ms interval)",
    )
    report.save(args.out)


if __name__ == "__main__":
    main()

"""The metering collector (service/metering.py) on the real service over fakes, the real
SQLite outbox and a fake Billing: what a tick stores, the service's hooks (started, final
sample, stopped), counters across a VMM restart and a metald restart (with its gap notice),
failed and slow samples, and the backlog bound."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fakes import FakeAssets, FakeBackend, FakeNetwork, MemoryQuotas, MemoryStore
from fakes.billing import FakeBilling
from fakes.quotas import fake_admission

from metald.app import instance_id
from metald.core.errors import BackendError
from metald.core.identity import customer
from metald.core.metering import MeteringStats, vm_usage
from metald.core.models import NetworkInterface, NetworkMode, VmConfig, VmUsage
from metald.core.validation import Limits
from metald.service.delivery import Delivery, DeliverySettings
from metald.service.metering import Collector, CollectorSettings
from metald.service.metering_loops import MeteringLoops
from metald.service.vm_service import VmService
from metald.store.database import Database
from metald.store.usage_log import SqlUsageLog

ALICE = "alice"


@dataclass
class World:
    store: MemoryStore
    backend: FakeBackend
    network: FakeNetwork
    database: Database
    billing: FakeBilling
    service: VmService
    collector: Collector
    delivery: Delivery

    def usage(self, vm_id: str, **counters: int) -> None:
        self.backend.readings[vm_id] = VmUsage(**counters)  # type: ignore[arg-type]


def wall(start: int) -> Iterator[int]:
    return itertools.count(start, 100_000_000)


async def make_world(
    database: Database,
    store: MemoryStore | None = None,
    backend: FakeBackend | None = None,
    billing: FakeBilling | None = None,
    wall_start: int = 1_700_000_000_000_000_000,
    **collector_settings: float,
) -> World:
    store = store or MemoryStore()
    backend = backend or FakeBackend("fake")
    network = FakeNetwork()
    billing = billing or FakeBilling()
    usage_log = SqlUsageLog(database, node="n")
    stats = MeteringStats()
    holder: list[VmService] = []
    clock = wall(wall_start)
    collector = Collector(
        usage_log,
        {"fake": backend},
        network,
        lambda: list(holder[0].registry.snapshot().values()),
        stats,
        CollectorSettings(**collector_settings),  # type: ignore[arg-type]
        wall_ns=lambda: next(clock),
    )
    service = VmService(
        store,
        {"fake": backend},
        FakeAssets({"kernels/vmlinux"}),
        network,
        Limits(max_vcpus=8, max_memory_bytes=8 * 1024**3),
        admission=fake_admission(MemoryQuotas(store)),
        metering=collector,
    )
    holder.append(service)
    delivery = Delivery(usage_log, billing, stats, "h", list, DeliverySettings(batch_size=50))
    await service.start()
    await collector.start()
    return World(store, backend, network, database, billing, service, collector, delivery)


@pytest.fixture
async def database(tmp_path: Path) -> AsyncIterator[Database]:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'metald.db'}")
    await db.migrate()
    yield db
    await db.close()


@pytest.fixture
async def w(database: Database) -> World:
    return await make_world(database)


async def running(w: World, vm_id: str) -> None:
    await w.service.create_vm(customer(ALICE), vm_id, VmConfig())
    await w.service.boot_vm(customer(ALICE), vm_id)


async def test_a_vms_life_is_started_records_stopped_in_order(w: World) -> None:
    await running(w, "vm1")
    for cpu in (100, 250, 400):
        w.usage("vm1", vcpu_time_ns=cpu, memory_bytes=64, disk_write_bytes=cpu // 10)
        await w.collector.tick()
    w.usage("vm1", vcpu_time_ns=450, memory_bytes=64, disk_write_bytes=45)
    await w.service.shutdown_vm(customer(ALICE), "vm1")  # takes the final sample first
    assert await w.delivery.flush()
    assert w.billing.of_vm("vm1") == ["vm_started", "send_batch", "vm_stopped"]
    records = w.billing.records("vm1")
    # the baseline of zeros at BootVm first: the usage before the first tick is billed too
    assert [r.cpu_time_ns for r in records] == [0, 100, 250, 400, 450]
    assert [r.disk_write_bytes for r in records] == [0, 10, 25, 40, 45]
    assert all(r.customer_id == ALICE for r in records)
    times = [r.timestamp_ns for r in records]
    assert times == sorted(times) and len(set(times)) == 5
    # a stopped VM is not sampled
    await w.collector.tick()
    assert await w.delivery.flush()
    assert len(w.billing.records("vm1")) == 5


async def test_counters_keep_growing_across_a_new_vmm_after_a_shutdown(w: World) -> None:
    await running(w, "vm1")
    w.usage("vm1", vcpu_time_ns=1000, disk_read_bytes=500)
    await w.collector.tick()
    await w.service.shutdown_vm(customer(ALICE), "vm1")
    await w.service.boot_vm(customer(ALICE), "vm1")  # a new VMM process: its counters start again
    w.usage("vm1", vcpu_time_ns=300, disk_read_bytes=50)
    await w.collector.tick()
    assert await w.delivery.flush()
    cpu = [r.cpu_time_ns for r in w.billing.records("vm1")]
    assert cpu[-1] == 1300 and cpu == sorted(cpu)
    assert w.billing.records("vm1")[-1].disk_read_bytes == 550
    assert w.billing.of_vm("vm1").count("vm_started") == 2


async def test_what_a_vm_used_before_its_first_tick_is_billed(w: World) -> None:
    """Billing takes a VM's first record as its baseline and bills the deltas after it: the
    baseline of zeros stored at BootVm makes the first tick's counters (the CPU and disk of
    the VM's first interval) billed, not swallowed as the baseline."""
    await running(w, "vm1")
    w.usage("vm1", vcpu_time_ns=70, disk_read_bytes=4096, memory_bytes=64)
    await w.collector.tick()
    assert await w.delivery.flush()
    billed = vm_usage("vm1", ALICE, w.billing.records("vm1"))
    assert (billed.cpu_time_ns, billed.disk_read_bytes) == (70, 4096)
    # a second boot of the same VM continues its counters: no second baseline
    await w.service.shutdown_vm(customer(ALICE), "vm1")
    await w.service.boot_vm(customer(ALICE), "vm1")
    w.usage("vm1", vcpu_time_ns=30, disk_read_bytes=0, memory_bytes=64)
    await w.collector.tick()
    assert await w.delivery.flush()
    records = w.billing.records("vm1")
    assert [r.cpu_time_ns for r in records].count(0) == 1
    assert vm_usage("vm1", ALICE, records).cpu_time_ns == 100


async def test_a_metald_restart_continues_the_counters_and_reports_a_possible_gap(
    w: World, database: Database
) -> None:
    await running(w, "vm1")
    w.usage("vm1", vcpu_time_ns=1000)
    await w.collector.tick()
    last = w.collector._meters["vm1"].record.timestamp_ns
    # metald stops (nothing delivered yet); the VMM lives on and keeps counting
    w.usage("vm1", vcpu_time_ns=1800)
    again = await make_world(
        database, w.store, w.backend, w.billing, wall_start=1_800_000_000_000_000_000
    )
    await again.collector.tick()
    assert await again.delivery.flush()
    assert w.billing.of_vm("vm1") == ["vm_started", "send_batch", "possible_gap", "send_batch"]
    gap_from, resume = w.billing.calls[2].payload
    assert gap_from == last and resume > last
    assert [r.cpu_time_ns for r in w.billing.records("vm1")] == [0, 1000, 1800]


async def test_a_paused_vm_is_sampled_and_accrues_no_cpu(w: World) -> None:
    await running(w, "vm1")
    w.usage("vm1", vcpu_time_ns=500, memory_bytes=64)
    await w.collector.tick()
    await w.service.pause_vm(customer(ALICE), "vm1")
    await w.collector.tick()  # the fake's vCPU counter did not move: nor does the bill
    assert await w.delivery.flush()
    assert [r.cpu_time_ns for r in w.billing.records("vm1")] == [0, 500, 500]
    assert w.billing.records("vm1")[-1].memory_bytes == 64


async def test_a_failed_sample_skips_that_vms_tick_only(w: World) -> None:
    await running(w, "vm1")
    await running(w, "vm2")
    w.usage("vm1", vcpu_time_ns=1)
    w.usage("vm2", vcpu_time_ns=2)
    w.backend.faults.fail("sample_usage", BackendError("qmp went away"))
    await w.collector.tick()
    assert await w.delivery.flush()
    # each VM's baseline, and one tick's record (the other VM's sample failed)
    assert len(w.billing.records("vm1")) + len(w.billing.records("vm2")) == 2 + 1
    assert w.collector.stats.sample_errors_total == 1
    assert w.collector.stats.samples_total == 2


async def test_a_sample_that_hangs_is_given_up_and_the_others_are_recorded(
    database: Database,
) -> None:
    class Stuck(FakeBackend):
        async def sample_usage(self, vm_id: str, *, exact: bool = False) -> VmUsage:
            if vm_id == "slow":
                await asyncio.Event().wait()  # never answers
            return await super().sample_usage(vm_id, exact=exact)

    w = await make_world(database, backend=Stuck("fake"), sample_timeout=0.05)
    await running(w, "slow")
    await running(w, "quick")
    w.usage("quick", vcpu_time_ns=5)
    await w.collector.tick()
    assert await w.delivery.flush()
    assert [r.cpu_time_ns for r in w.billing.records("quick")] == [0, 5]
    assert [r.cpu_time_ns for r in w.billing.records("slow")] == [0]  # its baseline only
    assert w.collector.stats.sample_errors_total == 1


async def test_a_full_backlog_is_bounded_counted_and_keeps_the_cumulative_usage(
    database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    w = await make_world(database, backlog_max=5)
    w.billing.down = True
    await running(w, "vm1")  # a started notice and the baseline record: 2 entries
    for cpu in range(1, 21):
        w.usage("vm1", vcpu_time_ns=cpu * 10)
        await w.collector.tick()
        assert not await w.delivery.flush()
    assert w.collector.stats.backlog_records == 5
    assert w.collector.stats.backlog_full_total == 17
    assert "METERING BACKLOG FULL" in caplog.text
    w.billing.down = False
    assert await w.delivery.flush()
    records = w.billing.records("vm1")
    assert records[-1].cpu_time_ns == 200  # the whole usage, at a lower resolution
    assert w.billing.of_vm("vm1")[0] == "vm_started"


async def test_delete_of_a_running_vm_sends_its_final_record_then_stopped(w: World) -> None:
    await running(w, "vm1")
    w.usage("vm1", vcpu_time_ns=70)
    await w.service.delete_vm(customer(ALICE), "vm1", force=True)
    assert await w.delivery.flush()
    assert w.billing.of_vm("vm1") == ["vm_started", "send_batch", "vm_stopped"]
    assert w.billing.records("vm1")[-1].cpu_time_ns == 70
    assert "vm1" not in await SqlUsageLog(w.database, node="n").meters()


async def test_a_networked_vm_is_billed_its_interfaces_traffic(w: World) -> None:
    config = VmConfig(network=(NetworkInterface(id="eth0", mode=NetworkMode.IPV4_ONLY),))
    await w.service.create_vm(customer(ALICE), "vm1", config)
    await w.service.boot_vm(customer(ALICE), "vm1")
    w.usage("vm1", vcpu_time_ns=1)
    await w.collector.tick()  # starts a read of the counters in the background
    for _ in range(10):
        await asyncio.sleep(0)  # (the fake answers at once)
    await w.collector.tick()  # has them
    assert await w.delivery.flush()
    baseline, first, second = w.billing.records("vm1")
    assert (baseline.network_rx_bytes, baseline.cpu_time_ns) == (0, 0)
    # the fake network's counters: 10 bytes received by the guest, 20 sent
    assert (first.network_rx_bytes, first.network_tx_bytes) == (0, 0)
    assert (second.network_rx_bytes, second.network_tx_bytes) == (10, 20)


async def test_a_network_read_that_hangs_holds_up_no_sample(w: World) -> None:
    config = VmConfig(network=(NetworkInterface(id="eth0", mode=NetworkMode.IPV4_ONLY),))
    await w.service.create_vm(customer(ALICE), "vm1", config)
    await w.service.boot_vm(customer(ALICE), "vm1")
    await running(w, "vm2")
    gate = w.network.faults.gate("describe")  # netlink never answers
    for cpu in (1, 2, 3):
        w.usage("vm1", vcpu_time_ns=cpu)
        w.usage("vm2", vcpu_time_ns=cpu)
        await w.collector.tick()
    await asyncio.sleep(0)  # the read runs in a task of its own: give it the loop once
    assert gate.entered.is_set()
    assert await w.delivery.flush()
    assert [r.cpu_time_ns for r in w.billing.records("vm1")] == [0, 1, 2, 3]
    assert [r.cpu_time_ns for r in w.billing.records("vm2")] == [0, 1, 2, 3]
    gate.release()


async def test_a_vmm_gone_while_metald_was_down_is_reported_stopped(
    w: World, database: Database
) -> None:
    await running(w, "vm1")
    w.usage("vm1", vcpu_time_ns=10)
    await w.collector.tick()
    w.backend.adoption["vm1"] = None  # its VMM died while metald was down
    again = await make_world(
        database, w.store, w.backend, w.billing, wall_start=1_800_000_000_000_000_000
    )
    assert await again.delivery.flush()
    assert w.billing.of_vm("vm1") == ["vm_started", "send_batch", "vm_stopped"]


async def test_the_loops_start_and_stop_with_a_final_flush_and_close_billing(
    w: World,
) -> None:
    loops = MeteringLoops(w.collector, w.delivery, w.billing, flush_timeout=5.0)
    await running(w, "vm1")
    w.usage("vm1", vcpu_time_ns=10)
    await loops.start()
    await w.collector.tick()
    await loops.stop()
    assert w.billing.records("vm1") and w.billing.closed
    await loops.stop()  # idempotent


def test_the_instance_id_is_made_once_and_kept(tmp_path: Path) -> None:
    first = instance_id(tmp_path)
    assert first.startswith("metald-") and instance_id(tmp_path) == first
    assert (tmp_path / "instance_id").stat().st_mode & 0o077 == 0

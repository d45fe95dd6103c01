"""Delivery of the outbox to billing (service/delivery.py) with a fake Billing and the real
SQLite outbox: batches in order per VM, retries with backoff, outages, refusals, heartbeats."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from fakes.billing import FakeBilling

from metald.core.counters import Meter, RawUsage, advance
from metald.core.errors import BillingRejected, BillingUnavailable
from metald.core.metering import MeteringStats
from metald.core.outbox import EntryKind, Notice
from metald.service.delivery import Delivery, DeliverySettings
from metald.store.database import Database
from metald.store.usage_log import SqlUsageLog


@pytest.fixture
async def usage_log(tmp_path: Path) -> AsyncIterator[SqlUsageLog]:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'metald.db'}")
    await db.migrate()
    yield SqlUsageLog(db, node="n")
    await db.close()


async def store_samples(log: SqlUsageLog, vm: str, n: int, start: int = 1) -> None:
    meter: Meter | None = None
    for i in range(start, start + n):
        meter = advance(meter, RawUsage(vmm="1:1", cpu_time_ns=i * 10), vm, "acme", i)
        await log.record_tick([meter], [], 10_000)


def delivery(log: SqlUsageLog, billing: FakeBilling, **kw: float) -> Delivery:
    settings = DeliverySettings(**{"batch_size": 10, **kw})  # type: ignore[arg-type]
    return Delivery(log, billing, MeteringStats(), "host-1", lambda: ["a"], settings)


async def test_records_go_in_batches_in_order_and_are_not_sent_again(
    usage_log: SqlUsageLog,
) -> None:
    billing = FakeBilling()
    await store_samples(usage_log, "a", 25)
    d = delivery(usage_log, billing)
    assert await d.flush()
    batches = [len(c.payload) for c in billing.calls if c.method == "send_batch"]
    assert batches == [10, 10, 5]
    assert [r.timestamp_ns for r in billing.records("a")] == list(range(1, 26))
    assert all(c.customer_id == "acme" for c in billing.calls)
    assert await d.flush()
    assert len(billing.records("a")) == 25
    assert await usage_log.backlog() == 0
    assert d.stats.records_sent_total == 25 and d.stats.batches_sent_total == 3


async def test_notices_go_between_the_records_they_were_stored_between(
    usage_log: SqlUsageLog,
) -> None:
    billing = FakeBilling()
    await usage_log.add_notices([Notice(EntryKind.STARTED, "a", "acme", 0)])
    await store_samples(usage_log, "a", 3)
    await usage_log.add_notices([Notice(EntryKind.STOPPED, "a", "acme", 9)])
    await usage_log.add_notices([Notice(EntryKind.GAP, "a", "acme", 20, gap_from_ns=9)])
    assert await delivery(usage_log, billing).flush()
    assert billing.of_vm("a") == ["vm_started", "send_batch", "vm_stopped", "possible_gap"]
    assert billing.calls[-1].payload == (9, 20)


async def test_an_outage_keeps_everything_and_it_arrives_in_order_when_billing_returns(
    usage_log: SqlUsageLog,
) -> None:
    billing = FakeBilling()
    d = delivery(usage_log, billing)
    await store_samples(usage_log, "a", 12)
    billing.down = True
    assert not await d.round()
    assert not await d.round()
    assert d.failures == 2 and billing.calls == []
    await store_samples(usage_log, "a", 12, start=13)
    assert await usage_log.backlog() == 24
    billing.down = False
    assert await d.round()
    assert d.failures == 0
    assert [r.timestamp_ns for r in billing.records("a")] == list(range(1, 25))
    assert d.stats.send_failures_total >= 2 and d.stats.send_retries_total >= 1


async def test_a_failed_batch_holds_back_its_vms_later_records_only(
    usage_log: SqlUsageLog,
) -> None:
    billing = FakeBilling()
    await store_samples(usage_log, "a", 15)
    await store_samples(usage_log, "b", 3)
    # a's second batch (and only it) does not arrive; b's goes
    calls = 0
    real = billing.send_batch

    async def flaky(vm_id: str, customer_id: str, records: object) -> None:
        nonlocal calls
        if vm_id == "a":
            calls += 1
            if calls == 2:
                raise BillingUnavailable("connection reset")
        await real(vm_id, customer_id, records)  # type: ignore[arg-type]

    billing.send_batch = flaky  # type: ignore[method-assign]
    d = delivery(usage_log, billing)
    assert not await d.flush()
    assert [r.timestamp_ns for r in billing.records("a")] == list(range(1, 11))
    assert len(billing.records("b")) == 3
    assert await d.flush()
    assert [r.timestamp_ns for r in billing.records("a")] == list(range(1, 16))


async def test_a_refused_batch_is_dropped_loudly_and_the_rest_goes_on(
    usage_log: SqlUsageLog, caplog: pytest.LogCaptureFixture
) -> None:
    billing = FakeBilling()
    billing.faults.fail("send_batch", BillingRejected("bad tenant"))
    await store_samples(usage_log, "a", 15)
    d = delivery(usage_log, billing)
    assert await d.flush()
    assert [r.timestamp_ns for r in billing.records("a")] == list(range(11, 16))
    assert "REFUSED 10 sample entries of vm a" in caplog.text
    assert await usage_log.backlog() == 0 and d.stats.send_failures_total == 1


def test_backoff_doubles_to_its_cap_with_jitter_in_the_upper_half() -> None:
    d = Delivery(
        None,  # type: ignore[arg-type]
        FakeBilling(),
        MeteringStats(),
        "h",
        list,
        DeliverySettings(retry_initial=0.5, retry_max=4.0),
        jitter=lambda: 1.0,
    )
    ceilings = []
    for failures in range(1, 7):
        d.failures = failures
        ceilings.append(d.retry_delay())
    assert ceilings == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    d._jitter = lambda: 0.0
    d.failures = 3
    assert d.retry_delay() == 1.0


async def test_heartbeat_names_the_host_and_its_live_vms_and_is_due_every_interval(
    usage_log: SqlUsageLog,
) -> None:
    billing = FakeBilling()
    now = [1000.0]
    d = Delivery(
        usage_log,
        billing,
        MeteringStats(),
        "host-1",
        lambda: ["a", "b"],
        DeliverySettings(heartbeat_interval=30.0),
        clock=lambda: now[0],
    )
    await d.round()
    await d.round()
    now[0] += 31
    await d.round()
    beats = [c.payload for c in billing.calls if c.method == "heartbeat"]
    assert beats == [("host-1", ("a", "b"))] * 2


async def test_delivered_entries_are_pruned_after_the_retention_window(
    usage_log: SqlUsageLog,
) -> None:
    billing = FakeBilling()
    now = [1000.0]
    d = Delivery(
        usage_log,
        billing,
        MeteringStats(),
        "h",
        list,
        DeliverySettings(retention=60.0, prune_interval=10.0),
        clock=lambda: now[0],
    )
    await store_samples(usage_log, "a", 3)
    assert await d.round()  # delivered at t=1000 (and a prune of nothing)
    now[0] += 70  # 70 s after delivery: past the window
    await d.round()
    assert await usage_log.prune(before=now[0]) == 0  # the round pruned them already
    assert len(billing.records("a")) == 3

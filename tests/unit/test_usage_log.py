"""The usage outbox in the database (store/usage_log.py, real SQLite): one transaction per
tick, order by seq, the backlog bound, delivery marks, pruning, state kept across a restart."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from metald.core.counters import Meter, RawUsage, advance
from metald.core.outbox import EntryKind, Notice, send_units
from metald.store.database import Database
from metald.store.usage_log import SqlUsageLog


@pytest.fixture
async def database(tmp_path: Path) -> AsyncIterator[Database]:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'metald.db'}")
    await db.migrate()
    yield db
    await db.close()


@pytest.fixture(params=["sqlite-writer", "engine"])
def make_log(request: pytest.FixtureRequest) -> Callable[..., SqlUsageLog]:
    """Both paths: SQLite's one-hop writer (store/tick_writer.py) and the engine's (what
    another database uses)."""

    def make(database: Database, node: str = "n") -> SqlUsageLog:
        log = SqlUsageLog(database, node=node)
        if request.param == "engine":
            log._writer = None
        return log

    return make


def meter(vm: str, at: int, cpu: int, before: Meter | None = None) -> Meter:
    return advance(before, RawUsage(vmm="1:1", cpu_time_ns=cpu), vm, "acme", at)


async def test_a_tick_stores_every_vm_and_pending_is_in_order_per_vm(
    database: Database, make_log: Callable[..., SqlUsageLog]
) -> None:
    log = make_log(database)
    a1, b1 = meter("a", 1, 10), meter("b", 1, 5)
    await log.record_tick([a1, b1], [], 1000)
    await log.add_notices([Notice(EntryKind.STOPPED, "a", "acme", 2)])
    await log.record_tick([meter("a", 3, 20, a1)], [], 1000)
    pending = await log.pending(per_vm=10)
    assert [(e.kind, e.at_ns) for e in pending["a"]] == [
        (EntryKind.SAMPLE, 1),
        (EntryKind.STOPPED, 2),
        (EntryKind.SAMPLE, 3),
    ]
    assert [e.record.cpu_time_ns for e in pending["b"] if e.record] == [5]
    assert await log.backlog() == 4
    assert [len(u) for u in send_units(pending["a"], 10)] == [1, 1, 1]
    # per_vm bounds each VM's share
    assert [e.at_ns for e in (await log.pending(per_vm=1))["a"]] == [1]


async def test_delivered_entries_leave_the_backlog_and_are_pruned_later(
    database: Database, make_log: Callable[..., SqlUsageLog]
) -> None:
    log = make_log(database)
    await log.record_tick([meter("a", 1, 10), meter("b", 1, 5)], [], 1000)
    pending = await log.pending(per_vm=10)
    await log.delivered(pending["a"], at=100.0)
    assert await log.backlog() == 1
    assert list(await log.pending(per_vm=10)) == ["b"]
    assert await log.prune(before=99.0) == 0
    assert await log.prune(before=101.0) == 1
    assert await log.backlog() == 1


async def test_state_continues_after_a_restart(
    database: Database, make_log: Callable[..., SqlUsageLog]
) -> None:
    log = make_log(database)
    m = meter("a", 1, 10)
    await log.record_tick([m], [], 1000)
    m2 = meter("a", 2, 30, m)
    await log.record_tick([m2], [], 1000)
    again = make_log(database)  # a restarted metald
    assert await again.meters() == {"a": m2}
    assert await again.backlog() == 2
    await again.forget("a")
    assert await again.meters() == {}
    assert await make_log(database, "other").meters() == {}


async def test_a_full_backlog_replaces_each_vms_newest_sample_and_keeps_notices(
    database: Database, make_log: Callable[..., SqlUsageLog]
) -> None:
    log = make_log(database)
    m = meter("a", 1, 10)
    await log.record_tick([m], [], 2)
    m = meter("a", 2, 20, m)
    await log.record_tick([m], [], 2)
    assert await log.backlog() == 2  # now full
    m = meter("a", 3, 30, m)
    assert await log.record_tick([m], [], 2) == 1  # replaced the newest (t=2)
    got = [
        (e.at_ns, e.record.cpu_time_ns if e.record else None) for e in (await log.pending(9))["a"]
    ]
    assert got == [(1, 10), (3, 30)]  # cumulative: nothing lost, only resolution
    await log.add_notices([Notice(EntryKind.STOPPED, "a", "acme", 4)])
    m = meter("a", 5, 50, m)
    # the newest undelivered entry is a notice: never replaced; the record is added
    assert await log.record_tick([m], [], 2) == 0
    kinds = [e.kind for e in (await log.pending(9))["a"]]
    assert kinds == [EntryKind.SAMPLE, EntryKind.SAMPLE, EntryKind.STOPPED, EntryKind.SAMPLE]
    assert await log.backlog() == 4

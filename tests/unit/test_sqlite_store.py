from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import event

from metald.core.errors import AlreadyExists
from metald.core.models import (
    DiskConfig,
    IPv4Config,
    IPv6Config,
    NetworkInterface,
    NetworkMode,
    ProcessIdentity,
    RateLimit,
    VmConfig,
    VmRecord,
    VmSummary,
)
from metald.core.states import VmState
from metald.store.addresses import SqlAddressBook
from metald.store.database import Database
from metald.store.sqlite import SqlStore, page_queries


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqlStore]:
    s = SqlStore(Database(f"sqlite+aiosqlite:///{tmp_path / 'metald.db'}"))
    await s.migrate()
    yield s
    await s.close()


def vm(vm_id: str, customer: str = "acme", created: float = 1.0, **kw: object) -> VmRecord:
    return VmRecord(
        id=vm_id,
        customer_id=customer,
        config=VmConfig(
            vcpu_count=2,
            storage=(DiskConfig(id="root", path="disk.img", is_root_device=True),),
            metadata={"team": "a"},
        ),
        state=VmState.CREATED,
        backend="qemu",
        created_at=created,
        updated_at=created,
        **kw,  # type: ignore[arg-type]
    )


async def test_round_trip_keeps_every_field(store: SqlStore) -> None:
    original = vm(
        "vm-1", process=ProcessIdentity(pid=42, start_time=99), backend_info={"exit_reason": "x"}
    )
    await store.insert(original)
    assert await store.get("vm-1") == original


async def test_migrations_run_twice_without_harm(store: SqlStore) -> None:
    await store.insert(vm("vm-1"))
    await store.migrate()
    assert await store.get("vm-1") is not None


async def test_soft_delete_hides_the_vm_but_keeps_the_id_taken(store: SqlStore) -> None:
    record = vm("vm-1")
    await store.insert(record)
    record.deleted_at = 5.0
    await store.update(record)
    assert await store.get("vm-1") is None
    with pytest.raises(AlreadyExists):
        await store.insert(vm("vm-1"))
    assert await store.list_live() == []
    assert await store.live_backends() == set()
    assert await store.count_by_state_and_backend() == {}


async def test_live_backends_are_those_of_rows_not_deleted(store: SqlStore) -> None:
    await store.insert(vm("vm-q"))
    fc = vm("vm-f")
    fc.backend = "firecracker"
    await store.insert(fc)
    assert await store.live_backends() == {"qemu", "firecracker"}
    fc.deleted_at = 2.0
    await store.update(fc)
    assert await store.live_backends() == {"qemu"}


async def test_start_up_reads_whole_only_rows_with_a_vmm_or_a_network(store: SqlStore) -> None:
    running = replace(
        vm("vm-running", process=ProcessIdentity(pid=7, start_time=1)), state=VmState.RUNNING
    )
    await store.insert(running)
    await store.insert(replace(vm("vm-stopped"), state=VmState.SHUTDOWN))
    networked = replace(vm("vm-networked"), state=VmState.SHUTDOWN)
    networked = replace(networked, config=replace(networked.config, network=(FULL_NIC,)))
    await store.insert(networked)
    await store.insert(replace(vm("vm-gone"), state=VmState.SHUTDOWN, deleted_at=3.0))
    records, ids = await store.list_for_start()
    assert sorted(records, key=lambda r: r.id) == [networked, running]
    assert ids == {"vm-running", "vm-stopped", "vm-networked"}


async def test_remove_forgets_a_row(store: SqlStore) -> None:
    await store.insert(vm("vm-1"))
    await store.remove("vm-1")
    await store.insert(vm("vm-1"))  # the id is free again


async def test_pages_are_per_customer_ordered_and_stable(store: SqlStore) -> None:
    for i in range(7):
        await store.insert(vm(f"a-{i}", created=float(i % 3)))
    await store.insert(vm("b-0", customer="globex"))
    seen: list[str] = []
    cursor = None
    while True:
        rows, total = await store.list_for_customer("acme", [], 3, cursor)
        assert total == 7
        seen += [r.id for r in rows]
        if len(rows) < 3:
            break
        cursor = (rows[-1].created_at, rows[-1].id)
    assert len(seen) == 7 and len(set(seen)) == 7
    assert seen == [
        r.id
        for r in sorted(
            (await store.list_for_customer("acme", [], 100, None))[0],
            key=lambda r: (r.created_at, r.id),
        )
    ]


async def test_state_filter_and_total(store: SqlStore) -> None:
    running = vm("vm-r")
    running.state = VmState.RUNNING
    await store.insert(running)
    await store.insert(vm("vm-c"))
    rows, total = await store.list_for_customer("acme", [VmState.RUNNING], 10, None)
    assert [r.id for r in rows] == ["vm-r"] and total == 1


async def test_the_store_and_the_address_book_share_one_engine(tmp_path: Path) -> None:
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'metald.db'}")
    checkouts: list[str] = []
    event.listen(database.engine.sync_engine.pool, "checkout", lambda *_: checkouts.append("x"))
    connects: list[str] = []
    event.listen(database.engine.sync_engine, "connect", lambda *_: connects.append("x"))
    store, book = SqlStore(database), SqlAddressBook(database)
    try:
        await store.migrate()
        await store.insert(vm("vm-1"))
        before = len(checkouts)
        assert await book.claim("vm-1", 4, "10.100.0.2")
        assert [a.address for a in await book.for_vm("vm-1")] == ["10.100.0.2"]
        assert len(checkouts) == before + 2  # the book's queries ran on the database's pool
        assert await store.get("vm-1") is not None
        assert len(connects) == 1  # and one-at-a-time calls of both reuse one connection
    finally:
        await store.close()  # closes the shared database
    await database.close()  # and a second close is harmless


FULL_NIC = NetworkInterface(
    id="eth0",
    mode=NetworkMode.IPV4_ONLY,
    mac_address="02:00:00:00:00:09",
    ipv4_config=IPv4Config(address="10.100.0.9", dns_servers=("1.1.1.1",)),
    ipv6_config=IPv6Config(prefix_length=64),
    rx_rate_limit=RateLimit(bandwidth=1_000_000, refill_time_ms=100, burst=4096),
)


async def test_a_typed_network_interface_round_trips(store: SqlStore) -> None:
    original = vm("vm-1")
    original.config = replace(original.config, network=(FULL_NIC,))
    await store.insert(original)
    assert await store.get("vm-1") == original


def test_a_config_row_in_the_old_protobuf_json_shape_is_read() -> None:
    # Rows written before the network config was typed held MessageToDict's output.
    old = {
        "network": [
            {
                "id": "eth0",
                "mode": "NETWORK_MODE_IPV4_ONLY",
                "mac_address": "02:00:00:00:00:09",
                "ipv4_config": {"address": "10.100.0.9", "dns_servers": ["1.1.1.1"]},
                "ipv6_config": {"prefix_length": 64},
                "rx_rate_limit": {"bandwidth": "1000000", "refill_time": "100", "burst": "4096"},
            }
        ]
    }
    assert VmConfig.from_dict(old).network == (FULL_NIC,)


async def test_list_queries_use_the_page_index_with_no_scan_or_sort(store: SqlStore) -> None:
    """ListVms's page and count, as the store sends them (page_queries), against the plan
    SQLite makes: the count from the index alone (covering), the page in index order (no
    temporary b-tree), with and without a state filter and a cursor. A missing or
    mismatched index shows as a SCAN, a table read per row, or a sort."""
    for i in range(20):
        await store.insert(vm(f"vm-{i}", "acme" if i % 2 else "other", created=float(i)))
    sent = [
        *page_queries("acme", [], 5, None),
        *page_queries("acme", [VmState.RUNNING, VmState.CREATED], 5, (3.0, "vm-3")),
    ]
    async with store._engine.connect() as conn:
        raw = await conn.get_raw_connection()
        driver = raw.driver_connection
        assert driver is not None
        for statement, args in sent:
            rows = await driver.execute_fetchall(f"EXPLAIN QUERY PLAN {statement}", args)
            plan = " / ".join(row[3] for row in rows)
            if "count(" in statement.lower():
                assert "USING COVERING INDEX ix_vms_customer_page" in plan, plan
            else:
                assert "USING INDEX ix_vms_customer_page" in plan, plan
            assert "SCAN" not in plan and "TEMP B-TREE" not in plan, plan
    rows, total = await store.list_for_customer("acme", [VmState.CREATED], 3, (3.0, "vm-3"))
    assert [r.id for r in rows] == ["vm-5", "vm-7", "vm-9"] and total == 10


async def test_counting_by_state_and_backend_reads_the_index_alone(store: SqlStore) -> None:
    """/metrics's count, as the store sends it, from a covering index (no table reads)."""
    await store.insert(vm("vm-q"))
    fc = vm("vm-f")
    fc.backend = "firecracker"
    await store.insert(fc)
    gone = vm("vm-gone")
    await store.insert(gone)
    gone.deleted_at = 5.0
    await store.update(gone)
    assert await store.count_by_state_and_backend() == {
        (VmState.CREATED, "qemu"): 1,
        (VmState.CREATED, "firecracker"): 1,
    }
    sent: list[tuple[str, object]] = []

    def record(conn: object, cursor: object, statement: str, params: object, *_: object) -> None:
        if "GROUP BY" in statement:
            sent.append((statement, params))

    engine = store._engine.sync_engine
    event.listen(engine, "before_cursor_execute", record)
    try:
        await store.count_by_state_and_backend()
    finally:
        event.remove(engine, "before_cursor_execute", record)
    ((statement, params),) = sent
    async with store._engine.connect() as conn:
        driver = (await conn.get_raw_connection()).driver_connection
        assert driver is not None
        rows = await driver.execute_fetchall(f"EXPLAIN QUERY PLAN {statement}", params)
    plan = " / ".join(row[3] for row in rows)
    assert "SEARCH vms USING COVERING INDEX ix_vms_state_backend (state=? AND deleted_at=?)" in (
        plan
    ), plan
    assert "TEMP B-TREE" not in plan, plan


async def test_a_page_shows_what_the_records_hold(store: SqlStore) -> None:
    """A page's summaries are the records' own fields; a config row without them (written
    before they were stored) shows VmConfig's defaults, as reading the record would."""
    await store.insert(vm("vm-1", created=1.0))
    await store.insert(vm("vm-2", created=2.0))
    async with store._engine.begin() as conn:
        await conn.exec_driver_sql("UPDATE vms SET config = '{}' WHERE id = 'vm-2'")
    rows, total = await store.list_for_customer("acme", [], 10, None)
    records = [await store.get("vm-1"), await store.get("vm-2")]
    assert rows == [VmSummary.of(r) for r in records if r is not None] and total == 2
    assert (rows[0].vcpu_count, rows[0].metadata) == (2, {"team": "a"})
    assert (rows[1].vcpu_count, rows[1].memory_bytes, rows[1].metadata) == (1, 256 * 2**20, {})

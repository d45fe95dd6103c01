"""SqlQuotas on real SQLite: overrides, what the ledger counts in each VM state, a refused
admission records nothing, the start-up sweep, the migration's backfill of VMs made before
the ledger, and atomicity between two "daemons" (two Database objects, two connection pools)
on one database file, also when one of them is held inside its admission's transaction."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from metald.core.errors import AlreadyExists
from metald.core.models import VmConfig, VmRecord
from metald.core.quotas import (
    AdmissionView,
    Claim,
    HostCeiling,
    QuotaDefaults,
    QuotaExceeded,
    Resource,
    Usage,
    check_admission,
)
from metald.core.states import VmState
from metald.store.database import Database
from metald.store.quotas import SqlQuotas
from metald.store.sqlite import SqlStore

R = Resource
GIB = 1024**3
CLAIM = Claim(vcpus=2, memory_bytes=GIB, disk_bytes=5 * GIB)
ROOMY = HostCeiling(memory_bytes=1024 * GIB, vcpus=1024)


def url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'metald.db'}"


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(url(tmp_path))
    await database.migrate()
    yield database
    await database.close()


def vm(vm_id: str, customer: str = "acme", state: VmState = VmState.CREATED) -> VmRecord:
    return VmRecord(
        id=vm_id,
        customer_id=customer,
        config=VmConfig(vcpu_count=2, memory_bytes=GIB),
        state=state,
        backend="qemu",
        created_at=1.0,
        updated_at=1.0,
    )


def seen() -> tuple[list[AdmissionView], Callable[[AdmissionView], None]]:
    views: list[AdmissionView] = []
    return views, views.append


def quota(**limits: int) -> Callable[[AdmissionView], None]:
    """A check that applies these per-customer defaults as the service would."""
    defaults = QuotaDefaults({R(k): v for k, v in limits.items()})

    def check(view: AdmissionView) -> None:
        check_admission(tuple(R), CLAIM, view, defaults, ROOMY)

    return check


async def created(quotas: SqlQuotas, store: SqlStore, record: VmRecord) -> None:
    """A create as the service does it: admit, insert the row, settle."""
    await quotas.admit(record.customer_id, record.id, CLAIM, lambda _: None, new=True)
    await store.insert(record)
    await quotas.settle(record.id)


# --- overrides ------------------------------------------------------------------------------


async def test_overrides_set_replace_clear_and_list(db: Database) -> None:
    q = SqlQuotas(db)
    assert await q.overrides("acme") == {}
    await q.set_override("acme", R.VMS, 3)
    await q.set_override("acme", R.VMS, 5)  # replaces
    await q.set_override("acme", R.MEMORY_BYTES, None)  # unlimited, whatever the default
    await q.set_override("acme", R.RUNNING_VMS, 0)  # none allowed
    await q.set_override("globex", R.VCPUS, 8)
    assert await q.overrides("acme") == {R.VMS: 5, R.MEMORY_BYTES: None, R.RUNNING_VMS: 0}
    assert await q.all_overrides() == {
        "acme": {R.VMS: 5, R.MEMORY_BYTES: None, R.RUNNING_VMS: 0},
        "globex": {R.VCPUS: 8},
    }
    assert await q.clear_override("acme", R.VMS) == 1
    assert await q.clear_override("acme", R.VMS) == 0
    assert await q.clear_override("acme") == 2
    assert await q.all_overrides() == {"globex": {R.VCPUS: 8}}
    with pytest.raises(ValueError):
        await q.set_override("acme", R.VMS, -1)


async def test_overrides_survive_a_new_connection_pool(db: Database, tmp_path: Path) -> None:
    await SqlQuotas(db).set_override("acme", R.DISK_BYTES, 10 * GIB)
    other = Database(url(tmp_path))
    try:
        assert await SqlQuotas(other).overrides("acme") == {R.DISK_BYTES: 10 * GIB}
    finally:
        await other.close()


# --- counting -----------------------------------------------------------------------------


async def test_what_each_state_counts(db: Database) -> None:
    q, store = SqlQuotas(db, node="n1"), SqlStore(db, node="n1")
    for i, state in enumerate(VmState):
        await created(q, store, vm(f"vm-{i}", state=state))
    gone = vm("vm-gone", state=VmState.RUNNING)
    await created(q, store, gone)
    gone.deleted_at = 2.0
    await store.update(gone)  # a deleted VM counts nothing even before its claim goes
    await created(q, store, vm("other", customer="globex", state=VmState.RUNNING))
    live = 3  # CREATED, RUNNING, PAUSED hold a VMM; SHUTDOWN does not
    usage = await q.usage("acme")
    assert usage == Usage(
        running_vms=live,
        vms=4,
        vcpus=2 * live,
        memory_bytes=GIB * live,
        disk_bytes=4 * CLAIM.disk_bytes,
    )
    views, check = seen()
    await q.admit("acme", "vm-next", CLAIM, check, new=True)
    [view] = views
    assert view.customer_usage == usage  # the VM being admitted is not in its own view
    # The host counts every customer's live VMs on this node.
    assert view.host_usage.vcpus == 2 * (live + 1) and view.host_usage.running_vms == live + 1


async def test_a_pending_create_and_a_boot_in_flight_count_as_live(db: Database) -> None:
    q, store = SqlQuotas(db), SqlStore(db)
    await q.admit("acme", "pending", CLAIM, lambda _: None, new=True)  # no VM row yet
    assert (await q.usage("acme")).running_vms == 1
    down = vm("down", state=VmState.SHUTDOWN)
    await created(q, store, down)
    assert (await q.usage("acme")).running_vms == 1
    await q.admit("acme", "down", CLAIM, lambda _: None, new=False)  # its boot begins
    assert (await q.usage("acme")).running_vms == 2
    await q.settle("down")  # the boot failed: the row still says SHUTDOWN
    assert (await q.usage("acme")).running_vms == 1
    await q.release("pending")  # its create failed
    assert await q.usage("acme") == Usage(vms=1, disk_bytes=CLAIM.disk_bytes)


async def test_the_vm_admitted_is_not_counted_in_its_own_view(db: Database) -> None:
    q, store = SqlQuotas(db), SqlStore(db)
    await created(q, store, vm("a", state=VmState.SHUTDOWN))
    views, check = seen()
    await q.admit("acme", "a", CLAIM, check, new=False)
    assert views[0].customer_usage == Usage()


async def test_a_boot_keeps_the_disk_bytes_recorded_at_create(db: Database) -> None:
    q, store = SqlQuotas(db), SqlStore(db)
    await created(q, store, vm("a", state=VmState.SHUTDOWN))
    await q.admit("acme", "a", Claim(2, GIB, disk_bytes=0), lambda _: None, new=False)
    assert (await q.usage("acme")).disk_bytes == CLAIM.disk_bytes


async def test_a_refused_admission_records_nothing(db: Database) -> None:
    q, store = SqlQuotas(db), SqlStore(db)
    await q.set_override("acme", R.VMS, 1)
    await created(q, store, vm("a"))
    with pytest.raises(QuotaExceeded, match="quota vms is 1"):
        await q.admit("acme", "b", CLAIM, quota(), new=True)
    assert (await q.usage("acme")).vms == 1
    await q.release("a")
    await q.admit("acme", "b", CLAIM, quota(vms=1), new=True)  # the default: fits now


async def test_an_id_with_a_claim_is_not_admitted_twice(db: Database) -> None:
    q = SqlQuotas(db)
    await q.admit("acme", "a", CLAIM, lambda _: None, new=True)
    with pytest.raises(AlreadyExists):
        await q.admit("globex", "a", CLAIM, lambda _: None, new=True)
    assert (await q.usage("globex")).vms == 0


async def test_the_sweep_ends_holds_and_drops_claims_without_a_vm(db: Database) -> None:
    mine, theirs = SqlQuotas(db, node="n1"), SqlQuotas(db, node="n2")
    store = SqlStore(db, node="n1")
    await mine.admit("acme", "never-made", CLAIM, lambda _: None, new=True)
    await theirs.admit("acme", "on-n2", CLAIM, lambda _: None, new=True)  # another daemon's
    booting = vm("booting", state=VmState.SHUTDOWN)
    await created(mine, store, booting)
    await mine.admit("acme", "booting", CLAIM, lambda _: None, new=False)  # then a crash
    assert await mine.sweep() == 1
    usage = await mine.usage("acme")
    # left: booting (SHUTDOWN, no longer held) and the other node's pending create
    assert (usage.vms, usage.running_vms) == (2, 1)


async def test_the_migration_gives_existing_vms_a_claim(tmp_path: Path) -> None:
    """A database at revision 0002 with VMs in it: after the upgrade they count."""
    path = tmp_path / "old.db"
    database = Database(f"sqlite+aiosqlite:///{path}")
    store = SqlStore(database)
    await database.migrate()
    await store.insert(vm("old-running", state=VmState.RUNNING))
    down = vm("old-deleted")
    down.deleted_at = 3.0
    await store.insert(down)
    await database.close()
    with sqlite3.connect(path) as conn:  # back to 0002, as a database made before quotas
        for table in (
            "quota_overrides",
            "vm_claims",
            "admission_locks",
            "jail_ids",
            "vm_metrics",
            "vm_meters",
            "api_keys",  # 0008's
            "audit_log",  # 0009's (issue 10, audit)
            "audit_head",
        ):
            conn.execute(f"DROP TABLE {table}")
        conn.execute("DROP INDEX ix_vms_customer_page")  # 0005's, back to 0001's
        conn.execute("CREATE INDEX ix_vms_customer_created ON vms (customer_id, created_at, id)")
        conn.execute("DROP INDEX ix_vms_state_backend")  # 0007's, back to 0001's
        conn.execute("CREATE INDEX ix_vms_state ON vms (state)")
        conn.execute("UPDATE alembic_version SET version_num = '0002'")
    database = Database(f"sqlite+aiosqlite:///{path}")
    try:
        await database.migrate()
        usage = await SqlQuotas(database).usage("acme")
        assert usage == Usage(running_vms=1, vms=1, vcpus=2, memory_bytes=GIB, disk_bytes=0)
    finally:
        await database.close()


# --- atomicity ------------------------------------------------------------------------------


async def test_concurrent_admissions_from_two_pools_never_overshoot(
    db: Database, tmp_path: Path
) -> None:
    """Ten admissions at once, half through a second Database on the same file (a second
    daemon): the quota of 3 lets exactly 3 through."""
    other = Database(url(tmp_path))
    try:
        pools = [SqlQuotas(db), SqlQuotas(other)]
        await pools[0].set_override("acme", R.VMS, 3)

        async def one(i: int) -> str:
            try:
                await pools[i % 2].admit("acme", f"vm-{i}", CLAIM, quota(), new=True)
            except QuotaExceeded as exc:
                return exc.message
            return "ok"

        results = await asyncio.gather(*(one(i) for i in range(10)))
        assert results.count("ok") == 3, results
        assert all(r == "ok" or "quota vms is 3" in r for r in results), results
        assert (await pools[1].usage("acme")).vms == 3
    finally:
        await other.close()


def test_an_admission_waits_for_one_held_inside_its_transaction(tmp_path: Path) -> None:
    """Daemon A is stopped inside its admission's transaction (after counting, before
    recording); daemon B, in another thread with its own pool, admits the same customer.
    B must count A's claim: it waited for A's commit instead of reading around it."""

    async def prepare() -> None:
        database = Database(url(tmp_path))
        await database.migrate()
        await database.close()

    asyncio.run(prepare())
    inside, let_go = threading.Event(), threading.Event()
    b_saw: list[Usage] = []
    errors: list[BaseException] = []

    def hold(view: AdmissionView) -> None:
        inside.set()
        let_go.wait(30)

    def run(vm_id: str, check: Callable[[AdmissionView], None]) -> None:
        async def admit() -> None:
            database = Database(url(tmp_path))
            try:
                await SqlQuotas(database).admit("acme", vm_id, CLAIM, check, new=True)
            finally:
                await database.close()

        try:
            asyncio.run(admit())
        except BaseException as exc:
            errors.append(exc)

    a = threading.Thread(target=run, args=("a", hold))
    a.start()
    assert inside.wait(30), "A never reached its check"
    b = threading.Thread(target=run, args=("b", lambda v: b_saw.append(v.customer_usage)))
    b.start()
    b.join(1.0)  # gives B the chance to read around A's lock (it must not)
    let_go.set()
    a.join(30)
    b.join(30)
    assert not errors, errors
    assert [u.vms for u in b_saw] == [1], f"B counted {b_saw}: it did not wait for A"

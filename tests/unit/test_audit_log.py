"""The audit log on real SQLite: appends chain, verify holds, and an edited, deleted or
inserted row (or a truncated tail) makes verify name the first bad seq; two writers (two
Database pools, as two daemons on one database) share one chain; the writer queue writes
everything before stop returns; `metald audit list|verify` read it."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from metald.cli.main import app
from metald.core.audit import AuditEvent
from metald.core.audit_chain import GENESIS, chain, row_hash, verify
from metald.store.audit_log import SqlAuditLog, bounded
from metald.store.database import Database


def event(i: int, customer: str = "acme", code: str = "ok") -> AuditEvent:
    return AuditEvent(
        at_ns=1_700_000_000_000_000_000 + i * 10**9,
        actor=f"token:{customer}",
        role="customer",
        customer_id=customer,
        method="vmprovisioner.v1.VmService/CreateVm",
        vm_id=f"vm-{i}",
        code=code,
        source="127.0.0.1:5000",
        trace_id="",
        tenant_header=None,
    )


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'metald.db'}")
    await database.migrate()
    yield database
    await database.close()


def sql(tmp_path: Path, *statements: str) -> None:
    con = sqlite3.connect(tmp_path / "metald.db")
    try:
        for statement in statements:
            con.execute(statement)
        con.commit()
    finally:
        con.close()


# -- the chain, pure ------------------------------------------------------------------------


def test_each_hash_covers_seq_link_and_every_field() -> None:
    e = event(1)
    base = row_hash(1, GENESIS, e)
    assert len(base) == 64
    assert row_hash(2, GENESIS, e) != base
    assert row_hash(1, "1" * 64, e) != base
    for field, value in [("actor", "x"), ("code", "internal"), ("tenant_header", ""),
                         ("customer_id", None), ("at_ns", 1)]:  # fmt: skip
        assert row_hash(1, GENESIS, replace(e, **{field: value})) != base, field


def test_a_chain_verifies_and_a_broken_one_names_the_row() -> None:
    rows = chain(0, GENESIS, [event(i) for i in range(5)])
    assert [r.seq for r in rows] == [1, 2, 3, 4, 5]
    assert verify(rows, (5, rows[-1].hash)).ok
    assert verify([], (0, GENESIS)).ok
    changed = replace(rows[2], event=replace(rows[2].event, code="not_found"))
    edited = [*rows[:2], changed, *rows[3:]]
    assert verify(edited).bad_seq == 3
    assert verify(rows[:2] + rows[3:]).bad_seq == 3  # seq 3 deleted
    assert verify(rows[:4], (5, rows[-1].hash)).bad_seq == 5  # tail truncated


# -- the store ------------------------------------------------------------------------------


async def test_appends_chain_and_verify_holds(db: Database) -> None:
    audit = SqlAuditLog(db)
    await audit.append([event(1), event(2)])
    await audit.record(event(3))  # no writer running: appended at once
    rows = await audit.rows()
    assert [r.seq for r in rows] == [1, 2, 3]
    assert rows[0].prev_hash == GENESIS and rows[1].prev_hash == rows[0].hash
    assert await audit.head() == (3, rows[-1].hash)
    verdict = await audit.verify()
    assert verdict.ok and verdict.rows == 3
    assert [r.seq for r in await audit.rows(limit=2)] == [2, 3]


async def test_rows_by_customer_and_since(db: Database) -> None:
    audit = SqlAuditLog(db)
    await audit.append([event(1, "acme"), event(2, "eve"), event(3, "acme")])
    assert [r.seq for r in await audit.rows(customer="acme")] == [1, 3]
    assert [r.seq for r in await audit.rows(since_ns=event(2).at_ns)] == [2, 3]


@pytest.mark.parametrize(
    ("statements", "bad"),
    [
        (["UPDATE audit_log SET code = 'ok', actor = 'token:mallory' WHERE seq = 3"], 3),
        (["DELETE FROM audit_log WHERE seq = 2"], 2),
        # Inserted after seq 2: the rows after it renumbered, the new one chained to seq 2
        # with a correct hash of its own; the old seq 3 (now 4) no longer links.
        (["UPDATE audit_log SET seq = seq + 100 WHERE seq >= 3",
          "UPDATE audit_log SET seq = seq - 99 WHERE seq >= 103",
          "INSERT_FORGED"], 4),
        (["DELETE FROM audit_log WHERE seq = 5"], 5),  # tail truncated (the head says 5)
        (["INSERT_APPENDED"], 6),  # appended behind the writer's back (the head says 5)
    ],
    ids=["edited", "deleted", "inserted", "truncated", "appended"],
)  # fmt: skip
async def test_tampering_is_found_at_its_seq(
    db: Database, tmp_path: Path, statements: list[str], bad: int
) -> None:
    audit = SqlAuditLog(db)
    rows = await audit.append([event(i) for i in range(1, 6)])
    forged = event(99, "mallory")
    for statement in statements:
        if statement == "INSERT_FORGED":
            seq, prev = 3, rows[1].hash
        elif statement == "INSERT_APPENDED":
            seq, prev = 6, rows[-1].hash
        else:
            sql(tmp_path, statement)
            continue
        values = {**vars(forged), "seq": seq, "prev_hash": prev,
                  "hash": row_hash(seq, prev, forged)}  # fmt: skip
        cols = ", ".join(values)
        marks = ", ".join(f":{c}" for c in values)
        con = sqlite3.connect(tmp_path / "metald.db")
        con.execute(f"INSERT INTO audit_log ({cols}) VALUES ({marks})", values)
        con.commit()
        con.close()
    verdict = await audit.verify()
    assert not verdict.ok and verdict.bad_seq == bad, verdict


async def test_two_writers_share_one_chain(tmp_path: Path, db: Database) -> None:
    other = Database(f"sqlite+aiosqlite:///{tmp_path / 'metald.db'}")
    try:
        a, b = SqlAuditLog(db), SqlAuditLog(other)

        async def write(audit: SqlAuditLog, customer: str) -> None:
            for i in range(20):
                await audit.append([event(i, customer)])

        await asyncio.gather(write(a, "acme"), write(b, "eve"))
        rows = await a.rows()
        assert len(rows) == 40 and [r.seq for r in rows] == list(range(1, 41))
        assert (await a.verify()).ok
    finally:
        await other.close()


async def test_the_writer_writes_everything_queued_before_stop_returns(db: Database) -> None:
    audit = SqlAuditLog(db, queue_max=8, batch_max=3)
    await audit.start()
    for i in range(50):
        await audit.record(event(i))  # a full queue waits for the writer
    await audit.stop()
    assert audit.written == 50
    assert [r.event.vm_id for r in await audit.rows()] == [f"vm-{i}" for i in range(50)]
    assert (await audit.verify()).ok


def test_long_strings_are_cut_to_their_columns() -> None:
    long = replace(event(1), tenant_header="t" * 5000, actor="a" * 999)
    cut = bounded(long)
    assert cut.tenant_header is not None and len(cut.tenant_header) == 256
    assert len(cut.actor) == 256
    assert bounded(event(1)) == event(1)


# -- the CLI --------------------------------------------------------------------------------


async def test_cli_lists_and_verifies(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    audit = SqlAuditLog(db)
    await audit.append([event(1, "acme"), event(2, "eve"), event(3, "acme")])
    monkeypatch.setenv("UNKEY_METALD_DATA_DIR", str(tmp_path))
    runner = CliRunner()

    def run(*args: str) -> tuple[int, str]:
        result = runner.invoke(app, list(args), env={"COLUMNS": "250"})
        return result.exit_code, result.output

    code, out = await asyncio.to_thread(run, "audit", "list", "--customer", "acme", "--json")
    assert code == 0, out
    lines = [json.loads(line) for line in out.splitlines()]
    assert [(r["seq"], r["customer_id"]) for r in lines] == [(1, "acme"), (3, "acme")]
    assert lines[0]["time"].endswith("Z") and len(lines[0]["hash"]) == 64
    code, out = await asyncio.to_thread(run, "audit", "list")
    assert code == 0 and "CreateVm" in out and "eve" in out, out
    code, out = await asyncio.to_thread(run, "audit", "verify")
    assert code == 0 and "3 rows" in out, out
    sql(tmp_path, "UPDATE audit_log SET vm_id = 'other' WHERE seq = 2")
    code, out = await asyncio.to_thread(run, "audit", "verify")
    assert code == 3 and "seq 2" in out, out


def test_cli_refuses_a_missing_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNKEY_METALD_DATA_DIR", str(tmp_path / "nowhere"))
    result = CliRunner().invoke(app, ["audit", "verify"])
    assert result.exit_code == 1 and "no metald database" in result.output


async def test_verify_holds_while_a_writer_appends(tmp_path: Path, db: Database) -> None:
    other = Database(f"sqlite+aiosqlite:///{tmp_path / 'metald.db'}")  # the daemon's pool
    writer = SqlAuditLog(other)
    try:
        await writer.append([event(i) for i in range(50)])
        done = asyncio.Event()

        async def keep_writing() -> None:
            i = 0
            while not done.is_set():
                await writer.append([event(i), event(i + 1)])
                i += 2
                await asyncio.sleep(0)

        task = asyncio.create_task(keep_writing())
        try:
            verdicts = [await SqlAuditLog(db).verify() for _ in range(10)]
        finally:
            done.set()
            await task
        assert all(v.ok for v in verdicts), [v for v in verdicts if not v.ok]
        assert verdicts[-1].rows > 50
    finally:
        await other.close()

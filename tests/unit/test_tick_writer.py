"""store/tick_writer.py: the usage log's transactions run on the event loop when they can,
in a worker thread when another connection holds the write lock, and never block the loop
on that lock; every N-th runs in the thread with a checkpoint. A real SQLite file."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

from metald.store.tick_writer import TickWriter

INSERT = "INSERT INTO t (v) VALUES (?)"


def make_db(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t (v INTEGER)")
    conn.commit()
    conn.close()


def count(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("SELECT count(*) FROM t").fetchone()[0])
    finally:
        conn.close()


async def test_uncontended_transactions_run_on_the_loop(tmp_path: Path) -> None:
    path = tmp_path / "db"
    make_db(path)
    writer = TickWriter(str(path), checkpoint_every=1000)
    try:
        assert await writer.run([(INSERT, [(1,), (2,)])]) == [2]
        rows = await writer.query("SELECT v FROM t ORDER BY v", ())
        assert [r["v"] for r in rows] == [1, 2]
        assert (writer.on_loop, writer.in_thread) == (2, 0)
    finally:
        writer.close()


async def test_a_held_write_lock_sends_the_transaction_to_the_thread_and_the_loop_runs_on(
    tmp_path: Path,
) -> None:
    path = tmp_path / "db"
    make_db(path)
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")  # another connection (the engine's pool) is writing
    writer = TickWriter(str(path), checkpoint_every=1000)
    turns = 0

    async def loop_turns() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0.01)

    ticker = asyncio.create_task(loop_turns())
    release = threading.Timer(0.3, lambda: holder.execute("COMMIT"))
    release.start()
    try:
        assert await writer.run([(INSERT, [(7,)])]) == [1]
        assert count(path) == 1
        assert (writer.on_loop, writer.in_thread) == (0, 1)
        assert turns >= 10  # the loop went on while the transaction waited for the lock
    finally:
        ticker.cancel()
        release.join()
        holder.close()
        writer.close()


async def test_a_failed_transaction_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "db"
    make_db(path)
    writer = TickWriter(str(path))
    try:
        try:
            await writer.run([(INSERT, [(1,)]), ("INSERT INTO missing VALUES (?)", [(1,)])])
        except sqlite3.OperationalError as exc:
            assert "no such table" in str(exc)
        else:
            raise AssertionError("a bad statement was accepted")
        assert count(path) == 0
        assert await writer.run([(INSERT, [(2,)])]) == [1]  # the connection still works
    finally:
        writer.close()


async def test_every_nth_transaction_checkpoints_in_the_thread(tmp_path: Path) -> None:
    path = tmp_path / "db"
    make_db(path)
    writer = TickWriter(str(path), checkpoint_every=3)
    try:
        for v in range(6):
            await writer.run([(INSERT, [(v,)])])
        assert (writer.on_loop, writer.in_thread) == (4, 2)
        assert count(path) == 6
        # the loop's connection never checkpoints: the thread's passive one did, so the
        # database file holds the rows without the WAL
        conn = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
        try:
            assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 6
        finally:
            conn.close()
    finally:
        writer.close()

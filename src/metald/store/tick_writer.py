"""The usage log's hot statements on SQLite, run on the event loop when that cannot wait: a
collector tick (BEGIN, the statements, COMMIT), delivery's read of what is pending and its
marks, each sqlite3's C code in one call.

Why not through the engine: every statement of the async engine is a round trip to its
worker thread through a greenlet, about 1 ms of CPU for a transaction of a SELECT 1 here,
and a tick every 100 ms would cost 1% of a core before it stored a row. Why not in a thread
of its own either: one hop to a thread and back costs about 450 us of CPU on this machine
(a futex wake-up each way, then the loop's self-pipe), four times the rows of a ten-VM tick
(bench/metering.py). So a transaction runs right on the loop, on a connection that never
waits: its busy timeout is 0, and when another connection holds the write lock (the
engine's pool, a checkpoint) the transaction goes to a worker thread instead, on a second
connection that waits as the engine's do (busy timeout). Neither connection blocks the loop
on a lock: the loop's takes its lock without blocking or hands the work to the thread.

With WAL and synchronous=NORMAL a commit writes the WAL and does not fsync: what the loop
pays is the rows' C code and a write(2). The one slow step of WAL, the checkpoint (it
copies pages to the database file and fsyncs), is taken off the loop: the loop's
connection never checkpoints (wal_autocheckpoint=0), and every `checkpoint_every`-th
transaction runs in the thread followed by a passive checkpoint.

Both connections are this writer's own, on the same database file, with the engine's
settings (store/database.py), so they and the engine's pool serialise as any connections
do. Only for SQLite: on another database the usage log uses the engine (store/usage_log.py).
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

R = TypeVar("R")

Statements = Sequence[tuple[str, Sequence[Sequence[Any]]]]

CHECKPOINT_EVERY = 100  # loop transactions between passive checkpoints (in the thread)


def _connect(path: str, busy_timeout_ms: int, autocheckpoint: bool) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
    if not autocheckpoint:
        conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.row_factory = sqlite3.Row
    return conn


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(exc) or "busy" in str(exc)


def _transaction(conn: sqlite3.Connection, statements: Statements) -> list[int]:
    counts = []
    conn.execute("BEGIN IMMEDIATE")
    try:
        for sql, rows in statements:
            counts.append(conn.executemany(sql, rows).rowcount if rows else 0)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return counts


class TickWriter:
    def __init__(self, path: str, checkpoint_every: int = CHECKPOINT_EVERY) -> None:
        self._path = path
        self._checkpoint_every = checkpoint_every
        self._loop_conn: sqlite3.Connection | None = None  # busy timeout 0, no checkpoints
        self._thread_conn: sqlite3.Connection | None = None  # waits, and checkpoints
        self._loop_lock = threading.Lock()
        self._thread_lock = threading.Lock()
        self._since_checkpoint = 0
        self.on_loop = 0  # transactions and queries run on the loop / in the thread
        self.in_thread = 0

    async def run(self, statements: Statements) -> list[int]:
        """Each (sql, rows) executed for its rows, all in one transaction; each's rowcount."""
        self._since_checkpoint += 1
        if self._since_checkpoint < self._checkpoint_every:
            done = self._on_loop(lambda conn: _transaction(conn, statements))
            if done is not None:
                return done
        else:
            self._since_checkpoint = 0
        return await asyncio.to_thread(
            self._in_thread, lambda conn: _transaction(conn, statements), True
        )

    async def query(self, sql: str, params: Sequence[Any]) -> list[sqlite3.Row]:
        """Rows of one SELECT."""

        def select(conn: sqlite3.Connection) -> list[sqlite3.Row]:
            rows: list[sqlite3.Row] = conn.execute(sql, params).fetchall()
            return rows

        done = self._on_loop(select)
        if done is not None:
            return done
        return await asyncio.to_thread(self._in_thread, select, False)

    def _on_loop(self, work: Callable[[sqlite3.Connection], R]) -> R | None:
        """`work(conn)` on the loop's connection, or None when it would have to wait."""
        if not self._loop_lock.acquire(blocking=False):
            return None
        try:
            if self._loop_conn is None:
                self._loop_conn = _connect(self._path, 0, autocheckpoint=False)
            result = work(self._loop_conn)
        except sqlite3.OperationalError as exc:
            if not _is_busy(exc):
                raise
            return None
        finally:
            self._loop_lock.release()
        self.on_loop += 1
        return result

    def _in_thread(self, work: Callable[[sqlite3.Connection], R], checkpoint: bool) -> R:
        with self._thread_lock:
            if self._thread_conn is None:
                self._thread_conn = _connect(self._path, 5000, autocheckpoint=True)
            result = work(self._thread_conn)
            if checkpoint:
                self._thread_conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            self.in_thread += 1
            return result

    def close(self) -> None:
        for lock, name in ((self._loop_lock, "_loop_conn"), (self._thread_lock, "_thread_conn")):
            with lock:
                conn = getattr(self, name)
                if conn is not None:
                    conn.close()
                    setattr(self, name, None)

"""The usage log's hot statements on SQLite in one hop each: a collector tick (BEGIN, the
statements, COMMIT), delivery's read of what is pending and its marks, each one thread call
running sqlite3's C code.

Why not through the engine: every statement of the async engine is a round trip to its
worker thread through a greenlet, about 1 ms of CPU for a transaction of a SELECT 1 here,
and a tick every 100 ms would cost 1% of a core before it stored a row (bench/metering.py).
Here a tick of N VMs costs one thread hop and N rows' worth of C. The connection is this
writer's own, on the same database file, with the engine's settings (WAL, busy timeout:
store/database.py), so it and the engine's pool serialise as any two connections do.
Only for SQLite: on another database the usage log uses the engine (store/usage_log.py).
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Sequence
from typing import Any


class TickWriter:
    def __init__(self, path: str) -> None:
        self._path = path
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=5000")
            self._conn = conn
        return self._conn

    async def run(self, statements: Sequence[tuple[str, Sequence[Sequence[Any]]]]) -> list[int]:
        """Each (sql, rows) executed for its rows, all in one transaction; each's rowcount."""
        return await asyncio.to_thread(self._run, statements)

    def _run(self, statements: Sequence[tuple[str, Sequence[Sequence[Any]]]]) -> list[int]:
        with self._lock:
            conn = self._connection()
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

    async def query(self, sql: str, params: Sequence[Any]) -> list[sqlite3.Row]:
        """Rows of one SELECT (in the same one hop)."""
        return await asyncio.to_thread(self._query, sql, params)

    def _query(self, sql: str, params: Sequence[Any]) -> list[sqlite3.Row]:
        with self._lock:
            conn = self._connection()
            conn.row_factory = sqlite3.Row
            return conn.execute(sql, params).fetchall()

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

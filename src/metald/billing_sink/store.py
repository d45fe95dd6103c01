"""The sink's SQLite file: what the billing service received, kept for `billing usage`.

The standard library's sqlite3 (one connection, WAL, synchronous=NORMAL: a record the sink
acknowledged survives the sink's crash or kill -9, though not a power cut -- a development
and test service; FULL's fsync per batch doubled a small batch's round trip, 3.6 -> 8 ms),
used from a worker thread under a lock: the sink's event loop never waits on the disk.
`metald billing usage` opens the same file read-only while the sink runs (WAL lets it read
without blocking the writer).

A sample's key is (vm_id, timestamp_ns): the first copy received is kept, a later one of the
same instant is counted as a duplicate and dropped (metald delivers at least once).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from metald.core.metering import UsageRecord

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    vm_id TEXT NOT NULL,
    timestamp_ns INTEGER NOT NULL,
    customer_id TEXT NOT NULL,
    tenant_id TEXT NOT NULL,
    cpu_time_ns INTEGER NOT NULL,
    memory_bytes INTEGER NOT NULL,
    disk_read_bytes INTEGER NOT NULL,
    disk_write_bytes INTEGER NOT NULL,
    network_rx_bytes INTEGER NOT NULL,
    network_tx_bytes INTEGER NOT NULL,
    received_ns INTEGER NOT NULL,
    PRIMARY KEY (vm_id, timestamp_ns)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS samples_customer ON samples (customer_id, vm_id);
CREATE TABLE IF NOT EXISTS notices (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('started', 'stopped', 'gap')),
    vm_id TEXT NOT NULL,
    customer_id TEXT NOT NULL DEFAULT '',
    tenant_id TEXT NOT NULL,
    at_ns INTEGER NOT NULL DEFAULT 0,
    last_sent_ns INTEGER NOT NULL DEFAULT 0,
    resume_ns INTEGER NOT NULL DEFAULT 0,
    received_ns INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS notices_vm ON notices (vm_id, kind);
CREATE TABLE IF NOT EXISTS heartbeats (
    id INTEGER PRIMARY KEY,
    instance_id TEXT NOT NULL,
    active_vms TEXT NOT NULL,
    received_ns INTEGER NOT NULL
);
"""


@dataclass(frozen=True)
class Notice:
    kind: str  # started | stopped | gap
    vm_id: str
    customer_id: str  # '' when the call does not carry one (stopped, gap)
    tenant_id: str
    at_ns: int = 0  # started, stopped
    last_sent_ns: int = 0  # gap
    resume_ns: int = 0  # gap


@dataclass(frozen=True)
class Heartbeat:
    instance_id: str
    active_vms: tuple[str, ...]
    received_ns: int


@dataclass(frozen=True)
class Stored:
    """What one batch did to the file."""

    stored: int
    duplicates: int


class SinkStore:
    """The sink's database. Every method is a short transaction."""

    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        self.path = path
        if read_only:
            if not path.exists():
                raise FileNotFoundError(f"no billing sink database at {path}")
            self._db = sqlite3.connect(
                f"file:{path}?mode=ro", uri=True, check_same_thread=False, isolation_level=None
            )
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
        self._db.execute("PRAGMA busy_timeout=5000")
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    async def run(self, fn: Callable[[], T]) -> T:
        """`fn` (one of the methods below, bound) in a worker thread."""
        return await asyncio.to_thread(fn)

    def add_samples(self, tenant_id: str, records: Sequence[UsageRecord]) -> Stored:
        now = time.time_ns()
        rows = [
            (
                r.vm_id, r.timestamp_ns, r.customer_id, tenant_id, r.cpu_time_ns, r.memory_bytes,
                r.disk_read_bytes, r.disk_write_bytes, r.network_rx_bytes, r.network_tx_bytes,
                now,
            )
            for r in records
        ]  # fmt: skip
        with self._lock, self._transaction():
            before = self._db.total_changes
            self._db.executemany(
                "INSERT OR IGNORE INTO samples VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows
            )
            stored = self._db.total_changes - before
        return Stored(stored=stored, duplicates=len(rows) - stored)

    def add_notice(self, notice: Notice) -> None:
        with self._lock, self._transaction():
            self._db.execute(
                "INSERT INTO notices (kind, vm_id, customer_id, tenant_id, at_ns, last_sent_ns, "
                "resume_ns, received_ns) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    notice.kind, notice.vm_id, notice.customer_id, notice.tenant_id,
                    notice.at_ns, notice.last_sent_ns, notice.resume_ns, time.time_ns(),
                ),
            )  # fmt: skip

    def add_heartbeat(self, instance_id: str, active_vms: Iterable[str]) -> None:
        with self._lock, self._transaction():
            self._db.execute(
                "INSERT INTO heartbeats (instance_id, active_vms, received_ns) VALUES (?, ?, ?)",
                (instance_id, json.dumps(list(active_vms)), time.time_ns()),
            )

    def samples(self, customer_id: str | None = None) -> list[UsageRecord]:
        """Every stored sample (of one customer), by VM then instant."""
        sql = (
            "SELECT vm_id, customer_id, timestamp_ns, cpu_time_ns, memory_bytes, "
            "disk_read_bytes, disk_write_bytes, network_rx_bytes, network_tx_bytes FROM samples"
        )
        params: tuple[str, ...] = ()
        if customer_id is not None:
            sql += " WHERE customer_id = ?"
            params = (customer_id,)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY vm_id, timestamp_ns", params).fetchall()
        return [UsageRecord(*row) for row in rows]

    def notices(self, kind: str | None = None, vm_id: str | None = None) -> list[Notice]:
        """Notices in the order received."""
        clauses, params = [], []
        for column, value in (("kind", kind), ("vm_id", vm_id)):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._lock:
            rows = self._db.execute(
                "SELECT kind, vm_id, customer_id, tenant_id, at_ns, last_sent_ns, resume_ns "
                f"FROM notices{where} ORDER BY id",
                params,
            ).fetchall()
        return [Notice(*row) for row in rows]

    def stops_by_vm(self) -> dict[str, list[int]]:
        stops: dict[str, list[int]] = {}
        for notice in self.notices("stopped"):
            stops.setdefault(notice.vm_id, []).append(notice.at_ns)
        return stops

    def heartbeats(self) -> list[Heartbeat]:
        with self._lock:
            rows = self._db.execute(
                "SELECT instance_id, active_vms, received_ns FROM heartbeats ORDER BY id"
            ).fetchall()
        return [Heartbeat(i, tuple(json.loads(a)), r) for i, a, r in rows]

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT (or ROLLBACK on an exception)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")

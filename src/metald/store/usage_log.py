"""The UsageLog port on the database: metering's outbox (``vm_metrics``) and each VM's
metering state (``vm_meters``), migration 0006.

Why these shapes: records are written before billing is told (an outbox), so a billing
outage or a metald crash loses nothing; one transaction per collector tick carries every
VM's record and state (a tick of N VMs is one commit, not N). The outbox's order is its
autoincrement `seq`, which SQLite never reuses, so a VM's entries keep their order however
rows are deleted. The number of undelivered entries is counted once and then kept in
memory (only this daemon writes its node's rows): the backlog bound is checked every tick
without a COUNT(*).
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    Index,
    Integer,
    String,
    Table,
    bindparam,
    delete,
    func,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from metald.core.counters import Meter, RawUsage
from metald.core.metering import UsageRecord
from metald.core.outbox import Entry, EntryKind, Notice
from metald.core.ports import UsageLog as UsageLog
from metald.store.database import Database
from metald.store.schema import metadata
from metald.store.tick_writer import TickWriter

COUNTERS = (
    "cpu_time_ns",
    "memory_bytes",
    "disk_read_bytes",
    "disk_write_bytes",
    "network_rx_bytes",
    "network_tx_bytes",
)

vm_metrics = Table(
    "vm_metrics",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("node", String(128), nullable=False),
    Column("vm_id", String(64), nullable=False),
    Column("customer_id", String(128), nullable=False),
    Column("kind", String(8), nullable=False),
    Column("timestamp_ns", BigInteger, nullable=False),
    *(Column(c, BigInteger, nullable=False, server_default="0") for c in COUNTERS),
    Column("gap_from_ns", BigInteger, nullable=False, server_default="0"),
    Column("delivered_at", Float, nullable=True),
    Index("ix_vm_metrics_outbox", "node", "delivered_at", "vm_id", "seq"),
    sqlite_autoincrement=True,
)

vm_meters = Table(
    "vm_meters",
    metadata,
    Column("node", String(128), primary_key=True),
    Column("vm_id", String(64), primary_key=True),
    Column("customer_id", String(128), nullable=False),
    Column("vmm", String(64), nullable=False),
    Column("timestamp_ns", BigInteger, nullable=False),
    *(Column(f"raw_{c}", BigInteger, nullable=False) for c in COUNTERS),
    *(Column(c, BigInteger, nullable=False) for c in COUNTERS),
)


_ENTRY_COLUMNS = ("node", "vm_id", "customer_id", "kind", "timestamp_ns", *COUNTERS, "gap_from_ns")
_METER_COLUMNS = (
    "node",
    "vm_id",
    "customer_id",
    "vmm",
    "timestamp_ns",
    *(f"raw_{c}" for c in COUNTERS),
    *COUNTERS,
)
_INSERT_ENTRY = (
    f"INSERT INTO vm_metrics ({', '.join(_ENTRY_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in _ENTRY_COLUMNS)})"
)
_UPSERT_METER = (
    f"INSERT INTO vm_meters ({', '.join(_METER_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in _METER_COLUMNS)}) ON CONFLICT (node, vm_id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _METER_COLUMNS[2:])
)
_DROP_NEWEST_SAMPLE = (
    "DELETE FROM vm_metrics WHERE kind = 'sample' AND seq = (SELECT seq FROM vm_metrics "
    "WHERE node = ? AND vm_id = ? AND delivered_at IS NULL ORDER BY seq DESC LIMIT 1)"
)


_PENDING = (
    "SELECT * FROM (SELECT *, row_number() OVER (PARTITION BY vm_id ORDER BY seq) AS rank "
    "FROM vm_metrics WHERE node = ? AND delivered_at IS NULL) WHERE rank <= ? ORDER BY seq"
)
_DELIVERED = (
    "UPDATE vm_metrics SET delivered_at = ? WHERE node = ? AND vm_id = ? AND seq <= ? "
    "AND delivered_at IS NULL"
)


def _last_seq_by_vm(entries: Sequence[Entry]) -> dict[str, int]:
    """Each VM's last delivered seq (delivery's entries of a VM are its oldest: a prefix)."""
    last: dict[str, int] = {}
    for e in entries:
        if e.seq > last.get(e.vm_id, -1):
            last[e.vm_id] = e.seq
    return last


def _sqlite_path(database: Database) -> str | None:
    url = database.engine.url
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    return url.database


def _record_row(node: str, record: UsageRecord) -> dict[str, Any]:
    row: dict[str, Any] = {c: getattr(record, c) for c in COUNTERS}
    row.update(
        node=node,
        vm_id=record.vm_id,
        customer_id=record.customer_id,
        kind=EntryKind.SAMPLE.value,
        timestamp_ns=record.timestamp_ns,
    )
    return row


def _notice_row(node: str, notice: Notice) -> dict[str, Any]:
    return {
        "node": node,
        "vm_id": notice.vm_id,
        "customer_id": notice.customer_id,
        "kind": notice.kind.value,
        "timestamp_ns": notice.at_ns,
        "gap_from_ns": notice.gap_from_ns,
    }


def _meter_row(node: str, meter: Meter) -> dict[str, Any]:
    rec, raw = meter.record, meter.raw
    row: dict[str, Any] = {c: getattr(rec, c) for c in COUNTERS}
    row.update({f"raw_{c}": getattr(raw, c) for c in COUNTERS})
    row.update(
        node=node,
        vm_id=rec.vm_id,
        customer_id=rec.customer_id,
        vmm=raw.vmm,
        timestamp_ns=rec.timestamp_ns,
    )
    return row


def _entry(row: Any) -> Entry:
    """An entry from a row (a mapping: sqlite3.Row or a SQLAlchemy row's _mapping)."""
    kind = EntryKind(row["kind"])
    record = None
    if kind is EntryKind.SAMPLE:
        record = UsageRecord(
            vm_id=row["vm_id"],
            customer_id=row["customer_id"],
            timestamp_ns=int(row["timestamp_ns"]),
            **{c: int(row[c]) for c in COUNTERS},
        )
    return Entry(
        seq=int(row["seq"]),
        kind=kind,
        vm_id=row["vm_id"],
        customer_id=row["customer_id"],
        at_ns=int(row["timestamp_ns"]),
        record=record,
        gap_from_ns=int(row["gap_from_ns"]),
    )


class SqlUsageLog:
    """On the store's Database (its migrations make the tables); borrows its engine."""

    def __init__(self, database: Database, node: str | None = None) -> None:
        self._engine = database.engine
        self._node = node or socket.gethostname()
        self._metered: set[str] | None = None  # VMs with a vm_meters row
        self._backlog: int | None = None
        path = _sqlite_path(database)
        # SQLite: each tick in one call on the loop (store/tick_writer.py); else the engine.
        self._writer = TickWriter(path) if path is not None else None

    async def meters(self) -> dict[str, Meter]:
        async with self._engine.connect() as conn:
            rows = (
                await conn.execute(select(vm_meters).where(vm_meters.c.node == self._node))
            ).all()
        found: dict[str, Meter] = {}
        for row in rows:
            raw = RawUsage(vmm=row.vmm, **{c: int(getattr(row, f"raw_{c}")) for c in COUNTERS})
            record = UsageRecord(
                vm_id=row.vm_id,
                customer_id=row.customer_id,
                timestamp_ns=int(row.timestamp_ns),
                **{c: int(getattr(row, c)) for c in COUNTERS},
            )
            found[row.vm_id] = Meter(raw=raw, record=record)
        self._metered = set(found)
        return found

    async def record_tick(
        self, meters: Sequence[Meter], notices: Sequence[Notice], backlog_max: int
    ) -> int:
        if not meters and not notices:
            return 0
        backlog = await self.backlog()
        if self._writer is not None:
            return await self._record_fast(self._writer, meters, notices, backlog >= backlog_max)
        if self._metered is None:
            await self.meters()
        metered = self._metered if self._metered is not None else set()
        replaced = 0
        async with self._engine.begin() as conn:
            if meters:
                if backlog >= backlog_max:
                    for meter in meters:
                        replaced += await self._drop_newest_sample(conn, meter.record.vm_id)
                await conn.execute(
                    vm_metrics.insert(), [_record_row(self._node, m.record) for m in meters]
                )
                old = [_meter_row(self._node, m) for m in meters if m.record.vm_id in metered]
                new = [_meter_row(self._node, m) for m in meters if m.record.vm_id not in metered]
                if old:
                    await conn.execute(
                        update(vm_meters)
                        .where(
                            vm_meters.c.node == self._node,
                            vm_meters.c.vm_id == bindparam("b_vm_id"),
                        )
                        .values({k: bindparam(k) for k in old[0] if k not in ("node", "vm_id")}),
                        [{**r, "b_vm_id": r["vm_id"]} for r in old],
                    )
                if new:
                    await conn.execute(vm_meters.insert(), new)
            if notices:
                await conn.execute(
                    vm_metrics.insert(), [_notice_row(self._node, n) for n in notices]
                )
        metered.update(m.record.vm_id for m in meters)
        self._backlog = backlog + len(meters) - replaced + len(notices)
        return replaced

    async def _record_fast(
        self, writer: TickWriter, meters: Sequence[Meter], notices: Sequence[Notice], full: bool
    ) -> int:
        node = self._node
        drops = [(node, m.record.vm_id) for m in meters] if full else []
        rows: list[tuple[Any, ...]] = []
        meter_rows: list[tuple[Any, ...]] = []
        for m in meters:
            r, w = m.record, m.raw
            counters = (
                r.cpu_time_ns,
                r.memory_bytes,
                r.disk_read_bytes,
                r.disk_write_bytes,
                r.network_rx_bytes,
                r.network_tx_bytes,
            )
            head = (node, r.vm_id, r.customer_id)
            rows.append((*head, "sample", r.timestamp_ns, *counters, 0))
            meter_rows.append(
                (
                    *head,
                    w.vmm,
                    r.timestamp_ns,
                    w.cpu_time_ns,
                    w.memory_bytes,
                    w.disk_read_bytes,
                    w.disk_write_bytes,
                    w.network_rx_bytes,
                    w.network_tx_bytes,
                    *counters,
                )
            )
        for n in notices:
            zeros = (0,) * len(COUNTERS)
            rows.append(
                (node, n.vm_id, n.customer_id, n.kind.value, n.at_ns, *zeros, n.gap_from_ns)
            )
        replaced, _, _ = await writer.run(
            [(_DROP_NEWEST_SAMPLE, drops), (_INSERT_ENTRY, rows), (_UPSERT_METER, meter_rows)]
        )
        if self._metered is not None:
            self._metered.update(m.record.vm_id for m in meters)
        self._backlog = (self._backlog or 0) + len(rows) - replaced
        return replaced

    async def _drop_newest_sample(self, conn: AsyncConnection, vm_id: str) -> int:
        newest = (
            await conn.execute(
                select(vm_metrics.c.seq, vm_metrics.c.kind)
                .where(
                    vm_metrics.c.node == self._node,
                    vm_metrics.c.delivered_at.is_(None),
                    vm_metrics.c.vm_id == vm_id,
                )
                .order_by(vm_metrics.c.seq.desc())
                .limit(1)
            )
        ).first()
        if newest is None or newest.kind != EntryKind.SAMPLE.value:
            return 0
        await conn.execute(delete(vm_metrics).where(vm_metrics.c.seq == newest.seq))
        return 1

    async def add_notices(self, notices: Sequence[Notice]) -> None:
        await self.record_tick((), notices, 0)

    async def pending(self, per_vm: int) -> dict[str, list[Entry]]:
        if self._writer is not None:
            rows: Sequence[Any] = await self._writer.query(_PENDING, (self._node, per_vm))
        else:
            rows = await self._pending_rows(per_vm)
        found: dict[str, list[Entry]] = {}
        for row in rows:
            found.setdefault(row["vm_id"], []).append(_entry(row))
        return found

    async def _pending_rows(self, per_vm: int) -> Sequence[Any]:
        ranked = (
            select(
                vm_metrics,
                func.row_number()
                .over(partition_by=vm_metrics.c.vm_id, order_by=vm_metrics.c.seq)
                .label("rank"),
            )
            .where(vm_metrics.c.node == self._node, vm_metrics.c.delivered_at.is_(None))
            .subquery()
        )
        query = select(ranked).where(ranked.c.rank <= per_vm).order_by(ranked.c.seq)
        async with self._engine.connect() as conn:
            return [row._mapping for row in (await conn.execute(query)).all()]

    async def delivered(self, entries: Sequence[Entry], at: float) -> None:
        if not entries:
            return
        # One statement per VM, not per entry: every undelivered entry of the VM up to
        # the last one given (they are its oldest), found by the outbox index.
        last = _last_seq_by_vm(entries)
        if self._writer is not None:
            marks = [(at, self._node, vm_id, seq) for vm_id, seq in last.items()]
            (count,) = await self._writer.run([(_DELIVERED, marks)])
        else:
            count = 0
            async with self._engine.begin() as conn:
                for vm_id, seq in last.items():
                    result = await conn.execute(
                        update(vm_metrics)
                        .where(
                            vm_metrics.c.node == self._node,
                            vm_metrics.c.vm_id == vm_id,
                            vm_metrics.c.seq <= seq,
                            vm_metrics.c.delivered_at.is_(None),
                        )
                        .values(delivered_at=at)
                    )
                    count += int(result.rowcount)
        if self._backlog is not None:
            self._backlog = max(0, self._backlog - count)

    async def backlog(self) -> int:
        if self._backlog is None:
            async with self._engine.connect() as conn:
                count = (
                    await conn.execute(
                        select(func.count())
                        .select_from(vm_metrics)
                        .where(vm_metrics.c.node == self._node, vm_metrics.c.delivered_at.is_(None))
                    )
                ).scalar_one()
            self._backlog = int(count)
        return self._backlog

    async def prune(self, before: float) -> int:
        async with self._engine.begin() as conn:
            result = await conn.execute(
                delete(vm_metrics).where(
                    vm_metrics.c.node == self._node, vm_metrics.c.delivered_at < before
                )
            )
        return int(result.rowcount)

    def close(self) -> None:
        """Close the tick writer's connection (the engine is its owner's to close)."""
        if self._writer is not None:
            self._writer.close()

    async def forget(self, vm_id: str) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(
                delete(vm_meters).where(vm_meters.c.node == self._node, vm_meters.c.vm_id == vm_id)
            )
        if self._metered is not None:
            self._metered.discard(vm_id)

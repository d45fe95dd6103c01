"""The Audit port on the database: the append-only, hash-chained `audit_log` (migration
0009) and its chain head `audit_head`.

Appends are serialised so the chain never forks: every append is one transaction that
first updates the head row (which takes the database's write lock on SQLite and the row's
lock on PostgreSQL, so a second writer waits there, whichever node it runs on), then reads
the head, chains the new rows after it (core/audit_chain.py), inserts them and moves the
head. Two metald nodes on one PostgreSQL therefore share one chain, ordered by commit; seq
is the primary key, so even a writer that got it wrong could not fork it (it would fail
and retry).

Off the RPC's latency: `record` puts the event on a bounded queue and returns; one writer
task appends what has queued, up to `batch_max` rows per transaction (a burst of calls
costs one commit, not one each). A full queue makes `record` wait (the callers, not memory,
absorb a flood). `stop` (a clean shutdown, after the server has finished its calls) writes
everything queued before it returns. On kill -9 the rows still queued are lost: at most
those of the calls answered in the last transaction's time (milliseconds; the writer
starts as soon as a row arrives). A committed row survives kill -9 (WAL; with
synchronous=NORMAL a power loss can lose the last commits). A database that fails is
retried with backoff, the rows kept in memory meanwhile (and logged).

The chain head also makes a truncated tail detectable (`verify`): rows deleted from the end
leave the head pointing past them. Someone who can write the database can still rewrite the
tail and the head together: the security log lines (one per row, shipped off the host) are
the copy they cannot reach.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    Integer,
    String,
    Table,
    func,
    insert,
    select,
    update,
)

from metald.core.audit import AuditEvent
from metald.core.audit_chain import ChainedRow, Verdict, Walk, chain
from metald.store.database import Database
from metald.store.schema import metadata

log = logging.getLogger(__name__)

audit_log = Table(
    "audit_log",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("at_ns", BigInteger, nullable=False),
    Column("actor", String(256), nullable=False),
    Column("role", String(16), nullable=False),
    Column("customer_id", String(128), nullable=True),
    Column("method", String(128), nullable=False),
    Column("vm_id", String(64), nullable=True),
    Column("code", String(32), nullable=False),
    Column("source", String(128), nullable=True),
    Column("trace_id", String(32), nullable=False),
    Column("tenant_header", String(256), nullable=True),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    Index("ix_audit_log_customer", "customer_id", "seq"),
    Index("ix_audit_log_at", "at_ns"),
)

audit_head = Table(
    "audit_head",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("seq", BigInteger, nullable=False),
    Column("hash", String(64), nullable=False),
)

# Column widths: what a caller sends (the tenant header) is cut to fit before it is hashed.
_WIDTHS = {
    "actor": 256,
    "role": 16,
    "customer_id": 128,
    "method": 128,
    "vm_id": 64,
    "code": 32,
    "source": 128,
    "trace_id": 32,
    "tenant_header": 256,
}
_STOP = object()


def bounded(event: AuditEvent) -> AuditEvent:
    """The event with every string cut to its column's width."""
    changes: dict[str, Any] = {}
    for name, width in _WIDTHS.items():
        value = getattr(event, name)
        if isinstance(value, str) and len(value) > width:
            changes[name] = value[:width]
    return replace(event, **changes) if changes else event


def _row(r: Any) -> ChainedRow:
    m = r._mapping
    event = AuditEvent(**{f: m[f] for f in AuditEvent.__dataclass_fields__})
    return ChainedRow(int(m["seq"]), event, m["prev_hash"], m["hash"])


class SqlAuditLog:
    def __init__(self, database: Database, queue_max: int = 10_000, batch_max: int = 500) -> None:
        self._db = database
        self._queue: asyncio.Queue[object] = asyncio.Queue(maxsize=queue_max)
        self._batch_max = batch_max
        self._writer: asyncio.Task[None] | None = None
        self.written = 0  # rows committed by this writer

    # -- the Audit port ----------------------------------------------------------------

    async def record(self, event: AuditEvent) -> None:
        """Queue the event for the writer (written before `stop` returns); without a running
        writer (tools, tests), append it now."""
        if self._writer is None:
            await self.append([event])
        else:
            await self._queue.put(event)

    # -- the writer --------------------------------------------------------------------

    async def start(self) -> None:
        if self._writer is None:
            self._writer = asyncio.create_task(self._run(), name="audit-writer")

    async def stop(self, timeout: float = 30.0) -> None:
        """Write what is queued, then stop the writer."""
        writer, self._writer = self._writer, None
        if writer is None:
            return
        await self._queue.put(_STOP)
        try:
            await asyncio.wait_for(writer, timeout)
        except TimeoutError:
            log.error(
                "audit: %d rows not written at shutdown (the database did not take them "
                "within %.0f s)",
                self._queue.qsize(),
                timeout,
            )

    async def _run(self) -> None:
        stopping = False
        while not stopping:
            item = await self._queue.get()
            batch: list[AuditEvent] = []
            while True:
                if item is _STOP:
                    stopping = True
                else:
                    assert isinstance(item, AuditEvent)
                    batch.append(item)
                if stopping or len(batch) >= self._batch_max or self._queue.empty():
                    break
                item = self._queue.get_nowait()
            if batch:
                await self._write(batch)

    async def _write(self, batch: Sequence[AuditEvent]) -> None:
        delay, failed = 0.1, False
        while True:
            try:
                await self.append(batch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not failed:
                    log.error("audit: cannot append %d rows (retrying): %s", len(batch), exc)
                failed = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if failed:
                log.warning("audit: the database takes rows again")
            return

    async def append(self, events: Sequence[AuditEvent]) -> list[ChainedRow]:
        """Append `events` in one transaction, chained after the head; the rows written."""
        events = [bounded(e) for e in events]
        async with self._db.engine.begin() as conn:
            # The write lock first (SQLite) / the head row's lock (PostgreSQL), and the head
            # read in the same statement: it is the latest, and no other writer appends
            # until we commit. (UPDATE ... RETURNING: SQLite 3.35, PostgreSQL.)
            head = (
                await conn.execute(
                    update(audit_head)
                    .where(audit_head.c.id == 1)
                    .values(seq=audit_head.c.seq)
                    .returning(audit_head.c.seq, audit_head.c.hash)
                )
            ).one()
            rows = chain(int(head.seq), head.hash, events)
            await conn.execute(
                insert(audit_log),
                [
                    {"seq": r.seq, "prev_hash": r.prev_hash, "hash": r.hash, **vars(r.event)}
                    for r in rows
                ],
            )
            await conn.execute(
                update(audit_head)
                .where(audit_head.c.id == 1)
                .values(seq=rows[-1].seq, hash=rows[-1].hash)
            )
        self.written += len(rows)
        return rows

    # -- reading -----------------------------------------------------------------------

    async def head(self) -> tuple[int, str]:
        async with self._db.engine.connect() as conn:
            row = (
                await conn.execute(
                    select(audit_head.c.seq, audit_head.c.hash).where(audit_head.c.id == 1)
                )
            ).one()
        return int(row.seq), row.hash

    async def rows(
        self, customer: str | None = None, since_ns: int | None = None, limit: int | None = None
    ) -> list[ChainedRow]:
        """Rows in seq order, optionally one customer's and from an instant on; with
        `limit`, the newest `limit` of them."""
        query = select(audit_log)
        if customer is not None:
            query = query.where(audit_log.c.customer_id == customer)
        if since_ns is not None:
            query = query.where(audit_log.c.at_ns >= since_ns)
        if limit is not None:
            query = query.order_by(audit_log.c.seq.desc()).limit(limit)
        else:
            query = query.order_by(audit_log.c.seq)
        async with self._db.engine.connect() as conn:
            found = [_row(r) for r in await conn.execute(query)]
        return sorted(found, key=lambda r: r.seq) if limit is not None else found

    async def _walk(self, upto: int, page: int = 5000) -> AsyncIterator[ChainedRow]:
        after = 0
        while after < upto:
            query = (
                select(audit_log)
                .where(audit_log.c.seq > after, audit_log.c.seq <= upto)
                .order_by(audit_log.c.seq)
                .limit(page)
            )
            async with self._db.engine.connect() as conn:
                batch = [_row(r) for r in await conn.execute(query)]
            for row in batch:
                yield row
            if len(batch) < page:
                return
            after = batch[-1].seq

    async def verify(self) -> Verdict:
        """Walk the chain in pages (memory: one page) up to the head as it is now, and
        check it against the head; a daemon may go on appending meanwhile. Rows beyond the
        head (added behind the writer's back) are found by comparing the highest seq with
        the head read after it: the writer moves the head in the rows' own transaction."""
        head = await self.head()
        walk = Walk()
        async for row in self._walk(head[0]):
            bad = walk.step(row)
            if bad is not None:
                return bad
        verdict = walk.end(head)
        if not verdict.ok:
            return verdict
        async with self._db.engine.connect() as conn:
            highest = (await conn.execute(select(func.max(audit_log.c.seq)))).scalar() or 0
        latest = (await self.head())[0]
        if highest > latest:
            return Verdict(
                False,
                walk.count,
                latest + 1,
                f"rows after the chain head (seq {latest}) were added",
            )
        return verdict

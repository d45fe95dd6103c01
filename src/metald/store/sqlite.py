"""The Store port on SQLAlchemy Core (async), on a Database (store/database.py) it shares with
the address book. SQLite by default; the SQL is portable.

ListVms reads VmSummary rows (what VmInfo shows), not whole records. Its queries
(`page_queries`) are sent straight to the pooled connection's driver when it is
aiosqlite: through SQLAlchemy's async layer each query cost about 1 ms of round trips to
the driver's thread (cursor, execute, fetch, close: one hop each), against 0.1 ms for the
driver's own execute_fetchall, and ListVms sends two. The connection still comes from the
one engine's pool; that SQL is SQLite's (json_extract, `?` placeholders), and any other
driver takes the SQLAlchemy path with the same conditions."""

from __future__ import annotations

import json
import socket
from collections.abc import Sequence
from typing import Any

import aiosqlite
from sqlalchemy import delete, func, or_, select, tuple_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql.elements import ColumnElement

from metald.core.errors import AlreadyExists
from metald.core.models import ProcessIdentity, VmConfig, VmRecord, VmSummary
from metald.core.states import LIVE_STATES, VmState
from metald.store.database import Database
from metald.store.schema import vms


class SqlStore:
    def __init__(self, database: Database, node: str | None = None) -> None:
        self._database = database
        self._node = node or socket.gethostname()
        self._engine: AsyncEngine = database.engine

    async def migrate(self) -> None:
        await self._database.migrate()

    async def insert(self, vm: VmRecord) -> None:
        # No look-up first: the primary key refuses a taken id (one round trip fewer in
        # every CreateVm).
        try:
            async with self._engine.begin() as conn:
                await conn.execute(vms.insert().values(**self._row(vm)))
        except IntegrityError:
            raise AlreadyExists(f"vm_id {vm.id!r} is taken") from None

    async def get(self, vm_id: str) -> VmRecord | None:
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(select(vms).where(vms.c.id == vm_id, vms.c.deleted_at.is_(None)))
            ).first()
        return self._record(row._mapping) if row else None

    async def update(self, vm: VmRecord) -> None:
        values = self._row(vm)
        del values["id"]
        async with self._engine.begin() as conn:
            await conn.execute(update(vms).where(vms.c.id == vm.id).values(**values))

    async def remove(self, vm_id: str) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(delete(vms).where(vms.c.id == vm_id))

    async def list_live(self) -> list[VmRecord]:
        async with self._engine.connect() as conn:
            rows = await conn.execute(
                select(vms).where(vms.c.deleted_at.is_(None), vms.c.node == self._node)
            )
            return [self._record(r._mapping) for r in rows]

    async def list_for_start(self) -> tuple[list[VmRecord], set[str]]:
        """At 100,000 rows, decoding every row into a record took 5 s of start-up here;
        most are SHUTDOWN VMs without a network, of which start-up needs only the id."""
        mine = (vms.c.deleted_at.is_(None), vms.c.node == self._node)
        wanted = select(vms).where(*mine)
        in_sql = self._engine.dialect.name == "sqlite"
        if in_sql:
            live = vms.c.state.in_([s.value for s in LIVE_STATES])
            networked = func.json_array_length(vms.c.config, "$.network") > 0
            wanted = wanted.where(or_(live, networked))
        async with self._engine.connect() as conn:
            ids = {str(i) for (i,) in await conn.execute(select(vms.c.id).where(*mine))}
            records = [self._record(r._mapping) for r in await conn.execute(wanted)]
        if not in_sql:
            records = [r for r in records if r.state in LIVE_STATES or r.config.network]
        return records, ids

    async def live_backends(self) -> set[str]:
        query = (
            select(vms.c.backend)
            .where(vms.c.deleted_at.is_(None), vms.c.node == self._node)
            .distinct()
        )
        async with self._engine.connect() as conn:
            return {str(backend) for (backend,) in await conn.execute(query)}

    async def list_for_customer(
        self,
        customer_id: str | None,
        states: Sequence[VmState],
        limit: int,
        after: tuple[float, str] | None,
    ) -> tuple[list[VmSummary], int]:
        async with self._engine.connect() as conn:
            driver = (await conn.get_raw_connection()).driver_connection
            if isinstance(driver, aiosqlite.Connection):
                (page_sql, page_args), (count_sql, count_args) = page_queries(
                    customer_id, states, limit, after
                )
                rows = await driver.execute_fetchall(page_sql, page_args)
                total = next(iter(await driver.execute_fetchall(count_sql, count_args)))[0]
                return [_summary_row(row) for row in rows], int(total)
            where: list[ColumnElement[bool]] = [vms.c.deleted_at.is_(None)]
            if customer_id is not None:
                where.append(vms.c.customer_id == customer_id)
            if states:
                where.append(vms.c.state.in_([s.value for s in states]))
            page = select(*(vms.c[name] for name in _SUMMARY_COLUMNS)).where(*where)
            if after is not None:
                page = page.where(tuple_(vms.c.created_at, vms.c.id) > tuple_(*after))
            page = page.order_by(vms.c.created_at, vms.c.id).limit(limit)
            records = [_summary(r._mapping) for r in await conn.execute(page)]
            counted = await conn.execute(select(func.count()).select_from(vms).where(*where))
            return records, int(counted.scalar_one())

    async def count_by_state_and_backend(self) -> dict[tuple[VmState, str], int]:
        # Every state named: the index is searched per state past the deleted rows
        # (0007_vms_state_backend.py).
        query = (
            select(vms.c.state, vms.c.backend, func.count())
            .where(vms.c.state.in_([s.value for s in VmState]), vms.c.deleted_at.is_(None))
            .group_by(vms.c.state, vms.c.backend)
        )
        async with self._engine.connect() as conn:
            rows = await conn.execute(query)
            return {(VmState(state), str(backend)): int(n) for state, backend, n in rows}

    async def ping(self) -> None:
        await self._database.ping()

    async def close(self) -> None:
        """Closes the database, which the address book shares (Database.close is idempotent)."""
        await self._database.close()

    def _row(self, vm: VmRecord) -> dict[str, Any]:
        return {
            "id": vm.id,
            "customer_id": vm.customer_id,
            "config": vm.config.to_dict(),
            "state": vm.state.value,
            "backend": vm.backend,
            "pid": vm.process.pid if vm.process else None,
            "pid_start_time": vm.process.start_time if vm.process else None,
            "backend_info": vm.backend_info,
            "node": self._node,
            "created_at": vm.created_at,
            "updated_at": vm.updated_at,
            "deleted_at": vm.deleted_at,
        }

    @staticmethod
    def _record(row: Any) -> VmRecord:
        process = None
        if row["pid"] is not None:
            process = ProcessIdentity(pid=row["pid"], start_time=row["pid_start_time"])
        return VmRecord(
            id=row["id"],
            customer_id=row["customer_id"],
            config=VmConfig.from_dict(row["config"]),
            state=VmState(row["state"]),
            backend=row["backend"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            process=process,
            backend_info=dict(row["backend_info"]),
            deleted_at=row["deleted_at"],
        )


# A page's rows: only what VmInfo shows (VmSummary), the config's three fields read by
# SQLite's JSON functions in the aiosqlite path, not the whole config decoded per row.
_SUMMARY_COLUMNS = ("id", "customer_id", "state", "config", "created_at", "updated_at")
_PAGE_COLUMNS = (
    "id, customer_id, state, json_extract(config, '$.vcpu_count'), "
    "json_extract(config, '$.memory_bytes'), json_extract(config, '$.metadata'), "
    "created_at, updated_at"
)
_DEFAULT = VmConfig()


def page_queries(
    customer_id: str | None, states: Sequence[VmState], limit: int, after: tuple[float, str] | None
) -> tuple[tuple[str, tuple[Any, ...]], tuple[str, tuple[Any, ...]]]:
    """ListVms's page (in (created_at, id) order after the cursor) and count for SQLite,
    with `?` placeholders and their arguments: both match ix_vms_customer_page (schema.py).
    `customer_id` None (an operator's list of every customer's VMs): no index serves it, the
    table is read and sorted (an operator's call, rare; an index can come if it is not)."""
    where = "deleted_at IS NULL"
    args: tuple[Any, ...] = ()
    if customer_id is not None:
        where = "customer_id = ? AND " + where
        args = (customer_id,)
    if states:
        where += f" AND state IN ({', '.join('?' for _ in states)})"
        args += tuple(s.value for s in states)
    count = (f"SELECT count(*) FROM vms WHERE {where}", args)
    page_where, page_args = where, args
    if after is not None:
        page_where += " AND (created_at, id) > (?, ?)"
        page_args += after
    page = (
        f"SELECT {_PAGE_COLUMNS} FROM vms WHERE {page_where} ORDER BY created_at, id LIMIT ?",
        (*page_args, limit),
    )
    return page, count


def _summary_row(row: Sequence[Any]) -> VmSummary:
    """A row of page_queries' page (a config without a field has VmConfig's default)."""
    vm_id, customer, state, vcpus, memory, metadata, created, updated = row
    return VmSummary(
        id=vm_id,
        customer_id=customer,
        state=VmState(state),
        vcpu_count=_DEFAULT.vcpu_count if vcpus is None else int(vcpus),
        memory_bytes=_DEFAULT.memory_bytes if memory is None else int(memory),
        metadata=json.loads(metadata) if metadata else {},
        created_at=created,
        updated_at=updated,
    )


def _summary(row: Any) -> VmSummary:
    """A row of _SUMMARY_COLUMNS through SQLAlchemy (its config decoded)."""
    config = row["config"]
    return VmSummary(
        id=row["id"],
        customer_id=row["customer_id"],
        state=VmState(row["state"]),
        vcpu_count=int(config.get("vcpu_count", _DEFAULT.vcpu_count)),
        memory_bytes=int(config.get("memory_bytes", _DEFAULT.memory_bytes)),
        metadata=dict(config.get("metadata") or {}),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )

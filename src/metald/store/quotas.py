"""The Quotas port on SQL: per-customer overrides and the admission ledger (migration 0003).

Tables:
- ``quota_overrides``: (customer_id, resource) -> value; a NULL value is "unlimited", a
  missing row is "the operator's default".
- ``vm_claims``: one row per admitted VM: what it holds (vCPUs, memory, writable disk
  bytes), on which node, and ``held`` while an admission is in flight (a create whose VM
  row may not exist yet, a boot whose row is still SHUTDOWN). Usage is these rows joined
  with ``vms``: whether a claim is live follows the VM's state (core/quotas.py).
- ``admission_locks``: one row per scope (``customer:<id>``, ``host:<node>``), updated first
  in every admission's transaction. That UPDATE is what makes count-then-record atomic:
  on PostgreSQL it takes the row's lock until commit (admissions of one customer, or on one
  host, queue on it; every other statement then reads what the previous one committed), on
  SQLite any write takes the database's one write lock, which serialises all admissions of
  every process on the file. Scopes are always locked customer first, then host, so two
  admissions cannot deadlock.
"""

from __future__ import annotations

import socket
import time
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    String,
    Table,
    delete,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from metald.core.errors import AlreadyExists
from metald.core.ports import AdmissionCheck
from metald.core.quotas import AdmissionView, Claim, Limit, Resource, Usage
from metald.core.states import LIVE_STATES
from metald.store.database import Database
from metald.store.schema import metadata, vms

quota_overrides = Table(
    "quota_overrides",
    metadata,
    Column("customer_id", String(128), primary_key=True),
    Column("resource", String(32), primary_key=True),
    Column("value", BigInteger, nullable=True),  # NULL: unlimited
    Column("updated_at", Float, nullable=False),
)

vm_claims = Table(
    "vm_claims",
    metadata,
    Column("vm_id", String(64), primary_key=True),
    Column("customer_id", String(128), nullable=False),
    Column("node", String(128), nullable=False),
    Column("vcpus", Integer, nullable=False),
    Column("memory_bytes", BigInteger, nullable=False),
    Column("disk_bytes", BigInteger, nullable=False),
    Column("held", Boolean, nullable=False),
    Column("claimed_at", Float, nullable=False),
    Index("ix_vm_claims_customer", "customer_id"),
    Index("ix_vm_claims_node", "node"),
)

admission_locks = Table(
    "admission_locks",
    metadata,
    Column("scope", String(160), primary_key=True),
    Column("turns", BigInteger, nullable=False),
)

_LIVE = frozenset(s.value for s in LIVE_STATES)


class SqlQuotas:
    """On the store's Database (tables from its migrations); borrows its engine. `node`
    must be the VM store's (both default to the host name)."""

    def __init__(self, database: Database, node: str | None = None) -> None:
        self._engine = database.engine
        self._node = node or socket.gethostname()

    # -- overrides ---------------------------------------------------------------------------

    async def overrides(self, customer_id: str) -> dict[Resource, Limit]:
        async with self._engine.connect() as conn:
            return await self._overrides(conn, customer_id)

    async def all_overrides(self) -> dict[str, dict[Resource, Limit]]:
        async with self._engine.connect() as conn:
            rows = await conn.execute(
                select(quota_overrides).order_by(
                    quota_overrides.c.customer_id, quota_overrides.c.resource
                )
            )
            result: dict[str, dict[Resource, Limit]] = {}
            for row in rows:
                if row.resource in Resource.__members__.values():
                    result.setdefault(row.customer_id, {})[Resource(row.resource)] = _limit(row)
            return result

    async def set_override(self, customer_id: str, resource: Resource, limit: Limit) -> None:
        if limit is not None and limit < 0:
            raise ValueError("a limit is a number >= 0, or None for unlimited")
        key = (quota_overrides.c.customer_id == customer_id) & (
            quota_overrides.c.resource == resource.value
        )
        values = {"value": limit, "updated_at": time.time()}
        for _ in range(2):  # an insert that lost a race to another writer becomes an update
            try:
                async with self._engine.begin() as conn:
                    changed = await conn.execute(update(quota_overrides).where(key).values(values))
                    if not changed.rowcount:
                        await conn.execute(
                            quota_overrides.insert().values(
                                customer_id=customer_id, resource=resource.value, **values
                            )
                        )
                return
            except IntegrityError:
                continue
        raise RuntimeError("could not record the override")  # pragma: no cover

    async def clear_override(self, customer_id: str, resource: Resource | None = None) -> int:
        query = delete(quota_overrides).where(quota_overrides.c.customer_id == customer_id)
        if resource is not None:
            query = query.where(quota_overrides.c.resource == resource.value)
        async with self._engine.begin() as conn:
            return int((await conn.execute(query)).rowcount or 0)

    # -- the ledger --------------------------------------------------------------------------

    async def usage(self, customer_id: str) -> Usage:
        async with self._engine.connect() as conn:
            customer, _ = await self._count(conn, customer_id, "")
            return customer

    async def admit(
        self, customer_id: str, vm_id: str, claim: Claim, check: AdmissionCheck, *, new: bool
    ) -> None:
        scopes = (f"customer:{customer_id}", f"host:{self._node}")
        while True:
            try:
                async with self._engine.begin() as conn:
                    if not await self._lock(conn, scopes):
                        missing = True
                    else:
                        missing = False
                        customer, host = await self._count(conn, customer_id, vm_id)
                        overrides = await self._overrides(conn, customer_id)
                        check(AdmissionView(customer, host, overrides))  # a raise records nothing
                        await self._record(conn, customer_id, vm_id, claim, new)
            except IntegrityError:
                # Another customer's create of the same id (it holds another customer lock)
                # recorded its claim between our look and our insert.
                raise AlreadyExists(f"a VM with id {vm_id!r} exists or existed") from None
            if not missing:
                return
            await self._make_scopes(scopes)

    async def settle(self, vm_id: str) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(
                update(vm_claims).where(vm_claims.c.vm_id == vm_id).values(held=False)
            )

    async def release(self, vm_id: str) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(delete(vm_claims).where(vm_claims.c.vm_id == vm_id))

    async def sweep(self) -> int:
        mine = vm_claims.c.node == self._node
        kept = select(vms.c.id).where(vms.c.deleted_at.is_(None))
        async with self._engine.begin() as conn:
            await conn.execute(update(vm_claims).where(mine).values(held=False))
            gone = await conn.execute(delete(vm_claims).where(mine, vm_claims.c.vm_id.not_in(kept)))
            return int(gone.rowcount or 0)

    # -- helpers -----------------------------------------------------------------------------

    async def _lock(self, conn: AsyncConnection, scopes: tuple[str, ...]) -> bool:
        """Take each scope's row lock, in order; False if a scope's row does not exist yet."""
        for scope in scopes:
            result = await conn.execute(
                update(admission_locks)
                .where(admission_locks.c.scope == scope)
                .values(turns=admission_locks.c.turns + 1)
            )
            if not result.rowcount:
                return False
        return True

    async def _make_scopes(self, scopes: tuple[str, ...]) -> None:
        for scope in scopes:
            try:
                async with self._engine.begin() as conn:
                    await conn.execute(admission_locks.insert().values(scope=scope, turns=0))
            except IntegrityError:
                pass  # there already, made by us earlier or by another process

    async def _count(
        self, conn: AsyncConnection, customer_id: str, vm_id: str
    ) -> tuple[Usage, Usage]:
        """(the customer's usage on every node, this node's usage), without vm_id."""
        query = (
            select(
                vm_claims,
                vms.c.id.label("row_id"),
                vms.c.state.label("state"),
                vms.c.deleted_at.label("deleted_at"),
            )
            .select_from(vm_claims.outerjoin(vms, vms.c.id == vm_claims.c.vm_id))
            .where(
                or_(vm_claims.c.customer_id == customer_id, vm_claims.c.node == self._node),
                vm_claims.c.vm_id != vm_id,
            )
        )
        customer = _Tally()
        host = _Tally()
        for row in await conn.execute(query):
            if row.deleted_at is not None:
                continue
            live = bool(row.held) or row.row_id is None or row.state in _LIVE
            if row.customer_id == customer_id:
                customer.add(row, live)
            if row.node == self._node:
                host.add(row, live)
        return customer.usage(), host.usage()

    async def _overrides(self, conn: AsyncConnection, customer_id: str) -> dict[Resource, Limit]:
        rows = await conn.execute(
            select(quota_overrides).where(quota_overrides.c.customer_id == customer_id)
        )
        return {
            Resource(row.resource): _limit(row)
            for row in rows
            if row.resource in Resource.__members__.values()
        }

    async def _record(
        self, conn: AsyncConnection, customer_id: str, vm_id: str, claim: Claim, new: bool
    ) -> None:
        """Hold vm_id's claim: a boot finds it there (what it holds was recorded when it was
        made, its disks included) and marks it held; a create makes it (and a VM made before
        the ledger existed, without a claim, gets one at its boot)."""
        if not new:
            changed = await conn.execute(
                update(vm_claims).where(vm_claims.c.vm_id == vm_id).values(held=True)
            )
            if changed.rowcount:
                return
        else:
            taken = await conn.execute(select(vm_claims.c.vm_id).where(vm_claims.c.vm_id == vm_id))
            if taken.first() is not None:
                raise AlreadyExists(f"a VM with id {vm_id!r} exists or existed")
        await conn.execute(
            vm_claims.insert().values(
                vm_id=vm_id,
                customer_id=customer_id,
                node=self._node,
                vcpus=claim.vcpus,
                memory_bytes=claim.memory_bytes,
                disk_bytes=claim.disk_bytes,
                held=True,
                claimed_at=time.time(),
            )
        )


def _limit(row: Any) -> Limit:
    return None if row.value is None else int(row.value)


class _Tally:
    def __init__(self) -> None:
        self.running = self.vms = self.vcpus = self.memory = self.disk = 0

    def add(self, row: Any, live: bool) -> None:
        self.vms += 1
        self.disk += int(row.disk_bytes)
        if live:
            self.running += 1
            self.vcpus += int(row.vcpus)
            self.memory += int(row.memory_bytes)

    def usage(self) -> Usage:
        return Usage(
            running_vms=self.running,
            vms=self.vms,
            vcpus=self.vcpus,
            memory_bytes=self.memory,
            disk_bytes=self.disk,
        )

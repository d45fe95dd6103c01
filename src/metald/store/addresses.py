"""IP address allocations: which VM holds which address (table ``ip_allocations``).

The table's primary key is the address, so the database itself refuses a duplicate, also
between two metald processes or after a restart. Choosing a free address is the network
manager's job (metald.network.addressing); this module only records claims.

Two implementations of the AddressBook port: SqlAddressBook (SQLAlchemy Core, async, on the
Database the VM store uses; the table is created by migration 0002) and MemoryAddressBook
for unit tests.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import Column, Float, Index, Integer, String, Table, delete, select
from sqlalchemy.exc import IntegrityError

from metald.core.models import Allocation as Allocation  # the port's types live in core;
from metald.core.ports import AddressBook as AddressBook  # re-exported for this module's users
from metald.store.database import Database
from metald.store.schema import metadata

ip_allocations = Table(
    "ip_allocations",
    metadata,
    Column("address", String(64), primary_key=True),  # canonical text (ipaddress str())
    Column("vm_id", String(64), nullable=False),
    Column("family", Integer, nullable=False),  # 4 or 6
    Column("allocated_at", Float, nullable=False),
    Index("ix_ip_allocations_vm", "vm_id"),
    Index("ix_ip_allocations_family", "family"),
)


class MemoryAddressBook:
    def __init__(self) -> None:
        self._rows: dict[str, Allocation] = {}

    async def claim(self, vm_id: str, family: int, address: str) -> bool:
        if address in self._rows:
            return False
        self._rows[address] = Allocation(vm_id, family, address, time.time())
        return True

    async def used(self, family: int) -> set[str]:
        return {a.address for a in self._rows.values() if a.family == family}

    async def for_vm(self, vm_id: str) -> list[Allocation]:
        return sorted((a for a in self._rows.values() if a.vm_id == vm_id), key=lambda a: a.family)

    async def release(self, vm_id: str) -> int:
        gone = [k for k, a in self._rows.items() if a.vm_id == vm_id]
        for k in gone:
            del self._rows[k]
        return len(gone)

    async def release_address(self, vm_id: str, address: str) -> None:
        row = self._rows.get(address)
        if row is not None and row.vm_id == vm_id:
            del self._rows[address]

    async def all(self) -> list[Allocation]:
        return sorted(self._rows.values(), key=lambda a: a.address)


class SqlAddressBook:
    """On the store's Database (the table comes from its migrations); borrows its engine."""

    def __init__(self, database: Database) -> None:
        self._engine = database.engine

    async def claim(self, vm_id: str, family: int, address: str) -> bool:
        try:
            async with self._engine.begin() as conn:
                await conn.execute(
                    ip_allocations.insert().values(
                        address=address, vm_id=vm_id, family=family, allocated_at=time.time()
                    )
                )
        except IntegrityError:
            return False
        return True

    async def used(self, family: int) -> set[str]:
        async with self._engine.connect() as conn:
            rows = await conn.execute(
                select(ip_allocations.c.address).where(ip_allocations.c.family == family)
            )
            return {r[0] for r in rows}

    async def for_vm(self, vm_id: str) -> list[Allocation]:
        async with self._engine.connect() as conn:
            rows = await conn.execute(
                select(ip_allocations)
                .where(ip_allocations.c.vm_id == vm_id)
                .order_by(ip_allocations.c.family)
            )
            return [self._allocation(r._mapping) for r in rows]

    async def release(self, vm_id: str) -> int:
        async with self._engine.begin() as conn:
            result = await conn.execute(
                delete(ip_allocations).where(ip_allocations.c.vm_id == vm_id)
            )
            return int(result.rowcount or 0)

    async def release_address(self, vm_id: str, address: str) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(
                delete(ip_allocations).where(
                    ip_allocations.c.vm_id == vm_id, ip_allocations.c.address == address
                )
            )

    async def all(self) -> list[Allocation]:
        async with self._engine.connect() as conn:
            rows = await conn.execute(select(ip_allocations).order_by(ip_allocations.c.address))
            return [self._allocation(r._mapping) for r in rows]

    @staticmethod
    def _allocation(row: Any) -> Allocation:
        return Allocation(
            vm_id=row["vm_id"],
            family=int(row["family"]),
            address=row["address"],
            allocated_at=float(row["allocated_at"]),
        )

"""Jail ids: the unprivileged uid (and gid: the same number) each VM's VMM runs as (table
``jail_ids``, migration 0004).

Why in the store: the id must outlive metald (a restarted metald adopts VMMs running as
their ids, and a stopped VM's disk copies belong to its id) and must never be given to a
second VM while the first lives, even when two metald processes share the database. The
primary key (node, uid) makes the database refuse a second holder; (node, vm_id) is unique,
so a VM never holds two. A claim that loses a race tries the next free id.

Two implementations of the JailIds port: SqlJailIds and MemoryJailIds (unit tests).
"""

from __future__ import annotations

import socket
import time

from sqlalchemy import Column, Float, Integer, String, Table, UniqueConstraint, delete, select
from sqlalchemy.exc import IntegrityError

from metald.core.errors import ResourceExhausted
from metald.core.ports import JailIds as JailIds
from metald.store.database import Database
from metald.store.schema import metadata

jail_ids = Table(
    "jail_ids",
    metadata,
    Column("node", String(128), primary_key=True),
    Column("uid", Integer, primary_key=True),
    Column("vm_id", String(64), nullable=False),
    Column("claimed_at", Float, nullable=False),
    UniqueConstraint("node", "vm_id", name="uq_jail_ids_vm"),
)

_CLAIM_ATTEMPTS = 32


def check_range(first: int, last: int) -> None:
    if not 0 < first <= last < 2**32 - 1:
        raise ValueError(f"jail id range {first}-{last}: 1 <= first <= last < 4294967295")


def _exhausted(first: int, last: int) -> ResourceExhausted:
    return ResourceExhausted(
        f"no free jail uid on this host (all {last - first + 1} of {first}-{last} are held)"
    )


class MemoryJailIds:
    def __init__(self, first: int, last: int) -> None:
        check_range(first, last)
        self.first, self.last = first, last
        self._held: dict[str, int] = {}

    async def claim(self, vm_id: str) -> int:
        if vm_id in self._held:
            return self._held[vm_id]
        used = set(self._held.values())
        for uid in range(self.first, self.last + 1):
            if uid not in used:
                self._held[vm_id] = uid
                return uid
        raise _exhausted(self.first, self.last)

    async def for_vm(self, vm_id: str) -> int | None:
        return self._held.get(vm_id)

    async def release(self, vm_id: str) -> None:
        self._held.pop(vm_id, None)

    async def all(self) -> dict[str, int]:
        return dict(self._held)


class SqlJailIds:
    """On the store's Database (the table comes from its migrations); borrows its engine."""

    def __init__(self, database: Database, first: int, last: int, node: str | None = None) -> None:
        check_range(first, last)
        self.first, self.last = first, last
        self._engine = database.engine
        self._node = node or socket.gethostname()

    async def claim(self, vm_id: str) -> int:
        for _ in range(_CLAIM_ATTEMPTS):
            held = await self.for_vm(vm_id)
            if held is not None:
                return held
            uid = await self._lowest_free()
            if uid is None:
                raise _exhausted(self.first, self.last)
            try:
                async with self._engine.begin() as conn:
                    await conn.execute(
                        jail_ids.insert().values(
                            node=self._node, uid=uid, vm_id=vm_id, claimed_at=time.time()
                        )
                    )
                return uid
            except IntegrityError:
                continue  # another claim took this id (or this VM's row) first
        raise ResourceExhausted("could not claim a jail uid: too much contention, try again")

    async def _lowest_free(self) -> int | None:
        async with self._engine.connect() as conn:
            rows = await conn.execute(
                select(jail_ids.c.uid).where(
                    jail_ids.c.node == self._node,
                    jail_ids.c.uid >= self.first,
                    jail_ids.c.uid <= self.last,
                )
            )
            used = {int(r[0]) for r in rows}
        return next((u for u in range(self.first, self.last + 1) if u not in used), None)

    async def for_vm(self, vm_id: str) -> int | None:
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(
                    select(jail_ids.c.uid).where(
                        jail_ids.c.node == self._node, jail_ids.c.vm_id == vm_id
                    )
                )
            ).first()
        return None if row is None else int(row[0])

    async def release(self, vm_id: str) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(
                delete(jail_ids).where(jail_ids.c.node == self._node, jail_ids.c.vm_id == vm_id)
            )

    async def all(self) -> dict[str, int]:
        async with self._engine.connect() as conn:
            rows = await conn.execute(
                select(jail_ids.c.vm_id, jail_ids.c.uid).where(jail_ids.c.node == self._node)
            )
            return {str(vm): int(uid) for vm, uid in rows}

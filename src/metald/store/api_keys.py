"""The ApiKeys port on SQL (migration 0008_api_keys): rows of keys, looked up by key id.

A lookup is one SELECT by the unique index on key_id on every authenticated call: no cache,
so a revocation (or an expiry) takes effect on the next call of every connection, whichever
process made it (`metald keys revoke` writes the same database the daemon reads).
"""

from __future__ import annotations

from typing import Any

import aiosqlite
from sqlalchemy import Column, Float, Index, LargeBinary, String, Table, select, update
from sqlalchemy.exc import IntegrityError

from metald.core.apikeys import ApiKey
from metald.core.errors import AlreadyExists
from metald.core.identity import Role
from metald.store.database import Database
from metald.store.schema import metadata

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("key_id", String(32), nullable=False),
    Column("customer_id", String(128), nullable=True),
    Column("role", String(16), nullable=False),
    Column("secret_hash", LargeBinary(32), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=True),
    Column("revoked_at", Float, nullable=True),
    Column("description", String(256), nullable=False),
    Index("ux_api_keys_key_id", "key_id", unique=True),
)


_COLUMNS = tuple(c.name for c in api_keys.columns)
_BY_KEY_ID = f"SELECT {', '.join(_COLUMNS)} FROM api_keys WHERE key_id = ?"


class SqlApiKeys:
    def __init__(self, database: Database) -> None:
        self._engine = database.engine

    async def add(self, key: ApiKey) -> None:
        try:
            async with self._engine.begin() as conn:
                await conn.execute(api_keys.insert().values(**_row(key)))
        except IntegrityError:
            raise AlreadyExists(f"key id {key.key_id} exists") from None

    async def by_key_id(self, key_id: str) -> ApiKey | None:
        """On every call with a key: on SQLite straight through aiosqlite with the one
        prepared statement (SQLAlchemy's compile and result layers cost more than the
        lookup itself: bench numbers in docs/architecture.md), else through SQLAlchemy."""
        async with self._engine.connect() as conn:
            driver = (await conn.get_raw_connection()).driver_connection
            if isinstance(driver, aiosqlite.Connection):
                rows = list(await driver.execute_fetchall(_BY_KEY_ID, (key_id,)))
                return _key(dict(zip(_COLUMNS, rows[0], strict=True))) if rows else None
            result = await conn.execute(select(api_keys).where(api_keys.c.key_id == key_id))
            row = result.first()
        return None if row is None else _key(row._mapping)

    async def all(self) -> list[ApiKey]:
        query = select(api_keys).order_by(api_keys.c.created_at, api_keys.c.key_id)
        async with self._engine.connect() as conn:
            return [_key(r._mapping) for r in await conn.execute(query)]

    async def revoke(self, key_id: str, at: float) -> ApiKey | None:
        async with self._engine.begin() as conn:
            await conn.execute(
                update(api_keys)
                .where(api_keys.c.key_id == key_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=at)
            )
            result = await conn.execute(select(api_keys).where(api_keys.c.key_id == key_id))
            row = result.first()
        return None if row is None else _key(row._mapping)


def _row(key: ApiKey) -> dict[str, Any]:
    return {
        "id": key.id,
        "key_id": key.key_id,
        "customer_id": key.customer_id,
        "role": key.role.value,
        "secret_hash": key.secret_hash,
        "created_at": key.created_at,
        "expires_at": key.expires_at,
        "revoked_at": key.revoked_at,
        "description": key.description,
    }


def _key(row: Any) -> ApiKey:
    return ApiKey(
        id=row["id"],
        key_id=row["key_id"],
        customer_id=row["customer_id"],
        role=Role(row["role"]),
        secret_hash=bytes(row["secret_hash"]),
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        revoked_at=row["revoked_at"],
        description=row["description"],
    )

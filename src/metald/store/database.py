"""One database: its URL, the one SQLAlchemy engine (connection pool) for it, and its
migrations. The VM store and the address book are both built on a Database, so one
metald holds one pool per database, with one set of SQLite settings, however many tables
it uses.

Whoever makes the Database closes it (app.py, or a test); the tables' classes only borrow it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import Connection, event, select
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

_MIGRATIONS = Path(__file__).parent / "migrations"


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    # Waits for a lock (another metald, a migration) instead of failing at once.
    cur.execute("PRAGMA busy_timeout=5000")
    cur.close()


def _run_migrations(conn: Connection) -> None:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    cfg.attributes["connection"] = conn
    command.upgrade(cfg, "head")


class Database:
    def __init__(self, url: str) -> None:
        self.url = url
        self.engine: AsyncEngine = create_async_engine(url)
        if url.startswith("sqlite"):
            sync_engine: Engine = self.engine.sync_engine
            event.listen(sync_engine, "connect", _sqlite_pragmas)

    async def migrate(self) -> None:
        """Bring every table up to date (idempotent: a restarted metald runs it again)."""
        async with self.engine.begin() as conn:
            await conn.run_sync(_run_migrations)

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(select(1))

    async def close(self) -> None:
        """Close the pool's connections. Idempotent."""
        await self.engine.dispose()

"""The daemon's database, opened by a command on the daemon's host (`metald quota`, `keys`,
`audit`), and the one way those commands fail.

These commands do not call the API: they open the database the daemon uses, found through
the daemon's own settings (UNKEY_METALD_DATA_DIR or _DATABASE_URL). So they run on its
host, as its user; whoever can read and write the data directory manages quotas, keys and
the audit log, and nobody else. A default SQLite file that does not exist is refused rather
than created: it means the wrong user or environment, and a new empty database would
silently hold the operator's changes where the daemon never looks. Database errors are told
by their first line only: a URL, which may hold a password, is never printed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import typer
from rich.console import Console
from sqlalchemy.exc import SQLAlchemyError

from metald.config import ConfigError, Settings, load_settings
from metald.core.errors import MetaldError
from metald.store.database import Database

T = TypeVar("T")


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print `error: <message>` on stderr; the Exit to raise (status `code`)."""
    Console(stderr=True, highlight=False, soft_wrap=True).print(f"error: {message}")
    return typer.Exit(code)


def daemon_settings() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        raise fail(str(exc)) from None


def on_daemon_database(
    settings: Settings, work: Callable[[Database], Awaitable[T]], *, migrate: bool = True
) -> T:
    """Run `work` on the daemon's database (brought up to date first unless `migrate` is
    False: a reader that must not write); every failure is `fail`'s."""
    if not settings.database_url:
        path = Path(settings.data_dir) / "metald.db"
        if not path.exists():
            raise fail(
                f"no metald database at {path}: run this on the daemon's host, as its user, "
                "with its UNKEY_METALD_DATA_DIR (or UNKEY_METALD_DATABASE_URL)"
            )

    async def main() -> T:
        database = Database(settings.effective_database_url)
        try:
            if migrate:
                await database.migrate()
            return await work(database)
        finally:
            await database.close()

    try:
        return asyncio.run(main())
    except (MetaldError, OSError) as exc:
        raise fail(str(exc)) from None
    except SQLAlchemyError as exc:
        first = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        if "no such table" in first or "does not exist" in first:
            raise fail(
                f"the database is older than this metald ({first}): start the daemon once "
                "to bring it up to date"
            ) from None
        raise fail(f"the database cannot be used: {first}") from None

"""Jail ids in the store (real SQLite): atomic claims, one id per VM, released on delete."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from metald.core.errors import ResourceExhausted
from metald.store.database import Database
from metald.store.jail_ids import MemoryJailIds, SqlJailIds, check_range


@pytest.fixture
async def database(tmp_path: Path) -> AsyncIterator[Database]:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'metald.db'}")
    await db.migrate()
    yield db
    await db.close()


async def test_concurrent_claims_never_share_an_id_and_stop_at_the_range(
    database: Database, tmp_path: Path
) -> None:
    # Two pools on one database file: two metald processes on one host.
    other_db = Database(f"sqlite+aiosqlite:///{tmp_path / 'metald.db'}")
    try:
        pools = [
            SqlJailIds(database, 5000, 5019, node="n"),
            SqlJailIds(other_db, 5000, 5019, node="n"),
        ]
        results = await asyncio.gather(
            *(pools[i % 2].claim(f"vm-{i}") for i in range(30)), return_exceptions=True
        )
    finally:
        await other_db.close()
    ids = [r for r in results if isinstance(r, int)]
    refused = [r for r in results if isinstance(r, BaseException)]
    assert sorted(ids) == list(range(5000, 5020))
    assert len(refused) == 10
    assert all(isinstance(r, ResourceExhausted) for r in refused), refused
    assert "5000-5019" in str(refused[0])
    held = await pools[0].all()
    assert len(held) == 20 and len(set(held.values())) == 20


async def test_a_vm_keeps_its_id_until_released_then_it_is_reused(database: Database) -> None:
    pool = SqlJailIds(database, 7000, 7002, node="n")
    a = await pool.claim("a")
    b = await pool.claim("b")
    assert (a, b) == (7000, 7001)
    assert await pool.claim("a") == a  # idempotent: a booted-again VM keeps its id
    assert await pool.for_vm("b") == b
    await pool.release("a")
    await pool.release("a")  # idempotent
    assert await pool.for_vm("a") is None
    assert await pool.claim("c") == 7000
    assert await pool.all() == {"b": 7001, "c": 7000}


async def test_nodes_have_their_own_ids(database: Database) -> None:
    one, two = (
        SqlJailIds(database, 100, 100, node="one"),
        SqlJailIds(database, 100, 100, node="two"),
    )
    assert await one.claim("x") == 100
    assert await two.claim("y") == 100
    with pytest.raises(ResourceExhausted):
        await one.claim("z")
    assert await one.all() == {"x": 100}


async def test_the_memory_pool_behaves_alike() -> None:
    pool = MemoryJailIds(1, 2)
    assert [await pool.claim("a"), await pool.claim("b"), await pool.claim("a")] == [1, 2, 1]
    with pytest.raises(ResourceExhausted):
        await pool.claim("c")
    await pool.release("a")
    assert await pool.claim("c") == 1


@pytest.mark.parametrize(("first", "last"), [(0, 10), (10, 9), (1, 2**32 - 1)])
def test_bad_ranges(first: int, last: int) -> None:
    with pytest.raises(ValueError):
        check_range(first, last)

"""The pool of spare jailer helpers (jailer/spares.py) with a stand-in interpreter (a shell
that sleeps): started at idle CPU priority, raised when taken, replaced, dead ones passed
over and reaped, all ended by close(). The helpers' real work is tests/integration/
test_jailer.py's (root, namespaces)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from metald.jailer.spares import Spares

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="SCHED_OTHER back from SCHED_IDLE")


@pytest.fixture
def interpreter(tmp_path: Path) -> str:
    path = tmp_path / "python"
    path.write_text("#!/bin/sh\nexec sleep 600\n")
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def pool(interpreter: str) -> Iterator[Spares]:
    spares = Spares(2, python=interpreter)
    try:
        yield spares
    finally:
        spares.close()


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_spares_wait_at_idle_priority_and_are_raised_when_taken(pool: Spares) -> None:
    pool.fill()
    assert len(pool.pids) == 2
    assert all(os.sched_getscheduler(p) == os.SCHED_IDLE for p in pool.pids)
    first = pool.pids[0]
    helper = pool.take()
    assert helper is not None and helper.pid == first and helper.spare
    assert os.sched_getscheduler(first) == os.SCHED_OTHER
    assert len(pool.pids) == 1  # replaced only when asked (once the VMM has started)
    pool.fill()
    assert len(pool.pids) == 2 and first not in pool.pids
    helper.discard()
    assert not alive(first)


async def test_fill_soon_starts_the_replacement_on_the_next_turn(pool: Spares) -> None:
    pool.fill()
    helper = pool.take()
    assert helper is not None
    pool.fill_soon()
    assert len(pool.pids) == 1  # not inside the caller...
    await asyncio.sleep(0)
    assert len(pool.pids) == 2  # ...but right after
    helper.discard()


def test_a_dead_spare_is_reaped_and_passed_over(
    pool: Spares, caplog: pytest.LogCaptureFixture
) -> None:
    pool.fill()
    dead, living = pool.pids
    os.kill(dead, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while alive(dead):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    helper = pool.take()
    assert helper is not None and helper.pid == living
    assert "ended while waiting" in caplog.text
    assert pool.pids == []
    assert not Path(f"/proc/{dead}").exists()  # reaped, not a zombie
    helper.discard()


def test_close_ends_every_spare_and_a_closed_pool_starts_none(pool: Spares) -> None:
    pool.fill()
    pids = pool.pids
    pool.close()
    assert pool.pids == [] and not any(Path(f"/proc/{p}").exists() for p in pids)
    pool.fill()
    assert pool.pids == [] and pool.take() is None


def test_an_empty_pool_gives_nothing_and_a_negative_count_is_refused(interpreter: str) -> None:
    none = Spares(0, python=interpreter)
    assert none.take() is None and none.pids == []
    with pytest.raises(ValueError):
        Spares(-1)

"""The one undo helper: last first, every step runs, failures are reported, never twice."""

from __future__ import annotations

import asyncio
import logging

import pytest

from metald.core.undo import Undo

log = logging.getLogger("test-undo")


def test_steps_run_last_first_and_a_failing_step_does_not_stop_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    done: list[str] = []
    undo = Undo(log, "work")
    undo.add("a", done.append, "a")
    undo.add("b", lambda: 1 / 0)
    undo.add("c", done.append, "c")
    leftovers = undo.run()
    assert done == ["c", "a"]
    assert len(leftovers) == 1 and leftovers[0].startswith("b: division by zero")
    assert "work: undoing b failed" in caplog.text
    assert not undo and undo.run() == []  # each step runs once
    assert done == ["c", "a"]


def test_async_steps_are_awaited_and_plain_ones_mix_in() -> None:
    done: list[str] = []

    async def remove(what: str) -> None:
        await asyncio.sleep(0)
        done.append(what)

    async def fail() -> None:
        raise OSError(16, "busy")

    undo = Undo(log, "launch")
    undo.add("dir", remove, "dir")
    undo.add("cgroup", fail)
    undo.add("tap", done.append, "tap")
    assert asyncio.run(undo.run_async()) == ["cgroup: [Errno 16] busy"]
    assert done == ["tap", "dir"]


def test_a_coroutine_step_in_a_plain_run_is_reported_not_silently_skipped() -> None:
    async def step() -> None:
        pass

    undo = Undo(log, "network")
    undo.add("netns", step)
    leftovers = undo.run()
    assert leftovers == ["netns: netns is a coroutine: use run_async"]

"""core.readings.Reading: a value at most max_age old, one reading at a time, failures not
kept. Time is a fake clock the test moves; readings are held open with events."""

from __future__ import annotations

import asyncio

import pytest

from metald.core.readings import Reading


class Source:
    """Counts its readings; each returns the count. `hold` keeps the next ones open."""

    def __init__(self) -> None:
        self.count = 0
        self.hold: asyncio.Event | None = None
        self.started = asyncio.Event()
        self.fail: Exception | None = None

    async def read(self) -> int:
        self.count += 1
        self.started.set()
        if self.hold is not None:
            await self.hold.wait()
        if self.fail is not None:
            raise self.fail
        return self.count


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_a_reading_is_reused_until_it_is_older_than_max_age() -> None:
    source, clock = Source(), Clock()
    reading = Reading(source.read, 1.0, clock)
    assert await reading.get() == 1
    clock.now += 1.0  # exactly max_age old: still good
    assert await reading.get() == 1
    clock.now += 0.001
    assert await reading.get() == 2
    assert reading.latest == (2, clock.now)
    assert source.count == 2


async def test_callers_during_a_reading_share_it() -> None:
    source, clock = Source(), Clock()
    reading = Reading(source.read, 1.0, clock)
    source.hold = asyncio.Event()
    waiters = [asyncio.create_task(reading.get()) for _ in range(10)]
    await source.started.wait()
    source.hold.set()
    assert await asyncio.gather(*waiters) == [1] * 10
    assert source.count == 1


async def test_refresh_reads_now_and_get_then_hands_that_out() -> None:
    source, clock = Source(), Clock()
    reading = Reading(source.read, 1.0, clock)
    assert await reading.get() == 1
    assert await reading.refresh() == 2  # the collector's hook: a new one, young or not
    assert await reading.get() == 2
    assert source.count == 2


async def test_a_failed_reading_is_not_kept() -> None:
    source, clock = Source(), Clock()
    reading = Reading(source.read, 1.0, clock)
    source.fail = OSError("netlink: no such device")
    with pytest.raises(OSError, match="no such device"):
        await reading.get()
    assert reading.latest is None
    source.fail = None
    assert await reading.get() == 2


async def test_a_cancelled_caller_cancels_only_its_wait() -> None:
    source, clock = Source(), Clock()
    reading = Reading(source.read, 1.0, clock)
    source.hold = asyncio.Event()
    first = asyncio.create_task(reading.get())
    await source.started.wait()
    second = asyncio.create_task(reading.get())
    await asyncio.sleep(0)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    source.hold.set()
    assert await second == 1
    assert await reading.get() == 1  # kept
    assert source.count == 1


async def test_forget_drops_the_latest_and_the_one_under_way() -> None:
    source, clock = Source(), Clock()
    reading = Reading(source.read, 1.0, clock)
    assert await reading.get() == 1
    source.hold = asyncio.Event()
    pending = asyncio.create_task(reading.refresh())
    await asyncio.sleep(0)
    reading.forget()
    source.hold.set()
    assert await pending == 2  # its waiter still gets it
    assert reading.latest is None
    assert await reading.get() == 3


def test_max_age_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="negative"):
        Reading(Source().read, -1.0)


async def test_an_offered_reading_is_the_latest_and_served_while_young() -> None:
    now = [100.0]
    calls = 0

    async def read() -> int:
        nonlocal calls
        calls += 1
        return calls

    reading = Reading(read, 1.0, clock=lambda: now[0])
    reading.offer(42)
    assert await reading.get() == 42 and calls == 0
    now[0] += 2.0
    assert await reading.get() == 1

"""A reading taken at a bounded rate: the latest value, while it is young enough.

Reads that poll (GetVmInfo every few milliseconds from a dashboard, a load balancer's
health loop) must not cost a VMM round trip or a netlink dump each: the counters they show
move slowly and are old by the time the answer arrives anyway. So a reading (a VM's usage
from /proc and its VMM, its traffic counters from netlink) is taken at most once per
`max_age` seconds however often it is asked for, and a caller gets a value at most
`max_age` old. Callers that arrive while a reading is under way wait for that one instead
of starting their own, so a burst of calls costs one reading.

`refresh()` takes a new reading now, and `offer()` keeps one the caller took: that is
where a periodic collector (issue 9's metering, every 100 ms) hooks in, and the readers
then get its readings for free.

A reading that fails is not kept: each waiter gets the error, and the next call tries
again. The reading runs in a task of its own, so a waiter that is cancelled cancels only
its wait (the others still get the value, and it is kept).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

V = TypeVar("V")


class Reading(Generic[V]):
    def __init__(
        self,
        read: Callable[[], Awaitable[V]],
        max_age: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_age < 0:
            raise ValueError("max_age must not be negative")
        self._read = read
        self.max_age = max_age
        self._clock = clock
        self._latest: tuple[V, float] | None = None
        self._pending: asyncio.Task[V] | None = None

    @property
    def latest(self) -> tuple[V, float] | None:
        """The last reading and when it was started (clock time), if any."""
        return self._latest

    async def get(self) -> V:
        """The latest reading if it is at most max_age old, else a new one."""
        latest = self._latest
        if latest is not None and self._clock() - latest[1] <= self.max_age:
            return latest[0]
        return await self.refresh()

    async def refresh(self) -> V:
        """A reading started now, or the one already under way."""
        task = self._pending
        if task is None:
            started = self._clock()
            task = asyncio.ensure_future(self._read())
            self._pending = task
            task.add_done_callback(lambda done: self._finished(done, started))
        return await asyncio.shield(task)

    def offer(self, value: V) -> None:
        """A reading taken by the caller now, kept as the latest (a periodic collector
        that reads anyway: readers then get its readings, without a task per reading)."""
        self._latest = (value, self._clock())

    def forget(self) -> None:
        """Drop the latest reading, and the one under way once it ends (its waiters still
        get it): the next get() takes a new one."""
        self._latest = None
        self._pending = None

    def _finished(self, task: asyncio.Task[V], started: float) -> None:
        ok = not task.cancelled() and task.exception() is None  # (the error is retrieved)
        if self._pending is not task:
            return  # forgotten meanwhile
        self._pending = None
        if ok:
            # Aged from when it began: what it read is at least that old.
            self._latest = (task.result(), started)

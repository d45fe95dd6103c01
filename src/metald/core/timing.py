"""Step timers: where the time of one use case (CreateVm) goes, measured by metald itself.

metald's own share of a create must be small next to the VMM it starts (issue 8), and a
share can only be kept small if it is seen step by step: store, network, the jailer, the
VMM's start to its control socket, the control connection. The steps are in different layers
(service, backends, network), so they are collected through a context variable rather than
passed down every port: the use case opens a `StepTimes` with `collecting()`, and any code it
awaits (tasks and threads it starts inherit the context) marks its work with `step(name)`.
Outside a collection `step` does nothing but run the block. Times of a step that runs more
than once (the store) add up. Code that names its stages as it goes marks sub-steps with
`lap(name)` (each lasts until the next, or the end of its step).

Standard library only, no I/O: the use case hands the result to whoever publishes it (the
API's /metrics histogram, a debug log line).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field


@dataclass
class StepTimes:
    """The steps of one operation, in the order they first ran, in seconds."""

    started: float = field(default_factory=time.perf_counter)
    steps: dict[str, float] = field(default_factory=dict)
    total: float | None = None  # set when the collection ends

    _lap: tuple[str, float] | None = None  # the sub-step `lap` opened last, and when

    def add(self, name: str, seconds: float) -> None:
        self.steps[name] = self.steps.get(name, 0.0) + max(0.0, seconds)

    def lap(self, name: str | None) -> None:
        """End the open sub-step (if any) and start `name` (None: start none)."""
        now = time.perf_counter()
        if self._lap is not None:
            self.add(self._lap[0], now - self._lap[1])
        self._lap = None if name is None else (name, now)

    def describe(self) -> str:
        """`total 12.3 ms: store 1.0, network 2.1, ...` (ms)."""
        parts = ", ".join(f"{name} {seconds * 1000:.1f}" for name, seconds in self.steps.items())
        total = self.total if self.total is not None else time.perf_counter() - self.started
        return f"{total * 1000:.1f} ms: {parts}"


_current: ContextVar[StepTimes | None] = ContextVar("metald_step_times", default=None)


@contextmanager
def collecting() -> Iterator[StepTimes]:
    """Collect the steps run in this block (and in tasks and threads started from it)."""
    times = StepTimes()
    token = _current.set(times)
    try:
        yield times
    finally:
        times.total = time.perf_counter() - times.started
        _current.reset(token)


@contextmanager
def step(name: str) -> Iterator[None]:
    """Time the block as step `name` of the operation being collected, if any."""
    times = _current.get()
    if times is None:
        yield
        return
    started = time.perf_counter()
    try:
        yield
    finally:
        times.lap(None)  # a sub-step ends with its step at the latest
        times.add(name, time.perf_counter() - started)


def lap(name: str) -> None:
    """Start sub-step `name` of the step being timed, ending the one started before (for
    code that names its stages as it goes: the network build's steps)."""
    times = _current.get()
    if times is not None:
        times.lap(name)


def record(name: str, seconds: float) -> None:
    """Add a step measured elsewhere (by another process: the jailer helper's own steps)."""
    times = _current.get()
    if times is not None:
        times.add(name, seconds)

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

Every step (and sub-step) is also a child span of the current trace when a tracer is
installed (core/tracing.py): `step` opens one around its block, in or outside a collection
(so the steps of BootVm or DeleteVm are traced too); laps and steps measured elsewhere
become spans with explicit start and end times.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

from metald.core import tracing


@dataclass
class StepTimes:
    """The steps of one operation, in the order they first ran, in seconds."""

    started: float = field(default_factory=time.perf_counter)
    steps: dict[str, float] = field(default_factory=dict)
    total: float | None = None  # set when the collection ends

    # The sub-step `lap` opened last, and when (perf_counter, and wall clock ns for its span).
    _lap: tuple[str, float, int] | None = None

    def add(self, name: str, seconds: float) -> None:
        self.steps[name] = self.steps.get(name, 0.0) + max(0.0, seconds)

    def lap(self, name: str | None) -> None:
        """End the open sub-step (if any) and start `name` (None: start none)."""
        now = time.perf_counter()
        wall = time.time_ns() if tracing.active() is not None else 0
        if self._lap is not None:
            lap_name, started, wall_started = self._lap
            self.add(lap_name, now - started)
            if wall_started and wall:
                tracing.record(lap_name, wall_started, wall)
        self._lap = None if name is None else (name, now, wall)

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
    tracer = tracing.active()
    if times is None and tracer is None:
        yield
        return
    if times is None:
        with tracing.span(name):
            yield
        return
    started = time.perf_counter()
    with tracing.span(name):
        try:
            yield
        finally:
            times.lap(None)  # a sub-step ends with its step at the latest (and its span)
            times.add(name, time.perf_counter() - started)


def lap(name: str) -> None:
    """Start sub-step `name` of the step being timed, ending the one started before (for
    code that names its stages as it goes: the network build's steps)."""
    times = _current.get()
    if times is not None:
        times.lap(name)


def record(name: str, seconds: float) -> None:
    """Add a step measured elsewhere that ended just now (a wait timed by hand)."""
    record_run([(name, seconds)])


def record_run(steps: Sequence[tuple[str, float]]) -> None:
    """Add steps measured elsewhere that ran one after another and ended just now (another
    process's, reported when it finished: the jailer helper's own steps); their spans are
    laid back to back ending now."""
    times = _current.get()
    if times is not None:
        for name, seconds in steps:
            times.add(name, seconds)
    if tracing.active() is not None:
        end = time.time_ns()
        start = end - sum(int(max(0.0, seconds) * 1e9) for _, seconds in steps)
        for name, seconds in steps:
            stop = start + int(max(0.0, seconds) * 1e9)
            tracing.record(name, start, stop)
            start = stop

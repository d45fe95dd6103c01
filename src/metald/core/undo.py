"""Undoing what a use case made when a later step fails: the one undo helper of metald.

The service (a failed CreateVm), the network manager (a failed per-VM set-up) and the jailer
(a helper that failed half-way) all make things step by step and must leave nothing behind
when a step fails. Each registers the undo of a step once the step has made something (or
before a step that may make something half-way, when its undo is harmless on nothing), and
on failure runs them, last first. Every undo step runs even when an earlier one fails: undo
removes as much as it can, logs what it could not remove and returns it, and orphan removal
at the next start takes the rest. A step may be a plain function or a coroutine function;
``run`` takes plain ones (threads doing netlink work), ``run_async`` both.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class _Step:
    what: str
    action: Callable[..., object]
    args: tuple[object, ...]


@dataclass
class Undo:
    """The undo steps of one piece of work; `context` starts every log line."""

    log: logging.Logger
    context: str
    _steps: list[_Step] = field(default_factory=list)

    def add(self, what: str, action: Callable[..., object], *args: object) -> None:
        self._steps.append(_Step(what, action, args))

    def __bool__(self) -> bool:
        return bool(self._steps)

    def _failed(self, step: _Step, exc: Exception) -> str:
        self.log.error("%s: undoing %s failed: %s", self.context, step.what, exc, exc_info=exc)
        return f"{step.what}: {exc}"

    def _take(self) -> list[_Step]:
        steps, self._steps = self._steps[::-1], []
        return steps

    def run(self) -> list[str]:
        """Run the (plain) steps last first, once; what could not be undone."""
        leftovers = []
        for step in self._take():
            try:
                result = step.action(*step.args)
                if inspect.iscoroutine(result):
                    result.close()  # never started: nothing of it ran
                    raise TypeError(f"{step.what} is a coroutine: use run_async")
            except Exception as exc:
                leftovers.append(self._failed(step, exc))
        return leftovers

    async def run_async(self) -> list[str]:
        """Run the steps last first, once, awaiting those that are coroutines."""
        leftovers = []
        for step in self._take():
            try:
                result = step.action(*step.args)
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:
                leftovers.append(self._failed(step, exc))
        return leftovers

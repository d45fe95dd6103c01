"""Failure injection shared by the fakes: make a named method raise, or hold it at a gate.

A fake calls ``await self.faults.enter("create")`` (or ``check`` in a plain method) at the top
of each method, after recording the call and before acting: an injected error is raised
before anything changes, as the ports promise ("leaves nothing behind if it fails"); a gate
holds the call there until the test releases it or cancels the caller, which is how a test
cancels an operation half-way without sleeping.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field


@dataclass
class Gate:
    """A method held open: ``entered`` is set when a call arrives, ``release()`` lets it on."""

    entered: asyncio.Event = field(default_factory=asyncio.Event)
    opened: asyncio.Event = field(default_factory=asyncio.Event)

    def release(self) -> None:
        self.opened.set()


class Faults:
    def __init__(self) -> None:
        self._errors: dict[str, list[tuple[BaseException, int | None]]] = {}
        self._gates: dict[str, Gate] = {}

    def fail(self, method: str, error: BaseException, *, times: int | None = 1) -> None:
        """The next `times` calls of `method` raise `error` (None: every call from now on)."""
        self._errors.setdefault(method, []).append((error, times))

    def clear(self, method: str | None = None) -> None:
        if method is None:
            self._errors.clear()
            self._gates.clear()
        else:
            self._errors.pop(method, None)
            self._gates.pop(method, None)

    def gate(self, method: str) -> Gate:
        """Hold every later call of `method` until the gate is released (or the call cancelled)."""
        gate = self._gates[method] = Gate()
        return gate

    def check(self, method: str) -> None:
        queue = self._errors.get(method)
        if not queue:
            return
        error, times = queue[0]
        if times is not None:
            if times <= 1:
                queue.pop(0)
            else:
                queue[0] = (error, times - 1)
        raise error

    async def enter(self, method: str) -> None:
        gate = self._gates.get(method)
        if gate is not None:
            gate.entered.set()
            await gate.opened.wait()
        self.check(method)

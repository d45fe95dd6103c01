"""Running blocking netlink work from the event loop.

Every netlink request runs in a worker thread. A thread cannot be stopped, so a cancelled
caller still waits for its thread before the cancellation goes on: an undo never races the
work it undoes, and a teardown, once begun, runs to its end.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def blocking(fn: Callable[..., T], *args: Any) -> T:
    """Run fn in a worker thread. If the caller is cancelled meanwhile, wait for the thread
    to finish anyway (it cannot be stopped) before letting the cancellation through."""
    fut = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        while not fut.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({fut})
        raise


async def uncancellable(aw: Awaitable[T]) -> T:
    """Await aw to its end even if the caller is cancelled meanwhile."""
    fut = asyncio.ensure_future(aw)
    while True:
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            if fut.done():
                return fut.result()

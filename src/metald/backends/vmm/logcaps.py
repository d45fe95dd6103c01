"""Keeping every VMM's console log and stderr file bounded (a flooding guest cannot fill the
disk).

Choice: the VMM keeps writing its files (QEMU's file chardev, Firecracker's serial on its
stdout, both VMMs' stderr), with O_APPEND, and metald cuts each file back to its newest half
once it passes its cap, checking every `interval` seconds (host/logtrim.py). Why not a
FIFO or pty read by metald: a console that blocks while metald is away (restarting) would
stall the guest's printk; a cut file never does. Between two checks a file can grow by what
the guest writes in one interval; RLIMIT_FSIZE on the VMM (the jailer; SIGXFSZ ignored)
bounds every file strictly even while metald is down: writes past it fail and are lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from metald.host.logtrim import NotALog, trim_log

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CappedFile:
    path: Path
    max_bytes: int
    owner: int | None  # the uid the file must belong to (the VMM's files); None: any


class LogCapper:
    """Every `interval` seconds, trims the files `files()` names (live VMMs' logs)."""

    def __init__(self, files: Callable[[], Iterable[CappedFile]], interval: float) -> None:
        self._files = files
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self._warned: set[Path] = set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def check_once(self) -> int:
        """Trim what is over its cap now; how many bytes went."""
        files = list(self._files())
        return await asyncio.to_thread(self._trim_all, files)

    def _trim_all(self, files: list[CappedFile]) -> int:
        dropped = 0
        for f in files:
            try:
                dropped += trim_log(f.path, f.max_bytes, f.owner)
            except NotALog as e:
                if f.path not in self._warned:  # once per path: the VMM may keep at it
                    self._warned.add(f.path)
                    log.warning("not trimming %s: %s", f.path, e.strerror)
            except OSError as e:
                log.warning("cannot trim %s: %s", f.path, e.strerror or e)
        return dropped

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check_once()
            except Exception:  # never let the loop die: the next round tries again
                log.exception("log trimming failed")

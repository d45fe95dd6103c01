"""Per-VM locks: operations on one VM run one at a time, different VMs in parallel."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class VmLocks:
    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._users: dict[str, int] = {}

    def busy(self, vm_id: str) -> bool:
        """Whether someone holds or waits for the VM's lock (a hold of a VM that is not busy
        is taken without waiting: nothing runs in between)."""
        return vm_id in self._locks

    @asynccontextmanager
    async def hold(self, vm_id: str) -> AsyncIterator[None]:
        lock = self._locks.setdefault(vm_id, asyncio.Lock())
        self._users[vm_id] = self._users.get(vm_id, 0) + 1
        try:
            async with lock:
                yield
        finally:
            # Forget the lock once nobody waits on it, so deleted VMs cost no memory.
            self._users[vm_id] -= 1
            if not self._users[vm_id]:
                del self._users[vm_id]
                del self._locks[vm_id]

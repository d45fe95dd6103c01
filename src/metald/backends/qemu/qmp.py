"""The control connection to one QEMU: QMP over its socket (the qemu.qmp library).

QEMU starts with -S (prelaunch, vCPUs stopped); `cont` runs them, `stop`/`cont` pause and
resume, `system_reset` is a hard reset in place, `send-key ctrl+alt+delete` asks the default
guest to stop (its init traps the key combination: notes/guests-on-this-machine.md). Only
QEMU's SHUTDOWN event is kept: it says why QEMU is about to exit, read after it has.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

from qemu.qmp import QMPClient

from metald.backends.vmm.driver import IoStats, LaunchContext
from metald.core.errors import BackendError
from metald.core.states import VmState

# QMP runstates -> our states. Anything else (internal-error, guest-panicked, shutdown...)
# is a VMM that cannot carry on and is not adopted.
RUNSTATES: dict[str, VmState] = {
    "prelaunch": VmState.CREATED,
    "running": VmState.RUNNING,
    "paused": VmState.PAUSED,
    "suspended": VmState.PAUSED,
    "io-error": VmState.PAUSED,
    "watchdog": VmState.PAUSED,
    "debug": VmState.PAUSED,
}

_CTRL_ALT_DEL = {
    "keys": [
        {"type": "qcode", "data": "ctrl"},
        {"type": "qcode", "data": "alt"},
        {"type": "qcode", "data": "delete"},
    ]
}


class QmpControl:
    """VmmControl for QEMU."""

    def __init__(self, vm_id: str, qmp: QMPClient, timeout: float) -> None:
        self.vm_id = vm_id
        self._qmp = qmp
        self._timeout = timeout
        self._event: str | None = None
        self._stopping = False

    @classmethod
    async def connect(cls, vm_id: str, socket_path: str, timeout: float) -> QmpControl:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        qmp = QMPClient(vm_id)
        qmp.events.names = {"SHUTDOWN"}
        try:
            await asyncio.wait_for(loop.sock_connect(sock, socket_path), timeout)
            await asyncio.wait_for(qmp.connect(sock), timeout)
        except Exception as e:
            with contextlib.suppress(Exception):
                await qmp.disconnect()
            sock.close()
            raise BackendError(f"VM {vm_id}: QMP did not answer: {e}") from e
        return cls(vm_id, qmp, timeout)

    async def _run(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        try:
            return await asyncio.wait_for(self._qmp.execute(command, arguments), self._timeout)
        except TimeoutError:
            raise BackendError(
                f"VM {self.vm_id}: QMP {command} got no answer in {self._timeout:g} s"
            ) from None
        except Exception as e:
            raise BackendError(f"VM {self.vm_id}: QMP {command} failed: {e}") from e

    async def status(self) -> str:
        """QEMU's own run state ("prelaunch", "running", "paused", ...)."""
        result = await self._run("query-status")
        if not isinstance(result, dict) or not isinstance(result.get("status"), str):
            raise BackendError(f"VM {self.vm_id}: unexpected query-status answer")
        return str(result["status"])

    async def prepare(self, launch: LaunchContext) -> None:
        """Everything is on QEMU's command line: check it waits in prelaunch."""
        status = await self.status()
        if status != "prelaunch":
            raise BackendError(f"QEMU started in state {status!r}, not prelaunch")

    async def start_vcpus(self) -> None:
        await self._run("cont")

    async def pause(self) -> None:
        await self._run("stop")

    async def resume(self) -> None:
        await self._run("cont")

    async def reset(self) -> None:
        await self._run("system_reset")

    async def ask_guest_to_stop(self) -> None:
        if not self._stopping:
            # A guest whose kernel has its keyboard but whose init has not taken the keys
            # over yet restarts on them; under TCG on a busy host that phase outlasts the
            # repeats, and each press restarted the boot until the shutdown timed out. While
            # a stop is asked for, a guest reset ends QEMU instead: the guest's answer.
            await self._run("set-action", {"reboot": "shutdown"})
            self._stopping = True
        await self._run("send-key", _CTRL_ALT_DEL)

    async def stop_abandoned(self) -> None:
        if self._stopping:
            await self._run("set-action", {"reboot": "reset"})
            self._stopping = False

    async def runstate(self) -> VmState | None:
        return RUNSTATES.get(await self.status())

    async def io_stats(self) -> IoStats:
        stats = await self._run("query-blockstats")
        rd_bytes = wr_bytes = rd_ops = wr_ops = 0
        if isinstance(stats, list):
            for device in stats:
                s = device.get("stats", {}) if isinstance(device, dict) else {}
                rd_bytes += int(s.get("rd_bytes", 0))
                wr_bytes += int(s.get("wr_bytes", 0))
                rd_ops += int(s.get("rd_operations", 0))
                wr_ops += int(s.get("wr_operations", 0))
        return IoStats(
            disk_read_bytes=rd_bytes,
            disk_write_bytes=wr_bytes,
            disk_read_ops=rd_ops,
            disk_write_ops=wr_ops,
        )

    def exit_event(self) -> str | None:
        return self._event

    async def close(self) -> None:
        # Disconnecting reads what QEMU sent before it went, SHUTDOWN event included.
        with contextlib.suppress(Exception):
            await self._qmp.disconnect()
        history = self._qmp.events.history
        if history:
            event: Any = history[-1]
            data = event.get("data") or {}
            self._event = str(data.get("reason", "")) or "unknown"

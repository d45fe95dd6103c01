"""One VMM process of a VM as the runtime tracks it, and the table of them.

The record is what every part of the runtime works on: launch makes one, supervision watches
it and handles its exit, adoption makes one for a VMM an earlier metald left, the Backend
verbs talk to it through its control. A VM started again after a shutdown gets a new record
(a new process). The record also knows what touches only itself: its control connection,
process.json, its boot time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

from metald.backends.vmm.driver import IoStats, VmmControl
from metald.backends.vmm.layout import VmLayout
from metald.backends.vmm.records import ProcessRecord, save_process
from metald.core.errors import BackendError
from metald.core.models import ProcessIdentity, VmUsage
from metald.core.readings import Reading
from metald.host.process import ProcessWatch, ProcFiles
from metald.jailer.spec import JailSpec


class StartFailed(Exception):
    """A VMM could not be started or reached; the caller words the BackendError."""


@dataclass
class VmmProcess:
    """One VMM process of a VM (a VM started again after a shutdown gets a new one)."""

    vm_id: str
    layout: VmLayout
    identity: ProcessIdentity
    accelerator: str
    control_socket: Path  # its host path
    owner_uid: int  # the user a genuine control socket belongs to
    host_run_dir: Path
    jail: JailSpec | None = None  # the jail it runs in (None: run directly)
    watch: ProcessWatch | None = None
    control: VmmControl | None = None
    socket_fd: int | None = None  # O_PATH of the checked control socket, while connected
    booted_at: float | None = None
    starting: bool = True  # exits while starting are reported by create/boot, not the callback
    expecting_exit: bool = False
    exit_reason: str | None = None
    exit_by_guest: bool = False
    exit_task: asyncio.Task[None] | None = None
    last_cpu_sample: tuple[int, float] | None = None
    vcpu_tids: tuple[int, ...] | None = None  # its vCPU threads (usage.py), found on first use
    last_io: tuple[IoStats, float] | None = None  # its last disk counters, when (monotonic)
    io_refresh: asyncio.Task[None] | None = None  # a refresh of last_io under way (usage.py)
    proc_files: ProcFiles | None = None  # its /proc files, kept open while watched (usage.py)
    usage: Reading[VmUsage] | None = None  # its latest usage (usage.py), made on first use
    info: dict[str, str] | None = None  # backend_info while it runs (fixed for its life)

    @property
    def alive(self) -> bool:
        return self.watch is not None and not self.watch.exited

    def connected_control(self) -> VmmControl:
        if self.control is None:
            raise BackendError(f"VM {self.vm_id} has no control connection")
        return self.control

    def save_record(self, *, sync: bool = True) -> None:
        """process.json: found again after a metald restart (`sync=False`: not flushed to
        disk yet)."""
        save_process(
            self.layout,
            ProcessRecord(
                pid=self.identity.pid,
                start_time=self.identity.start_time,
                accelerator=self.accelerator,
                booted_at=self.booted_at,
            ),
            sync=sync,
        )

    def mark_booted(self) -> None:
        """Its vCPUs have just been started."""
        self.booted_at = time.time()
        self.last_cpu_sample = None
        if self.usage is not None:
            self.usage.forget()  # its uptime starts now
        self.save_record()

    async def disconnect(self) -> None:
        """Drop the control connection and the socket it was checked through (the control
        object stays, for its exit_event), and its open /proc files."""
        if self.proc_files is not None:
            self.proc_files.close()
            self.proc_files = None
        if self.control is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.control.close(), 2.0)
        if self.socket_fd is not None:
            os.close(self.socket_fd)
            self.socket_fd = None


# The VMM processes the runtime knows, by VM id: one table, owned by the runtime and shared
# by its parts (launch and adoption add to it; supervision and the verbs read it).
VmmTable = dict[str, VmmProcess]

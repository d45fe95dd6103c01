"""The per-VM JSON files the runtime keeps (spec.json, process.json), read and written one
way: pydantic over the domain's dataclasses, written atomically.

jail.json is the JailSpec's own JSON (JailSpec.to_json/from_json) because that is the wire
format the jailer helper reads, and the helper is standard-library only.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from metald.backends.vmm.layout import VmLayout
from metald.core.errors import BackendError
from metald.core.models import LaunchSpec, ProcessIdentity
from metald.host.files import sync_file, write_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProcessRecord:
    """The VMM process a VM has now (process.json): found again after a metald restart."""

    pid: int
    start_time: int
    accelerator: str = ""  # "" in a record that names only the process
    booted_at: float | None = None  # when its vCPUs were last started (wall clock)

    @property
    def identity(self) -> ProcessIdentity:
        return ProcessIdentity(self.pid, self.start_time)


_SPEC = TypeAdapter(LaunchSpec)
_PROCESS = TypeAdapter(ProcessRecord)


def save_spec(layout: VmLayout, spec: LaunchSpec, *, sync: bool = True) -> None:
    """`sync=False`: not flushed to disk yet (host.files.sync_file does, later)."""
    write_atomic(layout.spec_file, _SPEC.dump_json(spec, indent=2).decode(), sync=sync)


def sync_in_background(path: Path) -> asyncio.Future[None]:
    """Flush a record written with sync=False to disk in a worker thread, while the launch
    goes on (the VMM's start takes far longer than an fsync); await the future before the
    create answers. A failure nobody awaited (the create failed, the file went) is logged."""
    future = asyncio.ensure_future(asyncio.to_thread(sync_file, path))

    def done(f: asyncio.Future[None]) -> None:
        if not f.cancelled() and f.exception() is not None:
            log.debug("%s not flushed: %s", path, f.exception())

    future.add_done_callback(done)
    return future


def load_spec(layout: VmLayout) -> LaunchSpec:
    """The saved launch spec; BackendError saying what to do when there is none."""
    vm_id = layout.vm_id
    try:
        text = layout.spec_file.read_bytes()
    except FileNotFoundError:
        raise BackendError(
            f"VM {vm_id} has no saved launch spec on this host; delete and recreate it"
        ) from None
    try:
        return _SPEC.validate_json(text)
    except ValidationError as e:
        raise BackendError(
            f"VM {vm_id} has an unreadable launch spec: {e.error_count()} errors"
        ) from None


def save_process(layout: VmLayout, record: ProcessRecord, *, sync: bool = True) -> None:
    write_atomic(layout.process_file, _PROCESS.dump_json(record).decode(), sync=sync)


def load_process(layout: VmLayout) -> ProcessRecord | None:
    """The recorded VMM process; None when there is none or the file is unusable. A record
    needs only pid and start time: whatever process it names is checked before anything is
    done to it (or to the directory it is in)."""
    try:
        return _PROCESS.validate_json(layout.process_file.read_bytes())
    except (OSError, ValidationError):
        return None


def remove_process(layout: VmLayout) -> None:
    Path(layout.process_file).unlink(missing_ok=True)

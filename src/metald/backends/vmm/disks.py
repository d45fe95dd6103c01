"""Per-VM copies of writable disks: reflinked where the filesystem can, else sparse, so a
VM's root disk costs what the guest writes, not the image size. Read-only disks are shared.

The source is opened once, with no symlink anywhere on its path (metald.host.files), and
that open file is what `cp` copies (it is handed the descriptor as /dev/fd/N): a name
swapped in the store while the copy starts changes nothing. (The asset store hands out
pins, which nobody but the store writes; this holds for any path a spec names.)"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import stat
from pathlib import Path

from metald.backends.vmm.layout import VmLayout
from metald.core.errors import BackendError
from metald.core.models import LaunchSpec
from metald.host import files


async def copy_writable_disks(spec: LaunchSpec, layout: VmLayout) -> None:
    """Copy each writable disk to the VM directory's disk<N>.img (N as plan_drives numbers
    them). A TaskGroup cancels the other copies when one fails."""
    disks = sorted(spec.disks, key=lambda d: not d.is_root_device)
    try:
        async with asyncio.TaskGroup() as group:
            for index, disk in enumerate(disks):
                if not disk.read_only:
                    group.create_task(sparse_copy(disk.path, layout.disk_copy(index)))
    except ExceptionGroup as group_error:
        raise group_error.exceptions[0] from None


async def sparse_copy(source: Path, dest: Path) -> None:
    try:
        fd = files.open_no_symlinks(str(source))
    except OSError as e:
        why = "a symbolic link on its path" if e.errno == errno.ELOOP else e.strerror
        raise BackendError(f"could not copy disk {source.name}: {why}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BackendError(f"could not copy disk {source.name}: not a regular file")
        proc = await asyncio.create_subprocess_exec(
            "cp",
            "--reflink=auto",
            "--sparse=always",
            "--",
            f"/dev/fd/{fd}",
            str(dest),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            pass_fds=(fd,),
        )
    finally:
        os.close(fd)
    try:
        _, err = await proc.communicate()
    except BaseException:
        # Cancelled (another disk failed, or the caller gave up): no cp may outlive us.
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        message = err.decode(errors="replace").strip().splitlines()
        raise BackendError(
            f"could not copy disk {source.name}: {message[-1] if message else 'cp failed'}"
        )
    await asyncio.to_thread(os.chmod, dest, 0o600)

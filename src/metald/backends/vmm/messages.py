"""What a caller is told when a VMM fails: host directories stripped from the message (they
say nothing to a client and reveal the host's layout), and the VMM's own first error line,
which says most about a VMM that ended by itself (bad kernel, missing file, ...)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from metald.backends.vmm.context import VmmContext
from metald.backends.vmm.layout import VmLayout
from metald.core.models import LaunchSpec


def clean_message(ctx: VmmContext, message: str, spec: LaunchSpec, layout: VmLayout) -> str:
    """Drop host directory prefixes from a message (file names are kept)."""
    dirs: set[str] = {str(layout.dir), str(ctx.vm_root)}
    if ctx.jail is not None:
        jail_dir = ctx.jail.backend_dir(ctx.name) / spec.vm_id
        dirs |= {str(jail_dir / "root"), str(jail_dir), str(ctx.jail.chroot_base)}
    for path in _spec_paths(spec):
        dirs.add(str(path.parent))
    for d in sorted(dirs, key=len, reverse=True):
        if d and d != "/":
            message = message.replace(d + "/", "").replace(d, "")
    return message


def first_stderr_line(path: Path, binary: str) -> str:
    """The first meaningful line the VMM wrote to stderr (warnings skipped if there is
    more), without its "<program>: " prefix."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read(64 * 1024)
    except OSError:
        return ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "warning:" not in ln.lower()]
    line = (errors or lines or [""])[0]
    prefix = os.path.basename(binary) + ": "
    return line[len(prefix) :] if line.startswith(prefix) else line


def _spec_paths(spec: LaunchSpec) -> Iterable[Path]:
    yield spec.kernel
    if spec.initrd is not None:
        yield spec.initrd
    for disk in spec.disks:
        yield disk.path

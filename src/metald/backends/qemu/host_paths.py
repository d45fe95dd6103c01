"""What a jailed QEMU needs from the host: its binary, libraries (its loadable modules live in
<libdir>/qemu), loader and firmware, bind-mounted read-only into each jail."""

from __future__ import annotations

import functools
import os

from metald.jailer.host import dynamic_binary_paths

QEMU_DATA_DIR = "/usr/share/qemu"


def firmware_dirs(data_dir: str = QEMU_DATA_DIR) -> list[str]:
    """QEMU's data directory and every directory its symlinks point into (Debian links
    firmware from seabios, ipxe, ovmf... packages)."""
    if not os.path.isdir(data_dir):
        return []
    dirs = {data_dir}
    real_data = os.path.realpath(data_dir)
    for top, subdirs, files in os.walk(data_dir):
        for name in files + subdirs:
            entry = os.path.join(top, name)
            if not os.path.islink(entry):
                continue
            target = os.path.realpath(entry)
            if not os.path.exists(target) or target.startswith(real_data + "/"):
                continue
            dirs.add(target if os.path.isdir(target) else os.path.dirname(target))
    return sorted(dirs)


@functools.lru_cache(maxsize=8)
def qemu_host_paths(binary: str = "qemu-system-x86_64") -> tuple[str, ...]:
    """Read-only host paths a jailed QEMU needs: its binary, libraries (its loadable modules
    live in <libdir>/qemu), loader and firmware."""
    paths = dynamic_binary_paths(binary) + firmware_dirs()
    return tuple(dict.fromkeys(paths))

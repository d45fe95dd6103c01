"""What a VMM needs from the host inside its jail: computed once at start-up (blocking)."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess

from metald.jailer.spec import DEFAULT_DEVICES, DeviceNode

_LDD_ARROW = re.compile(r"=>\s+(/\S+)\s+\(")
_LDD_PLAIN = re.compile(r"^\s*(/\S+)\s+\(")
QEMU_DATA_DIR = "/usr/share/qemu"


def parse_ldd(output: str) -> tuple[list[str], list[str]]:
    """`ldd` output: (library paths, loader paths)."""
    libraries, loaders = [], []
    for line in output.splitlines():
        m = _LDD_ARROW.search(line)
        if m:
            libraries.append(m.group(1))
            continue
        m = _LDD_PLAIN.match(line)
        if m:
            loaders.append(m.group(1))
    return libraries, loaders


def find_binary(binary: str) -> str:
    path = binary if "/" in binary else shutil.which(binary)
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(f"{binary} not found")
    return os.path.abspath(path)


def dynamic_binary_paths(binary: str) -> list[str]:
    """The binary, the directories of its shared libraries and its loader (host paths, as
    the loader looks them up: symlinks such as /lib -> usr/lib are kept)."""
    path = find_binary(binary)
    result = subprocess.run(
        ["ldd", path], capture_output=True, text=True, check=False, env={"LC_ALL": "C"}
    )
    paths = [path]
    if result.returncode == 0:  # a static binary: "not a dynamic executable", status 1
        libraries, loaders = parse_ldd(result.stdout)
        paths += sorted({os.path.dirname(lib) for lib in libraries}) + loaders
    return paths


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


def vmm_devices(*, kvm: bool, tap: bool) -> tuple[DeviceNode, ...]:
    """The device nodes a VMM needs: /dev/null and /dev/urandom always, /dev/kvm under KVM,
    /dev/net/tun for a TAP."""
    devices = list(DEFAULT_DEVICES)
    if kvm:
        devices.append(DeviceNode("/dev/kvm"))
    if tap:
        devices.append(DeviceNode("/dev/net/tun"))
    return tuple(devices)

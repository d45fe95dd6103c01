"""What any VMM needs from the host inside its jail: its binary's shared libraries and
loader, and device nodes. Computed once at start-up (blocking)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

from metald.jailer.spec import DEFAULT_DEVICES, DeviceNode

_LDD_ARROW = re.compile(r"=>\s+(/\S+)\s+\(")
_LDD_PLAIN = re.compile(r"^\s*(/\S+)\s+\(")


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


def vmm_devices(*, kvm: bool, tap: bool) -> tuple[DeviceNode, ...]:
    """The device nodes a VMM needs: /dev/null and /dev/urandom always, /dev/kvm under KVM,
    /dev/net/tun for a TAP."""
    devices = list(DEFAULT_DEVICES)
    if kvm:
        devices.append(DeviceNode("/dev/kvm"))
    if tap:
        devices.append(DeviceNode("/dev/net/tun"))
    return tuple(devices)

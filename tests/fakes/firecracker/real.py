"""A real Firecracker for the tests that can use one without a working KVM guest.

WHY: Firecracker's API and its pre-boot configuration run on any Linux host, and it takes
InstanceStart even where nested KVM cannot run the guest (its vCPU threads start, the guest
gets nowhere): so whether a real Firecracker accepts every request the driver sends can be
checked here, whenever one is on PATH. `make test` never needs one: without it those tests
skip, saying why. Not the stand-in: a script named `firecracker` (the stand-in's launcher)
does not count.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import pytest


def real_firecracker_binary() -> str:
    """The path of a real `firecracker` on PATH (an ELF executable); the test skips without."""
    path = shutil.which("firecracker")
    if path is None:
        pytest.skip("no real `firecracker` on PATH (its API needs no working KVM guest)")
    with open(path, "rb") as f:
        if f.read(4) != b"\x7fELF":
            pytest.skip(f"{path} is not a Firecracker binary (a script)")
    return path


def thread_status(pid: int) -> dict[str, dict[str, str]]:
    """/proc status fields of each thread of `pid`, by thread name: Firecracker names its
    threads (firecracker, fc_api, fc_vcpu 0, ...) and gives each its own seccomp filter."""
    threads: dict[str, dict[str, str]] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError):
            text = Path(f"/proc/{pid}/task/{tid}/status").read_text()
            fields = dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)
            threads[fields["Name"].strip()] = {k: v.strip() for k, v in fields.items()}
    return threads

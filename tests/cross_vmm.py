"""What a VMM that escaped its jail could try against another VMM, for the isolation tests
of the jailer (tests/integration/test_jailer.py) and of the daemon (tests/e2e/
test_vmm_isolation.py): signal, ptrace, read its files, its environment and its root, as a
process with the attacker's ids outside any jail."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from pathlib import Path

SYSTEM_PYTHON = "/usr/bin/python3"

ATTACKER = r"""
import ctypes, json, os, signal, sys
victim, fd = int(sys.argv[1]), int(sys.argv[2])
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
def attempt(action):
    try:
        action()
        return "ok"
    except OSError as e:
        return os.strerror(e.errno)
def ptrace():
    if libc.ptrace(16, victim, None, None) != 0:  # PTRACE_ATTACH
        raise OSError(ctypes.get_errno(), "ptrace")
    os.waitpid(victim, getattr(os, "__WALL", 0x40000000))
    libc.ptrace(17, victim, None, None)  # PTRACE_DETACH
def read_file():
    with open(f"/proc/self/fd/{fd}", "rb") as f:
        f.read()
def read_environ():
    with open(f"/proc/{victim}/environ", "rb") as f:
        f.read()
print(json.dumps({
    "uid": os.getuid(),
    "signal": attempt(lambda: os.kill(victim, 0)),
    "ptrace": attempt(ptrace),
    "file": attempt(read_file),
    "environ": attempt(read_environ),
    "root": attempt(lambda: os.listdir(f"/proc/{victim}/root/run")),
}))
"""


def attack(as_ids: tuple[int, int], victim_pid: int, victim_file: Path) -> dict[str, object]:
    """What a process running as `as_ids` (outside any jail: a VMM that escaped its mount and
    PID namespaces but kept its ids) can do to the victim VMM and a file of its jail."""
    fd = os.open(victim_file, os.O_PATH | os.O_CLOEXEC)  # reaches the inode past the jail dir
    try:
        out = subprocess.run(
            # The system's interpreter: the suite's may be under /root, closed to other ids.
            [SYSTEM_PYTHON, "-I", "-c", ATTACKER, str(victim_pid), str(fd)],
            cwd="/",
            user=as_ids[0],
            group=as_ids[1],
            extra_groups=[],
            pass_fds=(fd,),
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
    finally:
        os.close(fd)
    result: dict[str, object] = json.loads(out)
    return result


def pid_namespace_members(pid: int) -> list[int]:
    """Host pids of every process in the PID namespace `pid` is in."""
    want = os.stat(f"/proc/{pid}/ns/pid").st_ino
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(entry / "ns/pid").st_ino == want:
                    found.append(int(entry.name))
    return sorted(found)

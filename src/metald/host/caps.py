"""Linux capabilities of this process, by name: what metald checks before it relies on them.

metald runs as root, or (contrib/systemd/metald.service) as its own user with exactly the
capabilities its work needs, given as ambient capabilities. "Am I root?" is then the wrong
question; "do I hold these?" is the right one. The effective set is read from
/proc/self/status (CapEff), so nothing here needs libcap.

Standard library only.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

# linux/capability.h
NAMES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
    "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW",
    "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
    "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ",
    "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
)  # fmt: skip
NUMBERS = {name: number for number, name in enumerate(NAMES)}


def effective(status: Path = Path("/proc/self/status")) -> frozenset[str]:
    """The names of the capabilities this process holds in its effective set."""
    for line in status.read_text().splitlines():
        if line.startswith("CapEff:"):
            mask = int(line.split()[1], 16)
            return frozenset(n for n, i in NUMBERS.items() if mask >> i & 1)
    raise OSError(f"{status} has no CapEff line")


def missing(needed: Iterable[str]) -> list[str]:
    """Which of `needed` this process lacks (none as root with a full set, the usual root)."""
    held = effective()
    return [name for name in needed if name not in held]


def privileged(needed: Iterable[str]) -> bool:
    """Root, or a process that holds every capability of `needed`."""
    return os.geteuid() == 0 or not missing(needed)

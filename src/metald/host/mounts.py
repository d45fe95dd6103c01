"""The mount table of a process (/proc/<pid>/mountinfo, proc(5)), parsed once here.

The jailer needs it to find the cgroup v2 hierarchy and to refuse removing a jail that still
has mount points in it; the named network namespaces need each mount's propagation (shared
peer group, master) to know in which mount namespace a name outlives metald.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_OCTAL = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class MountEntry:
    mount_point: str
    root: str
    fstype: str
    options: str
    # Propagation (the optional fields): the shared peer group ids, the master group ids.
    shared: frozenset[str] = frozenset()
    master: frozenset[str] = frozenset()


def _unescape(field: str) -> str:
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[MountEntry]:
    """Every well-formed line of a mountinfo text, in order (later mounts last)."""
    entries = []
    for line in text.splitlines():
        fields = line.split()
        try:
            sep = fields.index("-", 6)
        except ValueError:
            continue
        if len(fields) < sep + 2:
            continue
        optional = fields[6:sep]
        entries.append(
            MountEntry(
                mount_point=_unescape(fields[4]),
                root=_unescape(fields[3]),
                fstype=fields[sep + 1],
                options=fields[5],
                shared=frozenset(f[7:] for f in optional if f.startswith("shared:")),
                master=frozenset(f[7:] for f in optional if f.startswith("master:")),
            )
        )
    return entries


def read_mountinfo(pid: str | int = "self") -> list[MountEntry]:
    with open(f"/proc/{pid}/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        return parse_mountinfo(f.read())


def mounts_under(path: Path, entries: list[MountEntry] | None = None) -> list[str]:
    """Mount points at or below `path` (in this process's mount namespace)."""
    prefix = str(path).rstrip("/")
    found = []
    for entry in read_mountinfo() if entries is None else entries:
        if entry.mount_point == prefix or entry.mount_point.startswith(prefix + "/"):
            found.append(entry.mount_point)
    return found


def mount_holding(path: Path, entries: list[MountEntry]) -> MountEntry | None:
    """The mount that holds `path`: the deepest mount point on the path, the last one
    mounted there."""
    target = str(path)
    best: MountEntry | None = None
    for entry in entries:
        point = entry.mount_point
        on_path = target == point or target.startswith(point.rstrip("/") + "/")
        if on_path and (best is None or len(point) >= len(best.mount_point)):
            best = entry
    return best

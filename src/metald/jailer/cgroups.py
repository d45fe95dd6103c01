"""Finding the cgroup v2 hierarchy and naming a VM's cgroup in it (standard library only:
the helper imports this)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from metald.jailer.spec import CgroupSpec

_OCTAL = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class MountEntry:
    mount_point: str
    root: str
    fstype: str
    options: str


def _unescape(field: str) -> str:
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[MountEntry]:
    """/proc/<pid>/mountinfo, one entry per line (see proc(5))."""
    entries = []
    for line in text.splitlines():
        fields = line.split()
        try:
            sep = fields.index("-", 6)
        except ValueError:
            continue
        if len(fields) < sep + 2:
            continue
        entries.append(
            MountEntry(
                mount_point=_unescape(fields[4]),
                root=_unescape(fields[3]),
                fstype=fields[sep + 1],
                options=fields[5],
            )
        )
    return entries


def read_mountinfo(pid: str | int = "self") -> list[MountEntry]:
    with open(f"/proc/{pid}/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        return parse_mountinfo(f.read())


def find_cgroup2_mount(entries: list[MountEntry]) -> str | None:
    """The mount point of the cgroup v2 hierarchy: /sys/fs/cgroup on a unified host,
    /sys/fs/cgroup/unified on a hybrid one (v1 controllers, v2 for grouping only)."""
    for entry in entries:
        if entry.fstype == "cgroup2" and entry.root == "/":
            return entry.mount_point
    return None


def mounts_under(path: Path, entries: list[MountEntry] | None = None) -> list[str]:
    """Mount points at or below `path` (in this process's mount namespace)."""
    prefix = str(path).rstrip("/")
    found = []
    for entry in read_mountinfo() if entries is None else entries:
        if entry.mount_point == prefix or entry.mount_point.startswith(prefix + "/"):
            found.append(entry.mount_point)
    return found


def cgroup_mount(spec: CgroupSpec) -> str | None:
    if spec.mount is not None:
        return spec.mount
    try:
        return find_cgroup2_mount(read_mountinfo())
    except OSError:
        return None


def relative_cgroup(spec: CgroupSpec, vm_id: str) -> str:
    """The VM's cgroup below the cgroup v2 root, without a leading slash."""
    return f"{spec.parent.strip('/')}/{vm_id}"


def cgroup_dir(spec: CgroupSpec, vm_id: str) -> Path | None:
    """Where the VM's cgroup is (or would be) on the host, None without cgroup v2."""
    mount = cgroup_mount(spec)
    return None if mount is None else Path(mount) / relative_cgroup(spec, vm_id)

"""Finding the cgroup v2 hierarchy and naming a VM's cgroup in it (standard library only:
the helper imports this)."""

from __future__ import annotations

from pathlib import Path

from metald.host.mounts import MountEntry, read_mountinfo
from metald.jailer.spec import CgroupSpec


def find_cgroup2_mount(entries: list[MountEntry]) -> str | None:
    """The mount point of the cgroup v2 hierarchy: /sys/fs/cgroup on a unified host,
    /sys/fs/cgroup/unified on a hybrid one (v1 controllers, v2 for grouping only)."""
    for entry in entries:
        if entry.fstype == "cgroup2" and entry.root == "/":
            return entry.mount_point
    return None


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

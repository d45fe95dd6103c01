"""Whether this host can apply the VM cgroup limits (memory.max, cpu.max, pids.max) at all:
checked once at start-up, so an operator who requires them learns it before any VM starts.

A cgroup v2 controller can be used only where the v2 hierarchy offers it (its root's
cgroup.controllers). On a hybrid host (v1 controllers, v2 mounted at /sys/fs/cgroup/unified
for grouping only) memory, cpu and pids are bound to v1 and missing there.
"""

from __future__ import annotations

import os

from metald.jailer.cgroups import cgroup_mount
from metald.jailer.spec import CgroupSpec

LIMIT_CONTROLLERS = ("memory", "cpu", "pids")


def cgroup_limit_problems(
    spec: CgroupSpec | None = None, controllers: tuple[str, ...] = LIMIT_CONTROLLERS
) -> list[str]:
    """What keeps the VM cgroup limits from applying; [] when they can."""
    spec = spec or CgroupSpec()
    mount = cgroup_mount(spec)
    if mount is None:
        return ["no cgroup v2 hierarchy is mounted"]
    try:
        with open(os.path.join(mount, "cgroup.controllers"), encoding="ascii") as f:
            available = f.read().split()
    except OSError as e:
        return [f"cannot read {mount}/cgroup.controllers: {e.strerror}"]
    missing = [c for c in controllers if c not in available]
    if missing:
        return [
            f"cgroup v2 at {mount} does not offer the {', '.join(missing)} controller(s) "
            f"(offered: {' '.join(available) or 'none'}; on a hybrid host they are bound "
            "to cgroup v1)"
        ]
    return []

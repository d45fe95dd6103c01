"""The jailer: each VMM runs unprivileged, in its own mount namespace and root, inside the
VM's network namespace and cgroup (DESIGN §2, §3, §5).

`python -m metald.jailer` is the helper process that prepares the jail and becomes the VMM
(metald.jailer.helper); metald drives it with `launch_jailed` and `remove_jail`
(metald.jailer.launch). This package's import stays light: the helper imports only the
standard library before it builds the jail.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from metald.jailer.spec import (
    STEPS,
    CgroupSpec,
    DeviceNode,
    JailSpec,
    PlacedFile,
    Rlimit,
    SpecError,
    TapSpec,
)

if TYPE_CHECKING:
    from metald.jailer.errors import JailerError
    from metald.jailer.host import dynamic_binary_paths, vmm_devices
    from metald.jailer.launch import (
        JailedProcess,
        StepReport,
        launch_jailed,
        remove_jail,
        remove_tap_device,
    )
    from metald.jailer.user import ensure_jail_user

_LAZY = {
    "JailerError": "metald.jailer.errors",
    "JailedProcess": "metald.jailer.launch",
    "StepReport": "metald.jailer.launch",
    "launch_jailed": "metald.jailer.launch",
    "remove_jail": "metald.jailer.launch",
    "remove_tap_device": "metald.jailer.launch",
    "dynamic_binary_paths": "metald.jailer.host",
    "vmm_devices": "metald.jailer.host",
    "ensure_jail_user": "metald.jailer.user",
}

__all__ = [
    "STEPS",
    "CgroupSpec",
    "DeviceNode",
    "JailSpec",
    "JailedProcess",
    "JailerError",
    "PlacedFile",
    "Rlimit",
    "SpecError",
    "StepReport",
    "TapSpec",
    "dynamic_binary_paths",
    "ensure_jail_user",
    "launch_jailed",
    "remove_jail",
    "remove_tap_device",
    "vmm_devices",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'metald.jailer' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)

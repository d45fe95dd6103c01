"""The jail spec: everything the jailer helper needs to prepare a VMM and become it.

metald builds a `JailSpec`, hands it to the helper as JSON (`to_json`/`from_json` round-trip
exactly) and the helper acts on nothing else. Paths called "inside" are as the VMM sees them
once it is jailed; the jail root itself is on the host filesystem at `jail_root`, so files the
VMM makes in its writable directories (the QMP socket, the console log) are reachable from
the host at `host_path("/run/qmp.sock")`.

This module is imported by the helper before it builds the jail: standard library only.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metald.core.ids import VM_ID_RULE, is_vm_id

# The helper's steps, in the order it runs them. "spec" names a spec the helper (or
# launch_jailed, before starting it) refused; "start" a helper that died without a word.
STEPS = ("netns", "tap", "mount", "cgroup", "rlimits", "privileges", "seccomp", "exec")
ALL_STEPS = ("spec", "start", *STEPS)

MIB = 1024 * 1024
DEFAULT_JAIL_BASE = "/srv/jailer"
DEFAULT_CGROUP_PARENT = "metald"
# What a VMM needs beside guest memory: QEMU under TCG keeps its translation cache and
# device state there; Firecracker needs far less.
DEFAULT_VMM_MEMORY_ALLOWANCE = 256 * MIB
CPU_PERIOD_US = 100_000
UID_LIMIT = 2**32 - 1  # (uid_t)-1 means "leave unchanged" to setresuid: never a real id
RLIM_INFINITY = -1

_BACKEND = re.compile(r"[a-z0-9_-]{1,32}")
_IFNAME_BAD = re.compile(r"[\s/:]")
_RLIMIT_NAMES = (
    "AS", "CORE", "CPU", "DATA", "FSIZE", "LOCKS", "MEMLOCK", "MSGQUEUE", "NICE", "NOFILE",
    "NPROC", "RSS", "RTPRIO", "RTTIME", "SIGPENDING", "STACK",
)  # fmt: skip


class SpecError(ValueError):
    """A spec that cannot be used; the message names the field."""


@dataclass(frozen=True)
class PlacedFile:
    """A host file made visible inside the jail at `target`.

    `source` is opened once with no symlink on its path, and that open file is placed: a
    read-only file is bind-mounted read-only (never hard-linked: the jail user could chmod
    a file it owns through a link, and the asset store accounts for every link of its
    files); a writable file (a per-VM disk copy) is handed to the jail user (chowned to the
    jail uid/gid) and hard-linked, or bind-mounted when on another filesystem.
    """

    source: str
    target: str
    read_only: bool = True


@dataclass(frozen=True)
class DeviceNode:
    """A device node made inside the jail's /dev (a private tmpfs) like the host's `path`,
    owned by the jail user with `mode`."""

    path: str
    mode: int = 0o600


@dataclass(frozen=True)
class TapSpec:
    """The TAP device the helper creates in the VM's netns, owned by the jail user, up."""

    name: str


@dataclass(frozen=True)
class CgroupSpec:
    """The VM's cgroup (v2): `<cgroup2 mount>/<parent>/<vm_id>`.

    Limits the host cannot apply (no cgroup v2, controller not delegated) are skipped and the
    reason reported, unless `required`, when that is a failure of the cgroup step.
    """

    parent: str = DEFAULT_CGROUP_PARENT
    memory_max: int | None = None  # bytes
    cpu_quota_us: int | None = None  # per cpu_period_us
    cpu_period_us: int = CPU_PERIOD_US
    pids_max: int | None = None
    required: bool = False
    mount: str | None = None  # the cgroup2 mount point; None: found in /proc/self/mountinfo

    @classmethod
    def for_vm(
        cls,
        *,
        memory_bytes: int,
        vcpu_count: int,
        memory_allowance: int = DEFAULT_VMM_MEMORY_ALLOWANCE,
        pids_max: int | None = 512,
        parent: str = DEFAULT_CGROUP_PARENT,
        required: bool = False,
    ) -> CgroupSpec:
        """Limits for a VM: memory = guest memory + the VMM's allowance; CPU = one full CPU
        per vCPU (the VMM's other threads share that budget)."""
        if memory_bytes <= 0 or vcpu_count < 1:
            raise SpecError("cgroup: memory_bytes must be positive and vcpu_count at least 1")
        return cls(
            parent=parent,
            memory_max=memory_bytes + memory_allowance,
            cpu_quota_us=vcpu_count * CPU_PERIOD_US,
            cpu_period_us=CPU_PERIOD_US,
            pids_max=pids_max,
            required=required,
        )


@dataclass(frozen=True)
class Rlimit:
    """A resource limit, by its name without RLIMIT_ (NOFILE, CORE, ...); -1 is unlimited."""

    name: str
    soft: int
    hard: int


DEFAULT_RLIMITS = (
    Rlimit("NOFILE", 4096, 4096),
    # A VMM's core dump would hold its guest's memory.
    Rlimit("CORE", 0, 0),
)
DEFAULT_DEVICES = (DeviceNode("/dev/null"), DeviceNode("/dev/urandom"))


@dataclass(frozen=True)
class JailSpec:
    vm_id: str
    uid: int
    gid: int
    argv: tuple[str, ...]  # the VMM's command line, paths as seen inside the jail
    backend: str = "qemu"
    jail_base: str = DEFAULT_JAIL_BASE
    netns: str | None = None  # a name in /run/netns or an absolute path; None: stay
    tap: TapSpec | None = None
    files: tuple[PlacedFile, ...] = ()
    devices: tuple[DeviceNode, ...] = DEFAULT_DEVICES
    # Host paths bind-mounted read-only at the same place (the VMM's binary, its libraries,
    # its firmware). Symlinks on the way are recreated as symlinks.
    host_paths: tuple[str, ...] = ()
    # Directories the VMM may write (its sockets, console log): owned by the jail user, on
    # the host filesystem so metald reaches them from outside.
    writable_dirs: tuple[str, ...] = ("/run",)
    cgroup: CgroupSpec | None = None
    rlimits: tuple[Rlimit, ...] = DEFAULT_RLIMITS
    env: Mapping[str, str] = field(default_factory=dict)  # the VMM's whole environment
    # Tests only: fail at the end of this step. Honoured only when the helper runs with
    # METALD_JAILER_TEST_HOOKS=1 in its environment.
    fail_at: str | None = None
    # The VMM is pid 1 of a new PID namespace (it sees no other process; when it ends, every
    # process it started ends with it). Its parent is metald, which watches and reaps it.
    pid_namespace: bool = True
    # With no `netns`: a new, empty network namespace (only loopback) instead of metald's.
    private_network: bool = True
    # A seccomp filter refusing new user namespaces (metald.host.seccomp), before execve.
    deny_user_namespaces: bool = True

    # -- derived paths (host side) --

    @property
    def jail_dir(self) -> Path:
        """The VM's jail directory: everything the jailer makes on the host is inside."""
        return Path(self.jail_base) / self.backend / self.vm_id

    @property
    def jail_root(self) -> Path:
        return self.jail_dir / "root"

    def host_path(self, inside: str) -> Path:
        """Where a path inside the jail is on the host (for files on the jail's own
        filesystem: writable dirs, placed hard links — not bind mounts or /dev)."""
        return self.jail_root / inside.lstrip("/")

    @property
    def netns_path(self) -> str | None:
        if self.netns is None:
            return None
        return self.netns if self.netns.startswith("/") else f"/run/netns/{self.netns}"

    # -- checks --

    def validate(self) -> None:
        """Raise SpecError for anything the helper must not attempt."""
        if not is_vm_id(self.vm_id):
            raise SpecError(f"vm_id: {VM_ID_RULE}")
        if not _BACKEND.fullmatch(self.backend):
            raise SpecError("backend: 1-32 of a-z, 0-9, '_' or '-'")
        for name, value in (("uid", self.uid), ("gid", self.gid)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise SpecError(f"{name}: must be an integer")
            if not 0 < value < UID_LIMIT:
                raise SpecError(f"{name}: {value} is not an unprivileged id (1..{UID_LIMIT - 1})")
        if not self.argv or not self.argv[0].startswith("/"):
            raise SpecError("argv: the VMM's absolute path (inside the jail) comes first")
        if any("\0" in a for a in self.argv):
            raise SpecError("argv: NUL in an argument")
        _absolute("jail_base", self.jail_base, allow_root=False)
        if self.netns is not None:
            if self.netns.startswith("/"):
                _absolute("netns", self.netns, allow_root=False)
            elif not self.netns or "/" in self.netns or self.netns in (".", ".."):
                raise SpecError("netns: a namespace name or an absolute path")
        if self.tap is not None:
            name = self.tap.name
            if not 0 < len(name.encode()) <= 15 or name in (".", "..") or _IFNAME_BAD.search(name):
                raise SpecError("tap.name: 1-15 bytes, no whitespace, '/' or ':'")
        reserved = ["/dev", "/proc", "/sys"]
        for d in self.writable_dirs:
            _absolute("writable_dirs", d, allow_root=False)
            _not_under("writable_dirs", d, reserved)
        for p in self.host_paths:
            _absolute("host_paths", p, allow_root=False)
            _not_under("host_paths", p, ["/dev", *self.writable_dirs])
        targets: set[str] = set()
        for f in self.files:
            _absolute("files.source", f.source, allow_root=False)
            _absolute("files.target", f.target, allow_root=False)
            _not_under(
                "files.target",
                f.target,
                reserved + list(self.host_paths) + list(self.writable_dirs),
            )
            if f.target in targets:
                raise SpecError(f"files.target: {f.target} given twice")
            targets.add(f.target)
        for node in self.devices:
            _absolute("devices.path", node.path, allow_root=False)
            if not node.path.startswith("/dev/"):
                raise SpecError(f"devices.path: {node.path} is not under /dev")
            if not 0 <= node.mode <= 0o777:
                raise SpecError(f"devices.mode: {node.mode:o} is not a permission mode")
        if self.cgroup is not None:
            c = self.cgroup
            parent = c.parent.strip("/")
            if not parent or ".." in parent.split("/") or "." in parent.split("/"):
                raise SpecError("cgroup.parent: a path below the cgroup v2 root")
            if c.mount is not None:
                _absolute("cgroup.mount", c.mount, allow_root=False)
            for limit, amount in (
                ("memory_max", c.memory_max),
                ("cpu_quota_us", c.cpu_quota_us),
                ("pids_max", c.pids_max),
            ):
                if amount is not None and amount <= 0:
                    raise SpecError(f"cgroup.{limit}: must be positive")
            if c.cpu_period_us < 1000 or c.cpu_period_us > 1_000_000:
                raise SpecError("cgroup.cpu_period_us: 1000..1000000")
        for r in self.rlimits:
            if r.name not in _RLIMIT_NAMES:
                raise SpecError(f"rlimits: unknown limit {r.name!r}")
            if r.soft < -1 or r.hard < -1:
                raise SpecError(f"rlimits: {r.name}: a limit is -1 (unlimited) or >= 0")
            if r.hard != RLIM_INFINITY and (r.soft == RLIM_INFINITY or r.soft > r.hard):
                raise SpecError(f"rlimits: {r.name}: soft limit above hard limit")
        for k, v in self.env.items():
            if not k or "=" in k or "\0" in k or "\0" in v:
                raise SpecError(f"env: bad variable {k!r}")
        if self.fail_at is not None and self.fail_at not in STEPS:
            raise SpecError(f"fail_at: one of {', '.join(STEPS)}")

    # -- JSON --

    def to_dict(self) -> dict[str, Any]:
        return {
            "vm_id": self.vm_id,
            "uid": self.uid,
            "gid": self.gid,
            "argv": list(self.argv),
            "backend": self.backend,
            "jail_base": self.jail_base,
            "netns": self.netns,
            "tap": None if self.tap is None else {"name": self.tap.name},
            "files": [
                {"source": f.source, "target": f.target, "read_only": f.read_only}
                for f in self.files
            ],
            "devices": [{"path": d.path, "mode": d.mode} for d in self.devices],
            "host_paths": list(self.host_paths),
            "writable_dirs": list(self.writable_dirs),
            "cgroup": None
            if self.cgroup is None
            else {
                "parent": self.cgroup.parent,
                "memory_max": self.cgroup.memory_max,
                "cpu_quota_us": self.cgroup.cpu_quota_us,
                "cpu_period_us": self.cgroup.cpu_period_us,
                "pids_max": self.cgroup.pids_max,
                "required": self.cgroup.required,
                "mount": self.cgroup.mount,
            },
            "rlimits": [{"name": r.name, "soft": r.soft, "hard": r.hard} for r in self.rlimits],
            "env": dict(self.env),
            "fail_at": self.fail_at,
            "pid_namespace": self.pid_namespace,
            "private_network": self.private_network,
            "deny_user_namespaces": self.deny_user_namespaces,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Any) -> JailSpec:
        d = _Obj(data, "spec")
        tap = d.obj_or_none("tap")
        cg = d.obj_or_none("cgroup")
        env = d.raw("env", {})
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()
        ):
            raise SpecError("env: an object of strings")
        spec = cls(
            vm_id=d.text("vm_id"),
            uid=d.integer("uid"),
            gid=d.integer("gid"),
            argv=tuple(d.str_list("argv")),
            backend=d.text("backend", "qemu"),
            jail_base=d.text("jail_base", DEFAULT_JAIL_BASE),
            netns=d.str_or_none("netns"),
            tap=None if tap is None else TapSpec(name=tap.text("name")),
            files=tuple(
                PlacedFile(
                    source=f.text("source"),
                    target=f.text("target"),
                    read_only=f.flag("read_only", True),
                )
                for f in d.obj_list("files")
            ),
            devices=tuple(
                DeviceNode(path=x.text("path"), mode=x.integer("mode", 0o600))
                for x in d.obj_list("devices")
            )
            if d.has("devices")
            else DEFAULT_DEVICES,
            host_paths=tuple(d.str_list("host_paths", [])),
            writable_dirs=tuple(d.str_list("writable_dirs", ["/run"])),
            cgroup=None
            if cg is None
            else CgroupSpec(
                parent=cg.text("parent", DEFAULT_CGROUP_PARENT),
                memory_max=cg.int_or_none("memory_max"),
                cpu_quota_us=cg.int_or_none("cpu_quota_us"),
                cpu_period_us=cg.integer("cpu_period_us", CPU_PERIOD_US),
                pids_max=cg.int_or_none("pids_max"),
                required=cg.flag("required", False),
                mount=cg.str_or_none("mount"),
            ),
            rlimits=tuple(
                Rlimit(name=r.text("name"), soft=r.integer("soft"), hard=r.integer("hard"))
                for r in d.obj_list("rlimits")
            )
            if d.has("rlimits")
            else DEFAULT_RLIMITS,
            env=dict(env),
            fail_at=d.str_or_none("fail_at"),
            pid_namespace=d.flag("pid_namespace", True),
            private_network=d.flag("private_network", True),
            deny_user_namespaces=d.flag("deny_user_namespaces", True),
        )
        return spec

    @classmethod
    def from_json(cls, text: str | bytes) -> JailSpec:
        try:
            data = json.loads(text)
        except ValueError as e:
            raise SpecError(f"not JSON: {e}") from None
        return cls.from_dict(data)


def _absolute(name: str, path: str, *, allow_root: bool) -> None:
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise SpecError(f"{name}: {path!r} is not an absolute path")
    if posixpath.normpath(path) != path or path.startswith("//"):
        raise SpecError(f"{name}: {path!r} is not in normal form (no '..', '.', '//')")
    if path == "/" and not allow_root:
        raise SpecError(f"{name}: not the root directory itself")


def _not_under(name: str, path: str, prefixes: list[str]) -> None:
    for prefix in prefixes:
        if path == prefix or path.startswith(prefix.rstrip("/") + "/"):
            raise SpecError(f"{name}: {path} is inside {prefix}")


_MISSING = object()


class _Obj:
    """Strict reading of one JSON object: wrong types are SpecErrors naming the field."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            raise SpecError(f"{where}: must be an object")
        self._d: dict[str, Any] = data
        self._where = where

    def has(self, key: str) -> bool:
        return key in self._d

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        if key in self._d:
            return self._d[key]
        if default is _MISSING:
            raise SpecError(f"{self._where}.{key}: missing")
        return default

    def _typed(self, key: str, default: Any, kinds: tuple[type, ...], what: str) -> Any:
        v = self.raw(key, default)
        if isinstance(v, bool) and bool not in kinds:
            raise SpecError(f"{self._where}.{key}: must be {what}")
        if not isinstance(v, kinds):
            raise SpecError(f"{self._where}.{key}: must be {what}")
        return v

    def text(self, key: str, default: Any = _MISSING) -> str:
        v: str = self._typed(key, default, (str,), "a string")
        return v

    def str_or_none(self, key: str) -> str | None:
        v: str | None = self._typed(key, None, (str, type(None)), "a string or null")
        return v

    def integer(self, key: str, default: Any = _MISSING) -> int:
        v: int = self._typed(key, default, (int,), "an integer")
        return v

    def int_or_none(self, key: str) -> int | None:
        v: int | None = self._typed(key, None, (int, type(None)), "an integer or null")
        return v

    def flag(self, key: str, default: Any = _MISSING) -> bool:
        v: bool = self._typed(key, default, (bool,), "true or false")
        return v

    def str_list(self, key: str, default: Any = _MISSING) -> list[str]:
        v = self._typed(key, default, (list,), "a list of strings")
        if not all(isinstance(x, str) for x in v):
            raise SpecError(f"{self._where}.{key}: must be a list of strings")
        return list(v)

    def obj_list(self, key: str) -> list[_Obj]:
        v = self.raw(key, [])
        if not isinstance(v, list):
            raise SpecError(f"{self._where}.{key}: must be a list")
        return [_Obj(x, f"{self._where}.{key}[{i}]") for i, x in enumerate(v)]

    def obj_or_none(self, key: str) -> _Obj | None:
        v = self.raw(key, None)
        return None if v is None else _Obj(v, f"{self._where}.{key}")

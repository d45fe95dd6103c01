"""Backends' side of the jailer (metald.jailer): the settings a backend jails its VMMs with,
and what it needs around `launch_jailed`/`remove_jail`:

- the VM's JailSpec saved as JSON in its directory, to find the jail (socket, cgroup, TAP)
  again after a metald restart;
- proof that a live process is a VM's jailed VMM: its root (/proc/<pid>/root) is that VM's
  jail root, which only the jailer makes;
- the jail directories and cgroups that no VM owns, for orphan removal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import posixpath
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from metald.core.errors import BackendError
from metald.core.models import ProcessIdentity
from metald.host.process import identity_of, is_alive, kill_identity
from metald.jailer.cgroups import cgroup_dir
from metald.jailer.errors import JailerError
from metald.jailer.launch import remove_jail
from metald.jailer.spec import (
    DEFAULT_CGROUP_PARENT,
    DEFAULT_JAIL_BASE,
    DEFAULT_VMM_MEMORY_ALLOWANCE,
    UID_LIMIT,
    CgroupSpec,
    JailSpec,
    Rlimit,
    SpecError,
)

log = logging.getLogger(__name__)

_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


@dataclass(frozen=True)
class JailSettings:
    """How a backend jails its VMMs (one jail per VM: DESIGN §2, §3).

    uid, gid: the unprivileged user every VMM runs as (`metald-vm` by default: see
        `for_user`); never 0.
    chroot_base: jails are `<chroot_base>/<backend>/<vm_id>/root`. Must be a directory only
        root can write (the jailer makes it if missing).
    cgroup_parent: VM cgroups are `<cgroup v2 root>/<cgroup_parent>/<vm_id>`.
    vmm_memory_allowance: the cgroup's memory.max is guest memory plus this.
    pids_max: the cgroup's pids.max (None: no limit).
    required_cgroup: fail a launch when the host cannot apply the cgroup limits (by default
        they are skipped where cgroup v2 or its controllers are missing, and logged).
    uid_range: (first, last): every VM's VMM runs as its own id from this range (uid and
        gid alike), claimed through the JailIds port; None: every VMM runs as uid/gid
        (one VMM could then signal, trace or read another: development only).
    nproc_max, nofile_max: RLIMIT_NPROC (threads of the VMM's uid) and RLIMIT_NOFILE.
    file_size_max: RLIMIT_FSIZE, raised to the VM's largest writable disk when bigger.
    spare_helpers: jailer helpers kept started ahead of need (jailer/spares.py).
    """

    uid: int
    gid: int
    chroot_base: Path = Path(DEFAULT_JAIL_BASE)
    cgroup_parent: str = DEFAULT_CGROUP_PARENT
    vmm_memory_allowance: int = DEFAULT_VMM_MEMORY_ALLOWANCE
    pids_max: int | None = 512
    required_cgroup: bool = False
    uid_range: tuple[int, int] | None = None
    nproc_max: int = 512
    nofile_max: int = 4096
    file_size_max: int = 64 * 1024 * 1024
    spare_helpers: int = 2

    def __post_init__(self) -> None:
        for name, value in (("uid", self.uid), ("gid", self.gid)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"jail {name} must be an integer")
            if not 0 < value < UID_LIMIT:
                raise ValueError(f"jail {name} {value} is not an unprivileged id")
        base = str(self.chroot_base)
        if not base.startswith("/") or posixpath.normpath(base) != base or base == "/":
            raise ValueError(f"jail chroot_base {base!r}: an absolute, normalised path below /")
        parent = self.cgroup_parent.strip("/")
        if not parent or any(p in (".", "..") for p in parent.split("/")):
            raise ValueError(f"jail cgroup_parent {self.cgroup_parent!r}: a cgroup path")
        if self.vmm_memory_allowance < 0:
            raise ValueError("jail vmm_memory_allowance must not be negative")
        if self.pids_max is not None and self.pids_max <= 0:
            raise ValueError("jail pids_max must be positive")
        if self.uid_range is not None:
            first, last = self.uid_range
            if not 0 < first <= last < UID_LIMIT:
                raise ValueError(
                    f"jail uid_range {first}-{last} is not a range of unprivileged ids"
                )
        for name, value in (
            ("nproc_max", self.nproc_max),
            ("nofile_max", self.nofile_max),
            ("file_size_max", self.file_size_max),
        ):
            if value <= 0:
                raise ValueError(f"jail {name} must be positive")
        if self.spare_helpers < 0:
            raise ValueError("jail spare_helpers must not be negative")

    def rlimits(self, largest_writable_disk: int = 0) -> tuple[Rlimit, ...]:
        """The VMM's resource limits. RLIMIT_FSIZE counts a write's offset, not growth, so
        it is at least the largest disk the VMM writes; SIGXFSZ is ignored in the VMM (the
        jailer), so a write past it fails instead of killing the VMM."""
        fsize = max(self.file_size_max, largest_writable_disk)
        return (
            Rlimit("NOFILE", self.nofile_max, self.nofile_max),
            Rlimit("NPROC", self.nproc_max, self.nproc_max),
            Rlimit("FSIZE", fsize, fsize),
            # A VMM's core dump would hold its guest's memory.
            Rlimit("CORE", 0, 0),
            Rlimit("MSGQUEUE", 0, 0),
        )

    @classmethod
    def for_user(cls, name: str = "metald-vm", **settings: object) -> JailSettings:
        """Settings for the named jail user, created as a system user if missing (root
        only; blocking: for start-up)."""
        from metald.jailer.user import ensure_jail_user

        uid, gid = ensure_jail_user(name)
        return cls(uid=uid, gid=gid, **settings)  # type: ignore[arg-type]

    def cgroup(self, *, memory_bytes: int, vcpu_count: int) -> CgroupSpec:
        return CgroupSpec.for_vm(
            memory_bytes=memory_bytes,
            vcpu_count=vcpu_count,
            memory_allowance=self.vmm_memory_allowance,
            pids_max=self.pids_max,
            parent=self.cgroup_parent,
            required=self.required_cgroup,
        )

    def backend_dir(self, backend: str) -> Path:
        """Where one backend's jails are: `<chroot_base>/<backend>`."""
        return self.chroot_base / backend

    def check_base(self, backend: str) -> None:
        """Refuse a jail base (or its backend directory) that anyone but root (or metald's
        own user, when it runs as one with capabilities) could write or that is not a real
        directory: whoever could rename entries there could swap one VM's jail for
        another's. Missing directories are fine (the jailer makes them, owned by metald's
        user)."""
        trusted = {0, os.geteuid()}
        for path in (self.chroot_base, self.backend_dir(backend)):
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if not stat.S_ISDIR(st.st_mode):
                raise BackendError(f"jail base {path} is not a directory")
            if st.st_uid not in trusted or st.st_mode & 0o022:
                raise BackendError(
                    f"jail base {path} must be owned by root (or metald's user) and writable "
                    "by its owner only"
                )


# -- the saved spec --


def save_jail_spec(path: Path, spec: JailSpec) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(spec.to_json())
    os.replace(tmp, path)


def load_jail_spec(path: Path, vm_id: str, backend: str) -> JailSpec | None:
    """The jail spec saved for a VM; None when there is none (the VM was not jailed) or it
    is unusable (logged: its jail is then not found by this path)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        log.warning("VM %s: cannot read its jail spec: %s", vm_id, e)
        return None
    try:
        spec = JailSpec.from_json(text)
        spec.validate()
    except SpecError as e:
        log.warning("VM %s: unusable jail spec: %s", vm_id, e)
        return None
    if spec.vm_id != vm_id or spec.backend != backend:
        log.warning("VM %s: its jail spec names another VM (%s/%s)", vm_id, backend, spec.vm_id)
        return None
    return spec


# -- which process is a VM's jailed VMM --


def _same_dir(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _jail_root_stat(root: Path) -> os.stat_result | None:
    try:
        st = os.lstat(root)
    except OSError:
        return None
    return st if stat.S_ISDIR(st.st_mode) else None


def rooted_at(identity: ProcessIdentity, root: Path) -> bool:
    """Whether that very process is alive with `root` as its root directory (the jailer
    pivots a VMM into its VM's jail root: nothing else has that root)."""
    want = _jail_root_stat(root)
    if want is None or not is_alive(identity):
        return False
    try:
        have = os.stat(f"/proc/{identity.pid}/root")
    except OSError:
        return False
    # The pid may have been reused between the two checks: check the identity again.
    return _same_dir(have, want) and is_alive(identity)


def processes_rooted_at(root: Path) -> list[ProcessIdentity]:
    """Every live process whose root directory is `root` (a scan of /proc)."""
    want = _jail_root_stat(root)
    if want is None:
        return []
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            have = os.stat(f"/proc/{entry.name}/root")
        except OSError:
            continue
        if _same_dir(have, want):
            ident = identity_of(int(entry.name))
            if ident is not None:
                found.append(ProcessIdentity(*ident))
    return found


# -- removing jails --


async def release_jail(spec: JailSpec, *, keep_dir: bool, wait: float = 5.0) -> None:
    """remove_jail once the VMM has exited; a cgroup still listing the VMM a moment after
    its exit (an unreaped zombie of a VMM that is not our child) is waited for. Raises
    JailerError with what could not be removed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while True:
        try:
            await remove_jail(spec, remove_dir=not keep_dir)
            return
        except JailerError as e:
            busy = any(item.startswith("cgroup ") for item in e.leftovers) and (
                e.reason == "the jail is still in use"
            )
            if not busy or loop.time() >= deadline:
                raise
        await asyncio.sleep(0.05)


def _names(directory: Path) -> Iterator[str]:
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        if (
            entry.is_dir(follow_symlinks=False)
            and not entry.name.startswith(".")
            and set(entry.name) <= _ID_CHARS
        ):
            yield entry.name


def _anything_at(spec: JailSpec) -> bool:
    if os.path.lexists(spec.jail_dir):
        return True
    cgroup = None if spec.cgroup is None else cgroup_dir(spec.cgroup, spec.vm_id)
    return cgroup is not None and cgroup.exists()


async def remove_jail_at(settings: JailSettings, backend: str, vm_id: str) -> bool:
    """Remove whatever is where the VM's jail and cgroup would be, with no record of it:
    VMMs provably in it (their root is that jail's root) are killed first. False if there
    was nothing. Raises JailerError with what remains (a cgroup with processes that are not
    provably ours is left alone)."""
    template = settings.cgroup(memory_bytes=1, vcpu_count=1)
    spec = JailSpec(
        vm_id=vm_id,
        uid=settings.uid,
        gid=settings.gid,
        argv=("/",),
        backend=backend,
        jail_base=str(settings.chroot_base),
        cgroup=template,
    )
    try:
        spec.validate()
    except SpecError:
        return False
    if not await asyncio.to_thread(_anything_at, spec):
        return False
    for ident in await asyncio.to_thread(processes_rooted_at, spec.jail_root):
        log.warning("jail of VM %s: killing a VMM nobody knew (pid %d)", vm_id, ident.pid)
        with contextlib.suppress(TimeoutError):
            await kill_identity(ident)
    await release_jail(spec, keep_dir=False, wait=2.0)
    return True


async def remove_orphan_jails(settings: JailSettings, backend: str, keep: set[str]) -> list[str]:
    """Jail directories under `<chroot_base>/<backend>` and VM cgroups under the cgroup
    parent whose VM id is not in `keep` go (remove_jail_at). TAPs live in the VMs' network
    namespaces, which go with them. Returns the VM ids whose leftovers were removed."""
    names = set(_names(settings.backend_dir(backend)))
    cgroup = cgroup_dir(settings.cgroup(memory_bytes=1, vcpu_count=1), "x")
    if cgroup is not None:
        names |= set(_names(cgroup.parent))
    removed = []
    for name in sorted(names - keep):
        try:
            if await remove_jail_at(settings, backend, name):
                removed.append(name)
        except JailerError as e:
            log.warning("orphan jail %s: %s", name, e.message)
    return removed

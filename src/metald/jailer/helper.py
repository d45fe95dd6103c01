"""The jailer helper: a separate, single-threaded process that prepares a VMM's jail and then
becomes the VMM (`python -I -m metald.jailer --spec - --error-fd 3`; or, as a spare started
ahead of need, `--wait`: the same with the spec, stderr and report fd sent over a socket on
stdin once a VM needs it, jailer/spares.py).

Steps, in order (each named in reports and errors):
  netns       setns into the VM's network namespace; without one, a new empty network
              namespace (only loopback, up) unless the spec says otherwise
  tap         create the VM's TAP device there, owned by the jail user, and bring it up
  mount       new mount, IPC (and PID: the next child is pid 1 there) namespaces, / made
              rprivate, the jail root built from only what the spec lists, pivot_root into it
              (chroot where pivot_root is impossible)
  cgroup      make the VM's cgroup v2 with its limits and join it (with a PID namespace the
              VMM's process is born in it instead, see below; skipped, with the reason,
              where the host has no usable cgroup v2, unless the spec requires it)
  rlimits     resource limits
  privileges  no capabilities (bounding, ambient, inheritable, permitted, effective), no
              supplementary groups, the jail gid and uid, no_new_privs
  seccomp     the filter that refuses new user namespaces (metald.host.seccomp)
  exec        execve the VMM with the spec's environment only. metald watches and reaps
              the VMM like any child of its own.

With a PID namespace the helper forks the VMM's process as its *sibling* right after the
cgroup step (clone CLONE_PARENT: metald's own child, pid 1 of the new namespace), born in
the VM's cgroup (clone3 CLONE_INTO_CGROUP: a move of a running process into a cgroup
waits for an RCU grace period, ~12 ms of every create here), reports its pid and exits;
the child applies rlimits, privileges and seccomp to itself and executes. (After the
privileges step it could not join the cgroup: that needs write access to the cgroup.procs
of the common ancestor.)

Reporting: JSON lines on the error fd (close-on-exec). Each finished step sends
{"step", "status": "ok"|"skipped", "ms", "detail"}; anything made on the host that must be
undone if a later step fails is announced first as {"created": {...}}; a failure sends
{"step", "status": "error", "error"} and the helper exits with EXIT_CODES[step]. With a PID
namespace the helper sends {"vmm_pid": <host pid>} once it has forked the VMM. Right before
execve the VMM sends {"step": "exec", "status": "starting"}: EOF after that line means the
VMM runs (the fd closed at exec, and the helper has exited).

SIGXFSZ stays ignored in the VMM: a write past RLIMIT_FSIZE fails (EFBIG) instead of
killing the VMM (a console flooded while metald is away loses output; the VM lives on).

Everything the steps use after pivot_root is imported and opened before it.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import os
import posixpath
import resource
import signal
import socket
import stat
import sys
import time
from collections.abc import Callable
from typing import Any, NoReturn

from metald.host import caps, seccomp
from metald.host import files as host_files
from metald.host import libc as sc
from metald.host import netns as host_netns
from metald.host.tap import TapError, bring_up, create_tap, device_exists
from metald.jailer.cgroups import cgroup_mount, relative_cgroup
from metald.jailer.needs import JAILER_CAPABILITIES
from metald.jailer.spec import ALL_STEPS, RLIM_INFINITY, JailSpec, PlacedFile

TEST_HOOKS_ENV = "METALD_JAILER_TEST_HOOKS"
# Exit status of a helper that failed at a step (the VMM never ran): 200 + the step's index.
EXIT_CODES = {name: 200 + i for i, name in enumerate(ALL_STEPS)}


HOST_BIND_FLAGS = sc.MS_RDONLY | sc.MS_NOSUID | sc.MS_NODEV
FILE_BIND_FLAGS = sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC
WRITABLE_FLAGS = sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC


class StepFailed(Exception):
    """A step cannot go on; the message is what metald reports."""


def _os_message(e: OSError) -> str:
    text = e.strerror or str(e)
    if e.filename is not None:
        return f"{os.fsdecode(e.filename)}: {text}"
    return text


class Reporter:
    def __init__(self, fd: int | None) -> None:
        self.fd = fd
        if fd is not None:
            os.set_inheritable(fd, False)

    def send(self, message: dict[str, Any]) -> None:
        line = (json.dumps(message, separators=(",", ":")) + "\n").encode()
        if self.fd is None:
            if message.get("status") == "error":
                os.write(2, b"metald-jailer: " + line)
            return
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError:
            pass  # metald went away; a VMM it does not know about is reconciled later


class Jail:
    """The helper's state from one step to the next."""

    def __init__(self, spec: JailSpec, reporter: Reporter) -> None:
        self.spec = spec
        self.report = reporter
        self.root = str(spec.jail_root)
        self.cgroup_fd: int | None = None
        self.cgroup_mount: str | None = None
        self.cgroup_problem: str | None = None
        # The VM's cgroup, when the VMM's process is to be born in it (a PID namespace).
        self.vm_cgroup_fd: int | None = None
        self.vm_cgroup: str | None = None
        self.last_cap = sc.last_capability()
        self.bound: list[str] = []  # host paths bind-mounted (inside == host path)

    def created(self, kind: str, **fields: str) -> None:
        self.report.send({"created": {"kind": kind, **fields}})

    # -- before any step: what must be open before the host's filesystem disappears --

    def prepare(self) -> None:
        if self.spec.cgroup is None:
            return
        mount = cgroup_mount(self.spec.cgroup)
        if mount is None:
            self.cgroup_problem = "no cgroup v2 hierarchy is mounted"
            return
        try:
            self.cgroup_fd = os.open(mount, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            self.cgroup_mount = mount
        except OSError as e:
            self.cgroup_problem = f"cannot open the cgroup v2 mount: {_os_message(e)}"

    # -- netns --

    def step_netns(self) -> dict[str, Any] | None:
        path = self.spec.netns_path
        if path is None:
            if not self.spec.private_network:
                return None
            try:
                # Gone with its last process: nothing to remove afterwards.
                sc.unshare(sc.CLONE_NEWNET)
                bring_up("lo")
            except OSError as e:
                raise StepFailed(f"cannot make a private network namespace: {e.strerror}") from None
            devices = sorted(name for _, name in socket.if_nameindex())
            return {"netns": "private", "devices": devices}
        try:
            host_netns.enter(path)
        except OSError as e:
            raise StepFailed(f"cannot enter network namespace {path}: {e.strerror}") from None
        return {"netns": path}

    # -- tap --

    def step_tap(self) -> dict[str, Any] | None:
        tap = self.spec.tap
        if tap is None:
            return None
        name = tap.name
        if device_exists(name):
            raise StepFailed(f"a network device named {name} already exists in the namespace")
        try:
            create_tap(name, self.spec.uid, self.spec.gid)
        except TapError as e:
            if e.stage != "create":
                self.created("tap", netns=self.spec.netns_path or "", name=name)
            raise StepFailed(e.strerror or str(e)) from None
        self.created("tap", netns=self.spec.netns_path or "", name=name)
        return {"tap": name, "uid": self.spec.uid, "gid": self.spec.gid}

    # -- mount --

    def _inside(self, path: str) -> str:
        return self.root + path

    def _mkdirs_inside(self, path: str) -> None:
        """Directories inside the jail (root-owned, 0755) down to `path`."""
        current = ""
        for part in path.strip("/").split("/"):
            current += "/" + part
            inside = self._inside(current)
            try:
                os.mkdir(inside, 0o755)
            except FileExistsError:
                st = os.lstat(inside)
                if not stat.S_ISDIR(st.st_mode):
                    raise StepFailed(f"{current} inside the jail is not a directory") from None

    def _bind(self, source: str, inside_path: str, *, is_dir: bool, flags: int) -> None:
        target = self._inside(inside_path)
        self._mkdirs_inside(posixpath.dirname(inside_path) or "/")
        if is_dir:
            if not os.path.isdir(target):
                os.mkdir(target, 0o755)
        else:
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444))
        try:
            sc.mount(source, target, None, sc.MS_BIND | sc.MS_REC, None)
            sc.mount(None, target, None, sc.MS_REMOUNT | sc.MS_BIND | flags, None)
        except OSError as e:
            raise StepFailed(f"cannot bind-mount {source}: {e.strerror}") from None

    def _covered(self, path: str) -> bool:
        return any(path == b or path.startswith(b.rstrip("/") + "/") for b in self.bound)

    def _place_host_path(self, path: str, depth: int = 0) -> None:
        """Bind-mount a host path read-only at the same place; symlinks on the way (such as
        /lib64 -> usr/lib64) become the same symlinks inside, and their targets are placed."""
        if depth > 32:
            raise StepFailed(f"too many symbolic links under {path}")
        if self._covered(path):
            return
        parts = path.strip("/").split("/")
        current = ""
        for i, part in enumerate(parts):
            current += "/" + part
            if self._covered(current):
                return
            try:
                st = os.lstat(current)
            except OSError as e:
                raise StepFailed(f"host path {path}: {_os_message(e)}") from None
            inside = self._inside(current)
            if stat.S_ISLNK(st.st_mode):
                link = os.readlink(current)
                try:
                    os.symlink(link, inside)
                except FileExistsError:
                    if not os.path.islink(inside) or os.readlink(inside) != link:
                        raise StepFailed(f"{current}: conflicting entries in the jail") from None
                rest = "/".join(parts[i + 1 :])
                target = posixpath.normpath(posixpath.join(posixpath.dirname(current), link, rest))
                self._place_host_path(target, depth + 1)
                return
            if i == len(parts) - 1:
                self._bind(current, current, is_dir=stat.S_ISDIR(st.st_mode), flags=HOST_BIND_FLAGS)
                self.bound.append(current)
                return
            if not stat.S_ISDIR(st.st_mode):
                raise StepFailed(f"host path {path}: {current} is not a directory")
            self._mkdirs_inside(current)

    def _place_file(self, f: PlacedFile) -> str:
        """Open the source once, following no symlink anywhere on its path, and place THAT
        open file (a name swapped in afterwards changes nothing):

        - read-only (kernel, initrd, a shared disk): bind-mounted read-only from the
          descriptor. Never a hard link: through one the jail user could chmod a file it
          owns, and a new name would be a link the asset store does not account for;
        - writable (the VM's own disk copy): handed to the jail user through the descriptor
          and hard-linked from it; bind-mounted where it is on another filesystem.
        """
        uid, gid = self.spec.uid, self.spec.gid
        try:
            fd = host_files.open_no_symlinks(f.source, os.O_PATH)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise StepFailed(f"file to place {f.source}: a symbolic link on its path") from None
            raise StepFailed(f"file to place {_os_message(e)}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise StepFailed(f"file to place {f.source} is not a regular file")
            by_fd = host_files.fd_path(fd)
            if f.read_only:
                if not _may(st, uid, gid, 0o4):
                    raise StepFailed(f"{f.source} is not readable by uid {uid} gid {gid}")
                self._bind(by_fd, f.target, is_dir=False, flags=FILE_BIND_FLAGS | sc.MS_RDONLY)
                return "bind-ro"
            os.chown(by_fd, uid, gid)
            os.chmod(by_fd, stat.S_IMODE(st.st_mode) | 0o600)
            self._mkdirs_inside(posixpath.dirname(f.target) or "/")
            try:
                host_files.link_fd(fd, self._inside(f.target))
                return "link"
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EPERM):
                    message = f"cannot link {f.source} into the jail: {e.strerror}"
                    raise StepFailed(message) from None
            self._bind(by_fd, f.target, is_dir=False, flags=FILE_BIND_FLAGS)
            return "bind-rw"
        finally:
            os.close(fd)

    def step_mount(self) -> dict[str, Any]:
        spec = self.spec
        root = self.root
        try:
            # A private IPC namespace too: VMMs sharing the jail uid share no SysV IPC.
            flags = sc.CLONE_NEWNS | sc.CLONE_NEWIPC
            if spec.pid_namespace:
                flags |= sc.CLONE_NEWPID
            sc.unshare(flags)
            sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE, None)
        except OSError as e:
            raise StepFailed(f"cannot make a private mount namespace: {e.strerror}") from None
        # The VM's jail directory may exist already (metald keeps the VMM's stderr there);
        # its root must not: that would be another VM's jail, or one nobody removed.
        jail_dir = str(spec.jail_dir)
        os.makedirs(os.path.dirname(jail_dir), mode=0o755, exist_ok=True)
        try:
            os.mkdir(jail_dir, 0o700)
            os.chmod(jail_dir, 0o700)
            self.created("dir", path=jail_dir)
            made_dir = True
        except FileExistsError:
            made_dir = False
        try:
            os.mkdir(root, 0o755)
        except FileExistsError:
            raise StepFailed(
                f"the jail root {root} exists already (another VM with this id, or a jail "
                "nobody removed)"
            ) from None
        if not made_dir:
            self.created("dir", path=root)
        os.chmod(root, 0o755)
        placed = {}
        for f in spec.files:
            placed[f.target] = self._place_file(f)
        for d in spec.writable_dirs:
            # On the host's filesystem (metald reaches the sockets there), but a mount of
            # its own inside: nothing written there can be executed.
            inside = self._inside(d)
            self._mkdirs_inside(posixpath.dirname(d) or "/")
            os.mkdir(inside, 0o700)
            os.chown(inside, spec.uid, spec.gid)
            os.chmod(inside, 0o700)
            try:
                sc.mount(inside, inside, None, sc.MS_BIND, None)
                sc.mount(None, inside, None, sc.MS_REMOUNT | sc.MS_BIND | WRITABLE_FLAGS, None)
            except OSError as e:
                raise StepFailed(f"cannot mount writable dir {d}: {e.strerror}") from None
        for p in sorted(spec.host_paths, key=len):
            self._place_host_path(p)
        # /dev: a private tmpfs holding only the listed nodes (gone with the namespace).
        devices = []
        if spec.devices:
            dev = self._inside("/dev")
            os.mkdir(dev, 0o755)
            sc.mount("tmpfs", dev, "tmpfs", sc.MS_NOSUID | sc.MS_NOEXEC, "mode=0755,size=64k")
            for node in spec.devices:
                try:
                    st = os.stat(node.path)
                except OSError as e:
                    raise StepFailed(f"device {_os_message(e)}") from None
                if not (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                    raise StepFailed(f"{node.path} is not a device on the host")
                target = self._inside(node.path)
                self._mkdirs_inside(posixpath.dirname(node.path))
                os.mknod(target, stat.S_IFMT(st.st_mode) | node.mode, st.st_rdev)
                os.chown(target, spec.uid, spec.gid)
                os.chmod(target, node.mode)
                devices.append(node.path)
        # The jail root becomes a mount (pivot_root needs one) carrying everything above.
        try:
            sc.mount(root, root, None, sc.MS_BIND | sc.MS_REC, None)
            sc.mount(
                None, root, None, sc.MS_REMOUNT | sc.MS_BIND | sc.MS_NOSUID | sc.MS_NODEV, None
            )
        except OSError as e:
            raise StepFailed(f"cannot make the jail root a mount point: {e.strerror}") from None
        os.chdir(root)
        how = "pivot_root"
        try:
            if not sc.pivot_root_supported():
                raise OSError(errno.ENOSYS, "pivot_root unsupported")
            sc.pivot_root(".", ".")
            sc.umount2(".", sc.MNT_DETACH)
        except OSError:
            # pivot_root is impossible on an initramfs root; chroot is the fallback.
            how = "chroot"
            os.chroot(".")
        os.chdir("/")
        return {"root": root, "how": how, "files": placed, "devices": devices}

    # -- cgroup --

    def step_cgroup(self) -> dict[str, Any] | None:
        cg = self.spec.cgroup
        if cg is None:
            return None
        required = cg.required

        def skip(reason: str) -> dict[str, Any]:
            if required:
                raise StepFailed(reason)
            return {"skipped": reason}

        if self.cgroup_fd is None or self.cgroup_mount is None:
            return skip(self.cgroup_problem or "no cgroup v2")
        fd = self.cgroup_fd
        relative = relative_cgroup(cg, self.spec.vm_id)
        wanted = [
            name
            for name, value in (
                ("memory", cg.memory_max),
                ("cpu", cg.cpu_quota_us),
                ("pids", cg.pids_max),
            )
            if value is not None
        ]
        # The first reason each controller cannot be used (it is then not tried below).
        problems: dict[str, str] = {}
        level = "."
        try:
            for part in [*cg.parent.strip("/").split("/"), None]:
                available = _read(fd, f"{level}/cgroup.controllers").split()
                enabled = _read(fd, f"{level}/cgroup.subtree_control").split()
                for name in wanted:
                    if name in problems or name in enabled:
                        continue
                    if name not in available:
                        problems[name] = (
                            f"{name}: not available in cgroup v2 at {_show(level)} "
                            f"(available there: {' '.join(available) or 'none'})"
                        )
                        continue
                    try:
                        _write(fd, f"{level}/cgroup.subtree_control", f"+{name}")
                    except OSError as e:
                        problems[name] = f"{name}: cannot enable at {_show(level)}: {e.strerror}"
                if part is None:
                    break
                level = part if level == "." else f"{level}/{part}"
                with contextlib.suppress(FileExistsError):
                    os.mkdir(level, 0o755, dir_fd=fd)
        except OSError as e:
            return skip(f"cannot prepare the cgroup parent {_show(level)}: {_os_message(e)}")
        try:
            os.mkdir(relative, 0o755, dir_fd=fd)
        except FileExistsError:
            if _read(fd, f"{relative}/cgroup.procs").strip():
                raise StepFailed(f"cgroup /{relative} exists and has processes") from None
        except OSError as e:
            return skip(f"cannot create cgroup /{relative}: {_os_message(e)}")
        path = f"{self.cgroup_mount}/{relative}"
        self.created("cgroup", path=path)
        applied: dict[str, str] = {}
        limits = (
            ("memory", "memory.max", cg.memory_max),
            (
                "cpu",
                "cpu.max",
                None if cg.cpu_quota_us is None else (cg.cpu_quota_us, cg.cpu_period_us),
            ),
            ("pids", "pids.max", cg.pids_max),
        )
        for controller, filename, value in limits:
            if value is None or controller in problems:
                continue
            text = f"{value[0]} {value[1]}" if isinstance(value, tuple) else str(value)
            try:
                _write(fd, f"{relative}/{filename}", text)
                applied[filename] = text
            except OSError as e:
                problems[controller] = f"{controller}: cannot set {filename}: {e.strerror}"
        if problems and required:
            raise StepFailed("; ".join(problems.values()))
        detail: dict[str, Any] = {"path": path, "applied": applied}
        if self.spec.pid_namespace:
            # The VMM's process is forked next: it is born in the cgroup (CLONE_INTO_CGROUP),
            # which spares the ~12 ms a move of a running process costs (see fork_vmm).
            try:
                self.vm_cgroup_fd = os.open(
                    relative, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd
                )
            except OSError as e:
                raise StepFailed(f"cannot open cgroup /{relative}: {e.strerror}") from None
            self.vm_cgroup = relative
            detail["joined"] = "at the VMM's fork"
        else:
            self.move_into_cgroup(relative)
        os.close(fd)
        self.cgroup_fd = None
        if problems:
            detail["limits_skipped"] = "; ".join(problems.values())
        return detail

    def move_into_cgroup(self, relative: str) -> None:
        """Move this process into the cgroup (cgroup_fd must be open)."""
        assert self.cgroup_fd is not None
        try:
            _write(self.cgroup_fd, f"{relative}/cgroup.procs", str(os.getpid()))
        except OSError as e:
            raise StepFailed(f"cannot move into cgroup /{relative}: {e.strerror}") from None

    # -- the VMM's process (with a PID namespace) --

    def fork_vmm(self) -> int:
        """Fork the VMM's process as metald's child (CLONE_PARENT), in the VM's cgroup when
        it has one: born there with clone3 (CLONE_INTO_CGROUP), or, where the kernel cannot,
        forked plainly and then moved. 0 in the child, its pid in the helper. Done right
        after the cgroup step, while the helper may still join cgroups: the child applies
        the remaining steps (rlimits, privileges, seccomp) to itself and executes."""
        fd, relative = self.vm_cgroup_fd, self.vm_cgroup
        self.vm_cgroup_fd = self.vm_cgroup = None
        if fd is None or relative is None:
            return sc.fork_as_sibling()
        try:
            try:
                return sc.fork_as_sibling_into_cgroup(fd)
            except OSError as e:
                if e.errno not in (errno.ENOSYS, errno.EINVAL, errno.E2BIG, errno.EOPNOTSUPP):
                    raise
            # Before Linux 5.7: the child moves itself in.
            child = sc.fork_as_sibling()
            if child == 0:
                try:
                    _write(fd, "cgroup.procs", str(os.getpid()))
                except OSError as e:
                    raise StepFailed(f"cannot move into cgroup /{relative}: {e.strerror}") from None
            return child
        finally:
            os.close(fd)

    # -- rlimits --

    def step_rlimits(self) -> dict[str, Any]:
        applied = {}
        for r in self.spec.rlimits:
            which = getattr(resource, f"RLIMIT_{r.name}")
            soft = resource.RLIM_INFINITY if r.soft == RLIM_INFINITY else r.soft
            hard = resource.RLIM_INFINITY if r.hard == RLIM_INFINITY else r.hard
            try:
                resource.setrlimit(which, (soft, hard))
            except (OSError, ValueError) as e:
                raise StepFailed(f"cannot set RLIMIT_{r.name} to {r.soft}/{r.hard}: {e}") from None
            applied[r.name] = [r.soft, r.hard]
        return applied

    # -- privileges --

    def step_privileges(self) -> dict[str, Any]:
        uid, gid = self.spec.uid, self.spec.gid
        try:
            try:
                sc.prctl(sc.PR_CAP_AMBIENT, sc.PR_CAP_AMBIENT_CLEAR_ALL)
            except OSError as e:
                if e.errno != errno.EINVAL:  # a kernel without ambient capabilities
                    raise
            for cap in range(self.last_cap + 1):
                sc.prctl(sc.PR_CAPBSET_DROP, cap)
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            sc.clear_capabilities()
            sc.prctl(sc.PR_SET_NO_NEW_PRIVS, 1)
        except (OSError, OverflowError) as e:
            message = _os_message(e) if isinstance(e, OSError) else str(e)
            raise StepFailed(f"cannot drop privileges to uid {uid} gid {gid}: {message}") from None
        # Trust nothing: check what the kernel now says.
        if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
            raise StepFailed(f"ids are {os.getresuid()}/{os.getresgid()}, not {uid}/{gid}")
        if os.getgroups() not in ([], [gid]):
            raise StepFailed(f"supplementary groups remain: {os.getgroups()}")
        if sc.prctl(sc.PR_GET_NO_NEW_PRIVS) != 1:
            raise StepFailed("no_new_privs is not set")
        if any(sc.prctl(sc.PR_CAPBSET_READ, cap) for cap in range(self.last_cap + 1)):
            raise StepFailed("the capability bounding set is not empty")
        return {"uid": uid, "gid": gid}

    # -- seccomp --

    def step_seccomp(self) -> dict[str, Any] | None:
        if not self.spec.deny_user_namespaces:
            return None
        try:
            seccomp.install_deny_user_namespaces()
        except OSError as e:
            raise StepFailed(f"cannot install the seccomp filter: {e.strerror or e}") from None
        return {"filter": "deny-user-namespaces", "mode": seccomp.seccomp_mode()}


def _show(level: str) -> str:
    return "/" if level == "." else f"/{level}"


def _may(st: os.stat_result, uid: int, gid: int, bit: int) -> bool:
    """Whether uid/gid (no other groups) has permission `bit` (4 read, 2 write)."""
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid == uid:
        return bool(mode & (bit << 6))
    if st.st_gid == gid:
        return bool(mode & (bit << 3))
    return bool(mode & bit)


def _read(dir_fd: int, path: str) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        return os.read(fd, 65536).decode()
    finally:
        os.close(fd)


def _write(dir_fd: int, path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _fail(reporter: Reporter, step: str, message: str) -> NoReturn:
    reporter.send({"step": step, "status": "error", "error": message})
    os._exit(EXIT_CODES[step])


def _load_spec(source: str) -> bytes:
    if source == "-":
        chunks = []
        while chunk := os.read(0, 1 << 16):
            chunks.append(chunk)
        # The VMM's stdin: nothing.
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        return b"".join(chunks)
    with open(source, "rb") as f:
        return f.read()


def run(spec: JailSpec, reporter: Reporter) -> NoReturn:
    hooks = os.environ.get(TEST_HOOKS_ENV) == "1"
    jail = Jail(spec, reporter)
    jail.prepare()
    steps: list[tuple[str, Callable[[], dict[str, Any] | None]]] = [
        ("netns", jail.step_netns),
        ("tap", jail.step_tap),
        ("mount", jail.step_mount),
        ("cgroup", jail.step_cgroup),
        ("rlimits", jail.step_rlimits),
        ("privileges", jail.step_privileges),
        ("seccomp", jail.step_seccomp),
    ]
    started = time.monotonic()
    for name, action in steps:
        t0 = time.monotonic()
        try:
            detail = action()
            if hooks and spec.fail_at == name:
                raise StepFailed("made to fail by the test hook")
        except StepFailed as e:
            _fail(reporter, name, str(e))
        except OSError as e:
            _fail(reporter, name, _os_message(e))
        except Exception as e:  # a bug: still a step failure, never a traceback to metald
            _fail(reporter, name, f"{type(e).__name__}: {e}")
        reporter.send(
            {
                "step": name,
                "status": "skipped" if detail is None or "skipped" in detail else "ok",
                "ms": round((time.monotonic() - t0) * 1000, 3),
                "detail": detail or {},
            }
        )
        if name == "cgroup" and spec.pid_namespace:
            _become_vmm_process(jail, reporter)
    if hooks and spec.fail_at == "exec":
        _fail(reporter, "exec", "made to fail by the test hook")
    # Python ignores SIGPIPE (and SIGXFSZ); an ignored signal stays ignored across execve.
    # SIGXFSZ stays ignored on purpose (see the module docstring).
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    os.umask(0o077)
    reporter.send(
        {"step": "exec", "status": "starting", "ms": round((time.monotonic() - started) * 1000, 3)}
    )
    try:
        os.execve(spec.argv[0], list(spec.argv), dict(spec.env))
    except OSError as e:
        _fail(reporter, "exec", f"cannot execute {_os_message(e)}")


def _become_vmm_process(jail: Jail, reporter: Reporter) -> None:
    """With a PID namespace: fork the VMM's process (pid 1 of the namespace, metald's child)
    and let the helper exit once it has reported the pid; the child goes on with the
    remaining steps. The child waits for that report so that the reports stay in order."""
    go_r, go_w = os.pipe()
    try:
        child = jail.fork_vmm()
    except StepFailed as e:
        _fail(reporter, "exec", f"cannot start the VMM's process: {e}")
    except OSError as e:
        _fail(reporter, "exec", f"cannot start the VMM's process: {_os_message(e)}")
    if child != 0:
        reporter.send({"vmm_pid": child})
        os.write(go_w, b"x")
        os._exit(0)
    os.close(go_w)
    os.read(go_r, 1)  # the helper has reported the pid (or died: EOF)
    os.close(go_r)


def _wait_for_job(sock_fd: int = 0) -> tuple[int, Reporter]:
    """--wait (a spare, jailer/spares.py): block until metald sends the job over the socket
    on `sock_fd`: the spec (a memfd), stderr and the report pipe. Then those are fds 2 and 3
    as for a helper started for the job, stdin is /dev/null and the CPU priority normal.
    Returns the spec's fd. The socket's end (metald closed the pool) ends the helper."""
    sock = socket.socket(fileno=sock_fd)
    try:
        message, fds, _, _ = socket.recv_fds(sock, 16, 3)
    except OSError:
        os._exit(0)
    finally:
        sock.detach()  # stays open as fd 0 until /dev/null replaces it below
    if not message:
        os._exit(0)  # no job: metald let this spare go
    if message != b"job" or len(fds) != 3:
        for fd in fds:
            os.close(fd)
        os._exit(EXIT_CODES["start"])
    # Above 3 first: a received fd may be 3 itself, which the report pipe is about to be.
    spec_fd, stderr_fd, report_fd = (_above(fd, 10) for fd in fds)
    os.dup2(stderr_fd, 2)
    os.dup2(report_fd, 3)
    null = os.open(os.devnull, os.O_RDONLY)  # not 0: the socket still holds it
    os.dup2(null, sock_fd)  # the socket goes; the VMM's stdin is /dev/null
    for fd in (null, stderr_fd, report_fd):
        os.close(fd)
    reporter = Reporter(3)
    try:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))  # metald did; the VMM's
    except OSError as e:
        _fail(reporter, "start", f"cannot restore the normal CPU priority: {e.strerror}")
    return spec_fd, reporter


def _above(fd: int, lowest: int) -> int:
    """The same file as a close-on-exec descriptor >= `lowest` (the old one closed)."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, lowest)
    os.close(fd)
    return high


def _read_fd(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


def main(argv: list[str] | None = None) -> NoReturn:
    parser = argparse.ArgumentParser(prog="python -m metald.jailer")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--spec", help="the JSON jail spec: a file, or - for stdin")
    source.add_argument(
        "--wait", action="store_true", help="a spare: wait for the job on the socket on stdin"
    )
    parser.add_argument("--error-fd", type=int, default=None, help="where to report (JSON lines)")
    args = parser.parse_args(argv)
    os.umask(0o022)
    if args.wait:
        spec_fd, reporter = _wait_for_job()
    else:
        reporter = Reporter(args.error_fd)
    try:
        text = _read_fd(spec_fd) if args.wait else _load_spec(args.spec)
        spec = JailSpec.from_json(text)
        spec.validate()
    except (ValueError, TypeError, OSError) as e:
        _fail(reporter, "spec", str(e))
    if not caps.privileged(JAILER_CAPABILITIES):
        needed = ", ".join(caps.missing(JAILER_CAPABILITIES))
        _fail(reporter, "spec", f"the jailer must run as root or with {needed}")
    run(spec, reporter)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])

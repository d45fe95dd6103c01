"""Named network namespaces (/run/netns, as iproute2 keeps them), without forking the daemon.

A name is a bind mount of a namespace on a file in /run/netns. pyroute2's own helpers fork a
child process to make one; a fork of the daemon (threads, an event loop, a database pool) is
slower and riskier than a thread switch, so namespaces are made by a short-lived thread
(host.netns.new_namespace) and named here. These functions block; the network manager calls
them from worker threads.

Names that outlive metald, whatever mount namespace it runs in. A name is a bind mount of
the namespace on a file in /run/netns, and a mount exists in one mount namespace (and in
those it propagates to). When metald runs in a mount namespace of its own — under
``ip netns exec``, ``unshare --mount``, or a systemd unit with hardening directives — a
name mounted there alone dies with metald, leaving an empty file: the namespace is gone
(or held only by a VMM inside it) and the name is stale. So:

- When our /run/netns receives mounts from a peer group we are not in (it is a slave, as
  under ``--propagation slave`` or ``ip netns exec``), names are mounted in a mount
  namespace of that peer group — found through /proc, as the one whose /run/netns is the
  master of ours — and reach ours by propagation, as ``ip netns add`` run there would.
  setns(CLONE_NEWNS) is refused to a multi-threaded process, so a short-lived child (this
  module run with ``python -I -m``: no fork of the daemon) enters that namespace and
  mounts there. Whatever propagation does, the name is then checked in our own view and
  mounted here too if it did not arrive.
- Otherwise (our /run/netns is shared, or private with no master) names are mounted here,
  as before; a private mount namespace cannot give its names to anyone, which is logged.
- A stale name (a plain file, not a namespace) never counts as a namespace: ``exists`` is
  False, entering it is a NamespaceError that says so, ``create`` replaces it, and
  ``attach`` gives it back the namespace of a live process inside (a VMM that outlived
  its name).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

from metald.host import libc
from metald.host import netns as host_netns
from metald.host.mounts import mount_holding, parse_mountinfo, read_mountinfo
from metald.host.netns import NamespaceError

RUN_DIR = Path("/run/netns")
_CHILD_TIMEOUT = 30.0

log = logging.getLogger(__name__)


def path_of(name: str) -> Path:
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"bad namespace name {name!r}")
    return RUN_DIR / name


def _path(name: str | None) -> str:
    return host_netns.OWN if name is None else str(path_of(name))


def exists(name: str) -> bool:
    """Whether the name stands for a namespace (a stale name does not)."""
    return host_netns.is_namespace(str(path_of(name)))


def is_stale(name: str) -> bool:
    """Whether the name is there but stands for no namespace (its mount was lost)."""
    path = path_of(name)
    return os.path.lexists(path) and not host_netns.is_namespace(str(path))


def list_names() -> list[str]:
    try:
        return sorted(os.listdir(RUN_DIR))
    except FileNotFoundError:
        return []


def ns_identity(name: str | None) -> tuple[int, int]:
    """(dev, inode) of a named namespace, or of the process's own for None."""
    return host_netns.identity(_path(name))


def open_fd(name: str | None) -> int:
    """An O_RDONLY fd of the named namespace (the process's own for None); caller closes."""
    return host_netns.open_namespace(_path(name))


def entered(name: str | None) -> contextlib.AbstractContextManager[None]:
    """The calling thread in the named namespace (None: the process's) for the body."""
    return host_netns.entered(_path(name))


def pids_in(name: str) -> list[int]:
    """Processes whose network namespace is the named one."""
    return host_netns.pids_in(str(path_of(name)))


def _mount(source: str, target: Path, flags: int, what: str) -> None:
    try:
        libc.mount(source, str(target), "none", flags, None)
    except OSError as e:
        raise NamespaceError(e.errno, f"{what}: {os.strerror(e.errno or 0)}") from None


def _ensure_run_dir() -> None:
    # As iproute2 does: /run/netns is a shared mount, so a namespace mounted there is seen
    # by mount namespaces made later (the jailer's) as well.
    RUN_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    for entry in read_mountinfo():
        if entry.mount_point == str(RUN_DIR) and entry.shared:
            return
    try:
        libc.mount("", str(RUN_DIR), "none", libc.MS_SHARED | libc.MS_REC, None)
    except OSError:
        _mount(str(RUN_DIR), RUN_DIR, libc.MS_BIND | libc.MS_REC, "bind mount /run/netns")
        _mount("", RUN_DIR, libc.MS_SHARED | libc.MS_REC, "share /run/netns")


# Where names are mounted -----------------------------------------------------------------


def _run_dir_propagation(mountinfo: str) -> tuple[frozenset[str], frozenset[str]]:
    entry = mount_holding(RUN_DIR, parse_mountinfo(mountinfo))
    return (frozenset(), frozenset()) if entry is None else (entry.shared, entry.master)


_host_lock = threading.Lock()
_host_mnt: list[int | None] = []  # [fd] once looked up: a mount namespace to name in, or None


def _find_host_mount_ns() -> int | None:
    """An fd of a mount namespace whose /run/netns is the master of ours, or None if names
    are to be mounted in our own (ours is not a slave, or no such namespace is found)."""
    shared, master = _run_dir_propagation(Path("/proc/self/mountinfo").read_text())
    if not master:
        if not shared:
            log.warning(
                "network namespaces: metald's mount namespace is private at %s; the names "
                "it gives namespaces there do not outlive it (after a restart they are "
                "recovered from the VMMs inside or made anew)",
                RUN_DIR,
            )
        return None
    own = os.stat("/proc/self/ns/mnt").st_ino
    pids = [os.getppid(), 1, *sorted(int(p) for p in os.listdir("/proc") if p.isdigit())]
    for pid in dict.fromkeys(pids):
        try:
            if os.stat(f"/proc/{pid}/ns/mnt").st_ino == own:
                continue
            theirs, _ = _run_dir_propagation(Path(f"/proc/{pid}/mountinfo").read_text())
            if not theirs & master:
                continue
            fd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue  # gone meanwhile, or not ours to look at
        log.info(
            "network namespaces: metald runs in a mount namespace of its own; names are "
            "mounted in the mount namespace of pid %d, whose %s propagates to ours",
            pid,
            RUN_DIR,
        )
        return fd
    log.warning(
        "network namespaces: %s in metald's mount namespace receives mounts from a peer "
        "group no process here is in; the names metald gives namespaces do not outlive it",
        RUN_DIR,
    )
    return None


def _host_mount_ns() -> int | None:
    with _host_lock:
        if not _host_mnt:
            _host_mnt.append(_find_host_mount_ns())
        return _host_mnt[0]


def _in_host_mount_ns(op: str, path: Path, mnt_fd: int, net_fd: int | None = None) -> None:
    """Run this file as a single-threaded child that enters the mount namespace and binds
    (net_fd onto path) or unbinds path there."""
    fds = [mnt_fd] + ([net_fd] if net_fd is not None else [])
    argv = [sys.executable, "-I", "-m", __name__, op, str(path), *map(str, fds)]
    try:
        done = subprocess.run(
            argv, pass_fds=fds, capture_output=True, text=True, timeout=_CHILD_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        raise NamespaceError(
            errno.ETIMEDOUT, f"{op} {path} in the host's mount namespace"
        ) from None
    if done.returncode != 0:
        raise NamespaceError(
            errno.EIO, f"{op} {path} in the host's mount namespace: {done.stderr.strip()}"
        )


def _unmount_here(path: Path) -> None:
    """Take every namespace mount off path in our mount namespace (stacked ones too)."""
    for _ in range(8):
        try:
            libc.umount2(str(path), libc.MNT_DETACH)
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.ENOENT):  # EINVAL: not a mount point (any more)
                return
            raise NamespaceError(e.errno, f"umount {path}: {os.strerror(e.errno or 0)}") from None


def _names(path: Path, net_fd: int) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    target = os.fstat(net_fd)
    return (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino)


def _bind(path: Path, net_fd: int) -> None:
    """Make the (existing) file at path name the namespace of net_fd, in the host's mount
    namespace when metald is not in it, and in ours."""
    host = _host_mount_ns()
    if host is not None:
        _in_host_mount_ns("bind", path, host, net_fd)
    if _names(path, net_fd):
        return  # propagated to us
    _unmount_here(path)  # whatever stale mount is there
    _mount(f"/proc/self/fd/{net_fd}", path, libc.MS_BIND, "bind netns")


def _unbind(path: Path) -> None:
    host = _host_mount_ns()
    if host is not None:
        _in_host_mount_ns("unbind", path, host)
    _unmount_here(path)


def _prepare_dir() -> None:
    if _host_mount_ns() is None:
        _ensure_run_dir()
    else:
        RUN_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)  # the child shares it there


def _name(path: Path, net_fd: int) -> None:
    """Create the file at path (it must not exist) and make it name net_fd's namespace;
    nothing is left if that fails."""
    os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0))
    try:
        _bind(path, net_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            _unbind(path)
        with contextlib.suppress(OSError):
            path.unlink()
        raise


def create(name: str) -> bool:
    """Create the named namespace; False if it already exists (it is left alone). A stale
    name (its namespace lost) is replaced by a new namespace."""
    path = path_of(name)
    if exists(name):
        return False
    _prepare_dir()
    if is_stale(name):
        log.warning("network namespace %s was lost (a stale name); making it anew", name)
        remove(name)
    net_fd = host_netns.new_namespace()
    try:
        _name(path, net_fd)
    except FileExistsError:
        return False  # made meanwhile by someone else
    finally:
        os.close(net_fd)
    return True


def attach(name: str, pid: int) -> bool:
    """Make the name stand for the network namespace of process pid (a VMM that outlived
    its namespace's name); False if it already does. The caller vouches for the pid."""
    path = path_of(name)
    try:
        net_fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NamespaceError(errno.ESRCH, f"process {pid} is gone") from None
    try:
        if _names(path, net_fd):
            return False
        if host_netns.is_own(net_fd):
            raise NamespaceError(errno.EINVAL, f"process {pid} is in metald's own namespace")
        _prepare_dir()
        if os.path.lexists(path):
            remove(name)
        _name(path, net_fd)
    finally:
        os.close(net_fd)
    return True


def remove(name: str) -> bool:
    """Unmount and delete the named namespace (or a stale name); False if it did not exist.
    Processes still inside keep it alive (without a name) until they exit."""
    path = path_of(name)
    if not os.path.lexists(path):
        return False
    _unbind(path)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return True


# The child that mounts in another mount namespace ------------------------------------------


def _child_main(argv: list[str]) -> int:
    """``netns.py bind PATH MNT_FD NET_FD`` / ``netns.py unbind PATH MNT_FD``: enter the
    mount namespace MNT_FD (allowed: this process has one thread) and there make PATH name
    NET_FD's namespace, or take the name's mount off."""
    op, path, mnt_fd = argv[0], Path(argv[1]), int(argv[2])
    try:
        libc.setns(mnt_fd, libc.CLONE_NEWNS)
        if op == "bind":
            net_fd = int(argv[3])
            _ensure_run_dir()
            os.close(os.open(path, os.O_RDONLY | os.O_CREAT, 0))
            if not _names(path, net_fd):
                _unmount_here(path)
                _mount(f"/proc/self/fd/{net_fd}", path, libc.MS_BIND, "bind")
        elif op == "unbind":
            _unmount_here(path)
        else:
            raise ValueError(f"unknown operation {op!r}")
    except (OSError, ValueError) as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))

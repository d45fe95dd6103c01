"""Named network namespaces (/run/netns, as iproute2 keeps them), without forking.

setns(2) and unshare(CLONE_NEWNET) act on the calling thread only, so a worker thread can
step into a namespace, open a netlink socket there (a socket stays in the namespace it was
made in) and step back. pyroute2's own helpers fork a child process for this; a fork of the
daemon (threads, an event loop, a database pool) is slower and riskier than a thread switch.

These functions block; the network manager calls them from worker threads
(asyncio.to_thread). A thread that cannot get back to its namespace is a bug we cannot
recover from safely, so it raises NamespaceError and ``ensure_home`` is checked on entry to
every operation.

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
  file run as a script: stdlib only, no fork of the daemon) enters that namespace and
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
import ctypes
import errno
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

CLONE_NEWNET = 0x40000000
CLONE_NEWNS = 0x00020000
MS_BIND = 4096
MS_REC = 16384
MS_SHARED = 1 << 20
MNT_DETACH = 2

RUN_DIR = Path("/run/netns")

# The C library's symbols are the process's own (no find_library: it runs ldconfig).
_libc = ctypes.CDLL(None, use_errno=True)
_CHILD_TIMEOUT = 30.0

log = logging.getLogger(__name__)


class NamespaceError(OSError):
    pass


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise NamespaceError(err, f"{what}: {os.strerror(err)}")


def path_of(name: str) -> Path:
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"bad namespace name {name!r}")
    return RUN_DIR / name


def _nsfs_dev() -> int:
    return os.stat("/proc/self/ns/net").st_dev


def _is_namespace(path: Path) -> bool:
    """Whether path is a namespace (a mount of nsfs), not a plain file."""
    try:
        return os.stat(path).st_dev == _nsfs_dev()
    except OSError:
        return False


def exists(name: str) -> bool:
    """Whether the name stands for a namespace (a stale name does not)."""
    return _is_namespace(path_of(name))


def is_stale(name: str) -> bool:
    """Whether the name is there but stands for no namespace (its mount was lost)."""
    path = path_of(name)
    return os.path.lexists(path) and not _is_namespace(path)


def list_names() -> list[str]:
    try:
        return sorted(os.listdir(RUN_DIR))
    except FileNotFoundError:
        return []


def _process_ns() -> tuple[int, int]:
    st = os.stat("/proc/self/ns/net")  # /proc/self is the thread group leader
    return st.st_dev, st.st_ino


def _thread_ns() -> tuple[int, int]:
    st = os.stat("/proc/thread-self/ns/net")
    return st.st_dev, st.st_ino


def ensure_home() -> None:
    """Put the calling thread back in the process's namespace if it is anywhere else."""
    if _thread_ns() != _process_ns():
        fd = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _check(_libc.setns(fd, CLONE_NEWNET), "setns back to the process namespace")
        finally:
            os.close(fd)


def ns_identity(name: str | None) -> tuple[int, int]:
    """(dev, inode) of a named namespace, or of the process's own for None."""
    st = os.stat(path_of(name) if name is not None else "/proc/self/ns/net")
    return st.st_dev, st.st_ino


def open_fd(name: str | None) -> int:
    """An O_RDONLY fd of the named namespace (the process's own for None); caller closes."""
    path = path_of(name) if name is not None else Path("/proc/self/ns/net")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NamespaceError(errno.ENOENT, f"network namespace {name} does not exist") from None
    if os.fstat(fd).st_dev != _nsfs_dev():
        os.close(fd)
        raise NamespaceError(
            errno.ENOENT, f"network namespace {name} was lost (its name is a stale empty file)"
        )
    return fd


@contextlib.contextmanager
def entered(name: str | None) -> Iterator[None]:
    """Run the body with the calling thread in the named namespace (None: the process's)."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = open_fd(name)
        try:
            _check(_libc.setns(target, CLONE_NEWNET), f"setns {name}")
        finally:
            os.close(target)
        try:
            yield
        finally:
            _check(_libc.setns(home, CLONE_NEWNET), "setns back")
    finally:
        os.close(home)


def _ensure_run_dir() -> None:
    # As iproute2 does: /run/netns is a shared mount, so a namespace mounted there is seen
    # by mount namespaces made later (the jailer's) as well.
    RUN_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    for mountinfo in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = mountinfo.split()
        if len(fields) > 6 and fields[4] == str(RUN_DIR) and "shared:" in mountinfo:
            return
    d = str(RUN_DIR).encode()
    if _libc.mount(b"", d, b"none", MS_SHARED | MS_REC, None) != 0:
        _check(_libc.mount(d, d, b"none", MS_BIND | MS_REC, None), "bind mount /run/netns")
        _check(_libc.mount(b"", d, b"none", MS_SHARED | MS_REC, None), "share /run/netns")


# Where names are mounted -----------------------------------------------------------------


def _run_dir_propagation(mountinfo: str) -> tuple[set[str], set[str]]:
    """(shared peer group ids, master ids) of the mount that holds /run/netns in a
    mountinfo text: the deepest mount point on the path, the last one mounted there."""
    best: list[str] | None = None
    best_len = -1
    target = str(RUN_DIR)
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) < 7:
            continue
        point = fields[4]
        on_path = target == point or target.startswith(point.rstrip("/") + "/")
        if on_path and len(point) >= best_len:
            best, best_len = fields, len(point)
    if best is None:
        return set(), set()
    optional = best[6 : best.index("-")] if "-" in best else []
    shared = {f.split(":", 1)[1] for f in optional if f.startswith("shared:")}
    master = {f.split(":", 1)[1] for f in optional if f.startswith("master:")}
    return shared, master


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
    argv = [sys.executable, "-I", "-S", __file__, op, str(path), *map(str, fds)]
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
        if _libc.umount2(str(path).encode(), MNT_DETACH) != 0:
            err = ctypes.get_errno()
            if err in (errno.EINVAL, errno.ENOENT):  # EINVAL: not a mount point (any more)
                return
            raise NamespaceError(err, f"umount {path}: {os.strerror(err)}")


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
    src = f"/proc/self/fd/{net_fd}".encode()
    _check(_libc.mount(src, str(path).encode(), b"none", MS_BIND, None), "bind netns")


def _unbind(path: Path) -> None:
    host = _host_mount_ns()
    if host is not None:
        _in_host_mount_ns("unbind", path, host)
    _unmount_here(path)


def _new_namespace() -> int:
    """An fd of a new network namespace, made by a short-lived thread that unshares into it
    and ends there, so no pool thread is ever left in a namespace it did not choose."""
    fds: list[int] = []
    error: list[BaseException] = []

    def make() -> None:
        try:
            _check(_libc.unshare(CLONE_NEWNET), "unshare")
            fds.append(os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC))
        except BaseException as exc:
            error.append(exc)

    t = threading.Thread(target=make, name="netns-create")
    t.start()
    t.join()
    if error:
        raise error[0]
    return fds[0]


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
    net_fd = _new_namespace()
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
        if net_fd_is_own(net_fd):
            raise NamespaceError(errno.EINVAL, f"process {pid} is in metald's own namespace")
        _prepare_dir()
        if os.path.lexists(path):
            remove(name)
        _name(path, net_fd)
    finally:
        os.close(net_fd)
    return True


def net_fd_is_own(net_fd: int) -> bool:
    st, own = os.fstat(net_fd), os.stat("/proc/self/ns/net")
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


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


def pids_in(name: str) -> list[int]:
    """Processes whose network namespace is the named one."""
    try:
        ident = ns_identity(name)
    except FileNotFoundError:
        return []
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == ident:
            found.append(int(entry))
    return found


# The child that mounts in another mount namespace ------------------------------------------


def _child_main(argv: list[str]) -> int:
    """``netns.py bind PATH MNT_FD NET_FD`` / ``netns.py unbind PATH MNT_FD``: enter the
    mount namespace MNT_FD (allowed: this process has one thread) and there make PATH name
    NET_FD's namespace, or take the name's mount off."""
    op, path, mnt_fd = argv[0], Path(argv[1]), int(argv[2])
    try:
        _check(_libc.setns(mnt_fd, CLONE_NEWNS), "setns to the mount namespace")
        if op == "bind":
            net_fd = int(argv[3])
            _ensure_run_dir()
            os.close(os.open(path, os.O_RDONLY | os.O_CREAT, 0))
            if not _names(path, net_fd):
                _unmount_here(path)
                src = f"/proc/self/fd/{net_fd}".encode()
                _check(_libc.mount(src, str(path).encode(), b"none", MS_BIND, None), "bind")
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

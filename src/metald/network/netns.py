"""Named network namespaces (/run/netns, as iproute2 keeps them), without forking.

setns(2) and unshare(CLONE_NEWNET) act on the calling thread only, so a worker thread can
step into a namespace, open a netlink socket there (a socket stays in the namespace it was
made in) and step back. pyroute2's own helpers fork a child process for this; a fork of the
daemon (threads, an event loop, a database pool) is slower and riskier than a thread switch.

These functions block; the network manager calls them from worker threads
(asyncio.to_thread). A thread that cannot get back to its namespace is a bug we cannot
recover from safely, so it raises NamespaceError and ``ensure_home`` is checked on entry to
every operation.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import threading
from collections.abc import Iterator
from pathlib import Path

CLONE_NEWNET = 0x40000000
MS_BIND = 4096
MS_REC = 16384
MS_SHARED = 1 << 20
MNT_DETACH = 2

RUN_DIR = Path("/run/netns")

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


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


def exists(name: str) -> bool:
    return path_of(name).exists()


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
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NamespaceError(errno.ENOENT, f"network namespace {name} does not exist") from None


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


def create(name: str) -> bool:
    """Create the named namespace; False if it already exists (it is left alone)."""
    path = path_of(name)
    _ensure_run_dir()
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0))
    except FileExistsError:
        return False
    error: list[BaseException] = []

    def make() -> None:
        # A short-lived thread: it unshares into the new namespace, binds it to the file,
        # and ends there, so no pool thread is ever left in a namespace it did not choose.
        try:
            _check(_libc.unshare(CLONE_NEWNET), "unshare")
            src = b"/proc/thread-self/ns/net"
            _check(_libc.mount(src, str(path).encode(), b"none", MS_BIND, None), "bind netns")
        except BaseException as exc:
            error.append(exc)

    t = threading.Thread(target=make, name=f"netns-create-{name}")
    t.start()
    t.join()
    if error:
        with contextlib.suppress(OSError):
            path.unlink()
        raise error[0]
    return True


def remove(name: str) -> bool:
    """Unmount and delete the named namespace; False if it did not exist. Processes still
    inside keep it alive (without a name) until they exit."""
    path = path_of(name)
    if not path.exists():
        return False
    if _libc.umount2(str(path).encode(), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):  # EINVAL: not a mount point (half made)
            raise NamespaceError(err, f"umount {path}: {os.strerror(err)}")
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

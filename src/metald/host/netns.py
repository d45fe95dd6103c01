"""Entering a network namespace from the calling thread.

setns(2) with CLONE_NEWNET acts on the calling thread only, so metald runs namespace work in
a thread that enters, works and comes back (``entered``) or in a short-lived thread that
enters, works and ends (``run_in``): no pooled thread is ever left in a namespace it did not
choose. The jailer helper (single-threaded) enters the VM's namespace for good before it
becomes the VMM. A thread that cannot get back to its namespace is a bug we cannot recover
from safely: it raises NamespaceError, and ``ensure_home`` puts a thread back first.

A path names a namespace only when it is a mount of nsfs: a /run/netns entry whose mount
was lost is a plain empty file (a stale name), and entering it is a NamespaceError that
says so, never EINVAL from deep inside setns.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

from metald.host import libc

_T = TypeVar("_T")

OWN = "/proc/self/ns/net"  # /proc/self is the thread group leader: the process's namespace


class NamespaceError(OSError):
    pass


def _nsfs_dev() -> int:
    return os.stat(OWN).st_dev


def is_namespace(path: str) -> bool:
    """Whether path is a network namespace (a mount of nsfs), not a plain or missing file."""
    try:
        return os.stat(path).st_dev == _nsfs_dev()
    except OSError:
        return False


def open_namespace(path: str) -> int:
    """An O_RDONLY fd of the namespace at path (the caller closes it); NamespaceError if
    there is none, or only a stale name."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NamespaceError(errno.ENOENT, f"network namespace {path} does not exist") from None
    if os.fstat(fd).st_dev != _nsfs_dev():
        os.close(fd)
        raise NamespaceError(
            errno.ENOENT, f"network namespace {path} was lost (its name is a stale empty file)"
        )
    return fd


def _setns(fd: int, what: str) -> None:
    try:
        libc.setns(fd, libc.CLONE_NEWNET)
    except OSError as e:
        raise NamespaceError(e.errno, f"setns {what}: {os.strerror(e.errno or 0)}") from None


def enter(path: str) -> None:
    """Move the calling thread into the network namespace at `path` (a /run/netns entry or
    a /proc/<pid>/ns/net link) for good."""
    fd = open_namespace(path)
    try:
        _setns(fd, path)
    finally:
        os.close(fd)


def identity(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def ensure_home() -> None:
    """Put the calling thread back in the process's namespace if it is anywhere else."""
    if identity("/proc/thread-self/ns/net") != identity(OWN):
        fd = os.open(OWN, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(fd, "back to the process namespace")
        finally:
            os.close(fd)


@contextlib.contextmanager
def entered(path: str) -> Iterator[None]:
    """Run the body with the calling thread in the namespace at path, then come back."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        enter(path)
        try:
            yield
        finally:
            _setns(home, "back")
    finally:
        os.close(home)


def run_in(path: str, work: Callable[[], _T]) -> _T:
    """Run `work` in a fresh thread that has entered the namespace at `path`; its result or
    its exception. Blocking: call it from a worker thread in async code."""
    result: list[_T] = []
    failure: list[BaseException] = []

    def thread() -> None:
        try:
            enter(path)
            result.append(work())
        except BaseException as e:
            failure.append(e)

    t = threading.Thread(target=thread, name="metald-netns", daemon=True)
    t.start()
    t.join()
    if failure:
        raise failure[0]
    return result[0]


def new_namespace() -> int:
    """An fd of a new network namespace, made by a short-lived thread that unshares into it
    and ends there."""
    fds: list[int] = []
    failure: list[BaseException] = []

    def make() -> None:
        try:
            libc.unshare(libc.CLONE_NEWNET)
            fds.append(os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC))
        except OSError as e:
            failure.append(NamespaceError(e.errno, f"unshare: {os.strerror(e.errno or 0)}"))
        except BaseException as e:
            failure.append(e)

    t = threading.Thread(target=make, name="metald-netns-create")
    t.start()
    t.join()
    if failure:
        raise failure[0]
    return fds[0]


def is_own(net_fd: int) -> bool:
    """Whether net_fd is the process's own network namespace."""
    st = os.fstat(net_fd)
    return (st.st_dev, st.st_ino) == identity(OWN)


def pids_in(path: str) -> list[int]:
    """Processes whose network namespace is the one at path."""
    try:
        ident = identity(path)
    except FileNotFoundError:
        return []
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if identity(f"/proc/{entry}/ns/net") == ident:
                found.append(int(entry))
        except OSError:
            continue
    return found

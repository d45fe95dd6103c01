"""Connecting to a control socket that a VMM made, without following what it may have
planted.

A jailed VMM makes its control socket in its writable /run, a directory its own (untrusted)
user owns, so a compromised VMM could put a symlink there (to, say, another daemon's socket)
for metald to connect to as root. The socket is therefore opened O_PATH|O_NOFOLLOW, checked to
be a socket owned by the expected user, and connected to through /proc/self/fd/<n> while that
descriptor is held: the inode checked is the inode connected to. (This also keeps the
connect()ed path short, whatever the jail base.)
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path


class UnsafeSocket(OSError):
    """The control socket path holds something else than a socket of the expected owner."""


def open_socket_path(path: Path, owner_uid: int) -> int:
    """An O_PATH descriptor of the socket at `path` (never through a symlink), checked to be
    a socket owned by `owner_uid`. Connect to it as `fd_path(fd)`, then close it. Raises
    FileNotFoundError while it does not exist yet, UnsafeSocket for anything else found
    there."""
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISSOCK(st.st_mode):
            kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a socket"
            raise UnsafeSocket(errno.EPERM, f"the control socket is {kind}")
        if st.st_uid != owner_uid:
            raise UnsafeSocket(
                errno.EPERM, f"the control socket is owned by uid {st.st_uid}, not {owner_uid}"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def fd_path(fd: int) -> str:
    """The path that reaches the inode behind `fd` (valid while `fd` is open)."""
    return f"/proc/self/fd/{fd}"


def open_fifo_for_reading(path: Path, owner_uid: int) -> int:
    """A non-blocking read descriptor of the FIFO at `path` (never through a symlink),
    checked to be a FIFO owned by `owner_uid` (a file a VMM writes its metrics to)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISFIFO(st.st_mode):
            raise UnsafeSocket(errno.EPERM, f"{path.name} is not a FIFO")
        if st.st_uid != owner_uid:
            raise UnsafeSocket(
                errno.EPERM, f"{path.name} is owned by uid {st.st_uid}, not {owner_uid}"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd

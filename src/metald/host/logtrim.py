"""Cutting a log file that another process appends to back to its newest part, in place.

Why: a VMM appends its guest's console (and its own stderr) to files metald must keep
bounded, without stopping the VMM or taking its descriptor away. A writer with O_APPEND
writes at the end wherever the end is, so the file can be shortened under it:

- FALLOC_FL_COLLAPSE_RANGE (ext4, xfs) removes the oldest whole blocks atomically with the
  writer's appends: nothing new is lost;
- elsewhere the newest bytes are copied, the file is truncated and they are written back:
  what the writer appends between the copy and the truncation is lost (a flooding guest's
  output, by definition too much to keep).

The file is opened without following a symbolic link and must be a regular file with one
link owned by `owner` (when given): the directory is the VMM's, and whatever it put there
in the log's place is left alone.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat

FALLOC_FL_COLLAPSE_RANGE = 0x08

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


class NotALog(OSError):
    """The path is not a log this module may cut (a link, another owner's file, ...)."""


def _collapse(fd: int, length: int) -> bool:
    if _libc.fallocate(fd, FALLOC_FL_COLLAPSE_RANGE, 0, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS, errno.EPERM):
        return False
    raise OSError(err, f"fallocate: {os.strerror(err)}")


def trim_log(path: str | os.PathLike[str], max_bytes: int, owner: int | None = None) -> int:
    """If the file holds more than `max_bytes`, cut it back to about its newest half.
    Returns how many bytes went (0: nothing to do or no such file). Raises NotALog for a
    file it must not touch."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return 0
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise NotALog(errno.ELOOP, f"{os.fspath(path)} is a symbolic link") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            raise NotALog(errno.EPERM, f"{os.fspath(path)} is not a regular file with one link")
        if owner is not None and st.st_uid != owner:
            raise NotALog(errno.EPERM, f"{os.fspath(path)} is not owned by uid {owner}")
        if st.st_size <= max_bytes:
            return 0
        keep = max_bytes // 2
        block = max(st.st_blksize, 4096)
        drop = (st.st_size - keep) // block * block
        if drop > 0 and _collapse(fd, drop):
            return drop
        # Elsewhere: copy the newest bytes, truncate, write them back.
        tail = os.pread(fd, keep, st.st_size - keep)
        os.ftruncate(fd, 0)
        os.pwrite(fd, tail, 0)
        return st.st_size - len(tail)
    finally:
        os.close(fd)

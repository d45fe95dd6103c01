"""Reading a VM's console log for its owner (the GetVmConsole RPC), safely.

The log lives in the VMM's run directory, which the VMM itself can write: a compromised VMM
could put a symlink, a FIFO or a hard link to another file where the log was, and metald
(root) would read that file on the tenant's behalf. So the directory is opened without
following a link, the log inside it without following one and without blocking (a FIFO
would block), and only a regular file with one link is read (Linux's protected_hardlinks
keeps the VMM's user from linking files it cannot read, but one link is the plain rule).

Offsets are byte offsets into the log; a negative one counts from the end (a tail).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from metald.core.models import ConsoleChunk


class UnsafeConsole(Exception):
    """The log is not a plain file metald may read (the message says what it is)."""


def read_console(log: Path, offset: int, max_bytes: int) -> ConsoleChunk:
    """At most `max_bytes` from `offset` (negative: from that many bytes before the end;
    past the end: from 0, the log was started anew). No log: an empty chunk at 0."""
    fd = _open_log(log)
    if fd is None:
        return ConsoleChunk(data=b"", offset=0, next_offset=0, size=0)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeConsole("the console log is not a regular file")
        if st.st_nlink != 1:
            raise UnsafeConsole("the console log has other hard links")
        size = st.st_size
        if offset < 0:
            start = max(0, size + offset)
        elif offset > size:
            start = 0
        else:
            start = offset
        data = os.pread(fd, max(0, min(max_bytes, size - start)), start)
    finally:
        os.close(fd)
    return ConsoleChunk(data=data, offset=start, next_offset=start + len(data), size=size)


def _open_log(log: Path) -> int | None:
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        dir_fd = os.open(log.parent, flags | os.O_DIRECTORY)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafeConsole("the console log's directory is not a plain directory") from None
        raise
    try:
        return os.open(log.name, flags | os.O_NONBLOCK, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafeConsole("the console log is a symbolic link") from None
        raise
    finally:
        os.close(dir_fd)

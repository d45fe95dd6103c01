"""Files: opening a file once, without following a symbolic link anywhere on its path, and
passing on THAT open file (a hard link made from the descriptor, a copy from it) instead of
its name; and atomic writes.

Why: a name can be re-pointed between the moment it is checked and the moment it is used (a
symlink or a rename swapped in). What is checked here is an open descriptor's ``fstat``, and
what is used afterwards is the same descriptor, so nothing swapped in later reaches its user.

Two mechanisms, the same answers:

- ``openat2(2)`` with RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS (and RESOLVE_BENEATH below
  a directory): the kernel refuses a symlink in any component (ELOOP) and an escape (EXDEV);
- where openat2 is missing (ENOSYS: kernels before 5.6, some sandboxes) a walk: one
  ``O_PATH | O_NOFOLLOW | O_DIRECTORY`` descriptor per directory, each opened relative to the
  one before, and the last component opened with O_NOFOLLOW. :func:`walk_beneath` always
  walks, so its caller can check every directory on the way (:class:`Walked`).

A symlink anywhere is OSError(ELOOP), '..' or an absolute path below a directory is
OSError(EXDEV), whichever mechanism ran. Standard library and ctypes only: the jailer helper
imports this before it builds the jail.

:func:`write_atomic`: a reader (or a metald started after a crash) sees the old content or the
new one, never half of either.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

AT_FDCWD = -100
AT_SYMLINK_FOLLOW = 0x400
AT_EMPTY_PATH = 0x1000

RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08

# openat2 has the same number on every architecture (the unified system call table).
SYS_OPENAT2 = 437

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.linkat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
_libc.linkat.restype = ctypes.c_int


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


# Set to False by tests (and by the first ENOSYS) to run the walk instead of openat2.
use_openat2 = True


def _openat2(dir_fd: int, path: str, flags: int, resolve: int) -> int:
    how = _OpenHow(flags, 0, resolve)
    fd = _libc.syscall(
        ctypes.c_long(SYS_OPENAT2),
        ctypes.c_int(dir_fd),
        ctypes.c_char_p(os.fsencode(path)),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(fd)


def _components(path: str) -> list[str]:
    """The names on a relative path ('.' and empty ones dropped); '..' is EXDEV."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise OSError(errno.EXDEV, "'..' is not allowed", path)
    return parts


@dataclass
class Walked:
    """An open file found by :func:`walk_beneath`, and the directories it was found in (the
    start directory first), as fstat saw them while they were open."""

    fd: int
    stat: os.stat_result
    dirs: list[os.stat_result]


def walk_beneath(
    dir_fd: int,
    path: str,
    flags: int = os.O_RDONLY,
    *,
    check_dir: Callable[[os.stat_result], None] | None = None,
) -> Walked:
    """Open ``path`` (relative) below the directory ``dir_fd`` one component at a time,
    following no symlink (ELOOP) and never leaving it ('..': EXDEV). ``check_dir`` sees each
    directory's fstat before anything in it is opened (it raises to stop the walk)."""
    if path.startswith("/"):
        raise OSError(errno.EXDEV, "an absolute path below a directory", path)
    parts = _components(path)
    if not parts:
        raise OSError(errno.EISDIR, "no file named", path)
    current = os.dup(dir_fd)
    dirs: list[os.stat_result] = []
    try:
        for name in parts[:-1]:
            st = os.fstat(current)
            if check_dir is not None:
                check_dir(st)
            dirs.append(st)
            try:
                nxt = os.open(
                    name,
                    os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC,
                    dir_fd=current,
                )
            except OSError as e:
                raise _explain(e, current, name, path) from None
            os.close(current)
            current = nxt
        st = os.fstat(current)
        if check_dir is not None:
            check_dir(st)
        dirs.append(st)
        try:
            fd = os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=current)
        except OSError as e:
            raise _explain(e, current, parts[-1], path) from None
    finally:
        os.close(current)
    return Walked(fd=fd, stat=_not_a_symlink(fd, path), dirs=dirs)


def _not_a_symlink(fd: int, path: str) -> os.stat_result:
    """The fstat of a new descriptor; ELOOP (and closed) if it is a symlink itself (what
    O_PATH | O_NOFOLLOW opens a trailing symlink as)."""
    st = os.fstat(fd)
    if stat.S_ISLNK(st.st_mode):
        os.close(fd)
        raise OSError(errno.ELOOP, "a symbolic link on the path", path)
    return st


def _explain(error: OSError, dir_fd: int, name: str, path: str) -> OSError:
    """ELOOP for a symlink (O_NOFOLLOW | O_DIRECTORY on one says ENOTDIR), else the error."""
    if error.errno in (errno.ENOTDIR, errno.ELOOP):
        with contextlib.suppress(OSError):
            if stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                return OSError(errno.ELOOP, "a symbolic link on the path", path)
    return OSError(error.errno, error.strerror, path)


def open_beneath(dir_fd: int, path: str, flags: int = os.O_RDONLY) -> int:
    """Open ``path`` (relative) below the directory ``dir_fd``: no symlink, no escape."""
    global use_openat2
    if use_openat2:
        if path.startswith("/"):
            raise OSError(errno.EXDEV, "an absolute path below a directory", path)
        _components(path)
        try:
            fd = _openat2(
                dir_fd,
                path,
                flags | os.O_NOFOLLOW | os.O_CLOEXEC,
                RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS,
            )
            _not_a_symlink(fd, path)
            return fd
        except OSError as e:
            if e.errno != errno.ENOSYS:
                raise
            use_openat2 = False
    return walk_beneath(dir_fd, path, flags).fd


def open_no_symlinks(path: str, flags: int = os.O_RDONLY) -> int:
    """Open an absolute path with no symlink in any of its components (ELOOP if one is)."""
    if not path.startswith("/"):
        raise OSError(errno.EINVAL, "not an absolute path", path)
    global use_openat2
    root = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if use_openat2:
            try:
                fd = _openat2(
                    root,
                    path,
                    flags | os.O_NOFOLLOW | os.O_CLOEXEC,
                    RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS,
                )
                _not_a_symlink(fd, path)
                return fd
            except OSError as e:
                if e.errno != errno.ENOSYS:
                    raise
                use_openat2 = False
        return walk_beneath(root, path.lstrip("/") or ".", flags).fd
    finally:
        os.close(root)


def fd_path(fd: int) -> str:
    """The open file as a path that names exactly it (a magic link: no lookup by name)."""
    return f"/proc/self/fd/{fd}"


def link_fd(fd: int, dest: str, *, dest_dir_fd: int = AT_FDCWD) -> None:
    """Give the open file ``fd`` a new name ``dest`` (a hard link of that very inode).

    linkat(fd, "", AT_EMPTY_PATH) needs CAP_DAC_READ_SEARCH; without it the magic link
    /proc/self/fd/N is followed instead (AT_SYMLINK_FOLLOW), which the kernel allows for an
    open file the caller may link (fs.protected_hardlinks: one it owns or may read and write).
    """
    if _libc.linkat(fd, b"", dest_dir_fd, os.fsencode(dest), AT_EMPTY_PATH) == 0:
        return
    err = ctypes.get_errno()
    if err not in (errno.ENOENT, errno.EPERM, errno.EACCES):
        raise OSError(err, os.strerror(err), dest)
    link_fd_by_proc(fd, dest, dest_dir_fd=dest_dir_fd)


def link_fd_by_proc(fd: int, dest: str, *, dest_dir_fd: int = AT_FDCWD) -> None:
    """:func:`link_fd` through the magic link /proc/self/fd/N (no capability needed)."""
    source = os.fsencode(fd_path(fd))
    if _libc.linkat(AT_FDCWD, source, dest_dir_fd, os.fsencode(dest), AT_SYMLINK_FOLLOW) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), dest)


def same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def writable_by_others(st: os.stat_result) -> bool:
    """Group- or world-writable."""
    return bool(st.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def write_atomic(path: Path, text: str, mode: int = 0o600, *, sync: bool = True) -> None:
    """Write `text` to a temporary file beside `path`, flush it to disk, and rename it over
    `path`. `sync=False` skips the flush: the rename is as atomic for a reader or a crashed
    metald (the page cache outlives a process), and `sync_file` makes it durable later, off
    the event loop, while other work goes on (an fsync takes milliseconds, more on a busy
    disk)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def sync_file(path: Path) -> None:
    """Flush a file written with `write_atomic(..., sync=False)` to disk (blocking)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

"""metald.host.files: opening without symlinks, and using the open file (not its name), with
real files; races are staged deterministically (between two steps, or from the walk's own
directory check, which runs between two components)."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from metald.host import files


@pytest.fixture(params=["openat2", "walk"])
def mechanism(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Every open test runs with openat2 and with the O_PATH walk."""
    monkeypatch.setattr(files, "use_openat2", request.param == "openat2")
    yield str(request.param)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """root/{a/b/file, a/link-file -> b/file, a/link-dir -> b, outside-link -> ../secret}."""
    (tmp_path / "secret").write_bytes(b"secret")
    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "file").write_bytes(b"original")
    (root / "a" / "link-file").symlink_to("b/file")
    (root / "a" / "link-dir").symlink_to("b")
    (root / "outside-link").symlink_to("../secret")
    return root


def _dir_fd(path: Path) -> int:
    return os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def _read(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 100)


def test_open_beneath_opens_a_plain_path(tree: Path, mechanism: str) -> None:
    d = _dir_fd(tree)
    try:
        for path in ("a/b/file", "./a//b/file"):
            fd = files.open_beneath(d, path)
            try:
                assert _read(fd) == b"original"
                assert files.same_file(os.fstat(fd), os.stat(tree / "a/b/file"))
            finally:
                os.close(fd)
    finally:
        os.close(d)


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("a/link-file", errno.ELOOP),
        ("a/link-dir/file", errno.ELOOP),
        ("outside-link", errno.ELOOP),
        ("a/../a/b/file", errno.EXDEV),
        ("../secret", errno.EXDEV),
        ("/etc/passwd", errno.EXDEV),
        ("a/missing", errno.ENOENT),
        ("a/b/file/x", errno.ENOTDIR),
    ],
)
def test_open_beneath_refuses(tree: Path, mechanism: str, path: str, code: int) -> None:
    d = _dir_fd(tree)
    try:
        with pytest.raises(OSError) as err:
            files.open_beneath(d, path)
        assert err.value.errno == code
    finally:
        os.close(d)


def test_open_no_symlinks(tree: Path, tmp_path: Path, mechanism: str) -> None:
    fd = files.open_no_symlinks(str(tree / "a/b/file"))
    assert _read(fd) == b"original"
    os.close(fd)
    for bad in (tree / "a/link-file", tree / "a/link-dir/file", tree / "outside-link"):
        with pytest.raises(OSError) as err:
            files.open_no_symlinks(str(bad))
        assert err.value.errno == errno.ELOOP
    # A symlink high up on the path counts as much as one at the end.
    (tmp_path / "alias").symlink_to(tree)
    with pytest.raises(OSError) as err:
        files.open_no_symlinks(str(tmp_path / "alias/a/b/file"))
    assert err.value.errno == errno.ELOOP
    with pytest.raises(OSError):
        files.open_no_symlinks("relative/path")


def test_o_path_of_a_trailing_symlink_is_refused(tree: Path, mechanism: str) -> None:
    """O_PATH | O_NOFOLLOW would open the symlink itself: refused as well."""
    d = _dir_fd(tree)
    try:
        with pytest.raises(OSError) as err:
            files.open_beneath(d, "a/link-file", os.O_PATH)
        assert err.value.errno == errno.ELOOP
    finally:
        os.close(d)


def test_a_swap_during_the_walk_is_not_followed(tree: Path, tmp_path: Path) -> None:
    """The race: between opening `a` and looking up `b` in it, `b` becomes a symlink out of
    the tree. The walk holds `a` open and looks `b` up without following: ELOOP."""
    d = _dir_fd(tree)
    seen: list[int] = []

    def swap_once(st: os.stat_result) -> None:
        seen.append(st.st_ino)
        if len(seen) == 2:  # `a` is open; `b` is looked up next
            os.rename(tree / "a/b", tmp_path / "b-moved")
            (tree / "a/b").symlink_to(tmp_path / "b-moved")

    try:
        with pytest.raises(OSError) as err:
            files.walk_beneath(d, "a/b/file", check_dir=swap_once)
        assert err.value.errno == errno.ELOOP
    finally:
        os.close(d)


def test_walk_reports_and_checks_every_directory(tree: Path) -> None:
    d = _dir_fd(tree)
    try:
        walked = files.walk_beneath(d, "a/b/file")
        os.close(walked.fd)
        assert [s.st_ino for s in walked.dirs] == [
            os.stat(p).st_ino for p in (tree, tree / "a", tree / "a/b")
        ]
        assert files.same_file(walked.stat, os.stat(tree / "a/b/file"))

        def refuse_b(st: os.stat_result) -> None:
            if st.st_ino == os.stat(tree / "a/b").st_ino:
                raise PermissionError("b is not trusted")

        with pytest.raises(PermissionError):
            files.walk_beneath(d, "a/b/file", check_dir=refuse_b)
    finally:
        os.close(d)


@pytest.mark.parametrize("how", ["empty_path", "proc"])
def test_the_open_file_is_what_is_linked_after_a_swap(tree: Path, tmp_path: Path, how: str) -> None:
    """Open, then the name is swapped (rename of another file over it, then a symlink):
    the link made from the descriptor is the original inode with the original bytes."""
    name = tree / "a/b/file"
    original = os.stat(name)
    fd = files.open_no_symlinks(str(name))
    try:
        (tmp_path / "evil").write_bytes(b"evil")
        os.rename(name, tmp_path / "old")  # rename-swap: the original moves away,
        os.rename(tmp_path / "evil", name)  # another file takes its name
        assert name.read_bytes() == b"evil"
        link = files.link_fd if how == "empty_path" else files.link_fd_by_proc
        link(fd, str(tmp_path / "pinned"))
        name.unlink()
        name.symlink_to(tmp_path / "secret")  # symlink-swap
        link(fd, str(tmp_path / "pinned2"))
    finally:
        os.close(fd)
    for pinned in ("pinned", "pinned2"):
        st = os.stat(tmp_path / pinned)
        assert files.same_file(st, original)
        assert (tmp_path / pinned).read_bytes() == b"original"
    assert os.stat(tmp_path / "pinned").st_nlink == 3  # old + the two pins


def test_a_file_with_no_name_left_cannot_be_linked(tmp_path: Path) -> None:
    """An open file whose last name went (unlinked, or renamed over) cannot be given one
    again: the caller learns it changed (ENOENT) instead of pinning something else."""
    (tmp_path / "f").write_bytes(b"x")
    fd = files.open_no_symlinks(str(tmp_path / "f"))
    try:
        (tmp_path / "f").unlink()
        for link in (files.link_fd, files.link_fd_by_proc):
            with pytest.raises(FileNotFoundError):
                link(fd, str(tmp_path / "pin"))
    finally:
        os.close(fd)


def test_link_fd_refuses_an_existing_name(tree: Path, tmp_path: Path) -> None:
    (tmp_path / "taken").write_bytes(b"x")
    fd = files.open_no_symlinks(str(tree / "a/b/file"))
    try:
        with pytest.raises(FileExistsError):
            files.link_fd(fd, str(tmp_path / "taken"))
    finally:
        os.close(fd)
    assert (tmp_path / "taken").read_bytes() == b"x"


def test_writable_by_others(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"")
    for mode, expected in ((0o644, False), (0o444, False), (0o664, True), (0o646, True)):
        f.chmod(mode)
        assert files.writable_by_others(os.stat(f)) is expected

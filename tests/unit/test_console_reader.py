"""The console log is read for a tenant without following what a VMM could plant in its
directory (backends/vmm/console.py): a symlink, a FIFO, a hard link, a linked directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from metald.backends.vmm.console import UnsafeConsole, read_console


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    d = tmp_path / "run"
    d.mkdir()
    return d


def test_reads_from_an_offset_a_tail_and_a_new_log(run_dir: Path) -> None:
    log = run_dir / "console.log"
    log.write_bytes(b"0123456789")
    assert read_console(log, 0, 4).data == b"0123"
    chunk = read_console(log, 4, 100)
    assert (chunk.data, chunk.offset, chunk.next_offset, chunk.size) == (b"456789", 4, 10, 10)
    assert read_console(log, -3, 100).data == b"789"
    assert read_console(log, -300, 2).data == b"01"
    assert read_console(log, 10, 100).data == b""  # at the end: nothing new
    assert read_console(log, 11, 100).offset == 0  # past the end: a new log, from 0


def test_no_log_yet_is_empty(run_dir: Path) -> None:
    chunk = read_console(run_dir / "console.log", 0, 10)
    assert (chunk.data, chunk.next_offset, chunk.size) == (b"", 0, 0)
    assert read_console(run_dir / "gone" / "console.log", 0, 10).data == b""


def test_a_symlink_in_place_of_the_log_is_not_followed(run_dir: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"host secret")
    (run_dir / "console.log").symlink_to(secret)
    with pytest.raises(UnsafeConsole, match="symbolic link"):
        read_console(run_dir / "console.log", 0, 100)


def test_a_symlinked_directory_is_not_followed(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "console.log").write_bytes(b"host file")
    (tmp_path / "run").symlink_to(elsewhere)
    with pytest.raises(UnsafeConsole, match="directory"):
        read_console(tmp_path / "run" / "console.log", 0, 100)


def test_a_fifo_does_not_block_and_is_refused(run_dir: Path) -> None:
    os.mkfifo(run_dir / "console.log")
    with pytest.raises(UnsafeConsole, match="not a regular file"):
        read_console(run_dir / "console.log", 0, 100)


def test_a_hard_link_to_another_file_is_refused(run_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.write_bytes(b"someone else's")
    os.link(other, run_dir / "console.log")
    with pytest.raises(UnsafeConsole, match="hard links"):
        read_console(run_dir / "console.log", 0, 100)

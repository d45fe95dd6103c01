"""host/process.py's ProcFiles: /proc files kept open and re-read (metering's sampler)."""

from __future__ import annotations

import os
import subprocess

from metald.host.process import (
    PAGE_SIZE,
    ProcFiles,
    child_pids,
    read_rss_bytes,
    read_stat,
    thread_cpu_ns,
    thread_names,
)


def test_reads_are_fresh_each_time_and_match_the_path_readers() -> None:
    files = ProcFiles(os.getpid())
    try:
        first = files.thread_cpu_ns(os.getpid())
        sum(i * i for i in range(300_000))  # burn a little CPU on this thread
        second = files.thread_cpu_ns(os.getpid())
        assert first is not None and second is not None and second > first
        assert (stat := files.stat()) is not None
        assert stat.start_time == read_stat(os.getpid()).start_time  # type: ignore[union-attr]
        # stat's resident pages are statm's (a few pages apart: the heap moves between reads)
        assert abs(stat.rss_pages * PAGE_SIZE - read_rss_bytes(os.getpid())) < 64 * PAGE_SIZE
        assert stat.rss_pages > 0
        assert thread_cpu_ns(os.getpid(), os.getpid()) is not None
        assert os.getpid() in thread_names(os.getpid())
    finally:
        files.close()


def test_a_process_that_ended_reads_as_gone() -> None:
    child = subprocess.Popen(["sleep", "30"])
    files = ProcFiles(child.pid)
    try:
        assert files.stat() is not None and files.thread_cpu_ns(child.pid) is not None
        child.kill()
        child.wait()
        assert files.stat() is None
        assert files.thread_cpu_ns(child.pid) is None
    finally:
        files.close()


def test_child_pids_are_the_children_of_a_process_zombies_included() -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert child.pid in child_pids(os.getpid())
        assert child.pid not in child_pids(child.pid)
        assert read_stat(child.pid).ppid == os.getpid()  # type: ignore[union-attr]
        child.kill()
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: a zombie
        assert child.pid in child_pids(os.getpid())
    finally:
        child.kill()
        child.wait()
    assert child.pid not in child_pids(os.getpid())

"""Entering a network namespace from the calling thread.

setns(2) with CLONE_NEWNET acts on the calling thread only, so metald runs namespace work in
a short-lived thread that enters, works and ends: no pooled thread is ever left in a
namespace it did not choose. The jailer helper (single-threaded) enters the VM's namespace
for good before it becomes the VMM.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import TypeVar

from metald.host import libc

_T = TypeVar("_T")


def enter(path: str) -> None:
    """Move the calling thread into the network namespace at `path` (a /run/netns entry or
    a /proc/<pid>/ns/net link). OSError (with the path) if it cannot."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        libc.setns(fd, libc.CLONE_NEWNET)
    finally:
        os.close(fd)


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

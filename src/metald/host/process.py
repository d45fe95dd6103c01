"""Processes: identity, spawning, watching, reaping and killing.

A process is named by its pid *and* its start time (field 22 of /proc/<pid>/stat, clock ticks
since boot), so a pid the kernel has reused for another program is never mistaken for ours.
Signals go through a pidfd opened and then verified against that start time, which closes the
window between checking a pid and signalling it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class Identified(Protocol):
    """Anything that names a process by pid and start time (the domain's ProcessIdentity
    is one; this floor does not import the domain)."""

    @property
    def pid(self) -> int: ...

    @property
    def start_time(self) -> int: ...


class ProcessIdentity(NamedTuple):
    """A live process as this module finds it: pid and start time (clock ticks since boot).
    A named tuple: it equals the domain's identity of the same process."""

    pid: int
    start_time: int


@dataclass(frozen=True)
class ProcStat:
    """The fields of /proc/<pid>/stat that metald uses."""

    state: str
    ppid: int
    utime_ticks: int
    stime_ticks: int
    start_time: int
    rss_pages: int = 0  # field 24: resident pages (the same figure as statm's second)

    @property
    def cpu_time_ns(self) -> int:
        return (self.utime_ticks + self.stime_ticks) * 1_000_000_000 // CLOCK_TICKS


def parse_stat(text: str) -> ProcStat:
    """Parse /proc/<pid>/stat. The command name (field 2) may hold spaces and parentheses."""
    rest = text[text.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state); field n is rest[n - 3].
    return ProcStat(
        state=rest[0],
        ppid=int(rest[4 - 3]),
        utime_ticks=int(rest[14 - 3]),
        stime_ticks=int(rest[15 - 3]),
        start_time=int(rest[22 - 3]),
        rss_pages=int(rest[24 - 3]),
    )


def read_stat(pid: int) -> ProcStat | None:
    """The process's stat, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            return parse_stat(f.read())
    except (FileNotFoundError, ProcessLookupError):
        return None
    except (ValueError, IndexError):
        return None


def child_pids(parent: int) -> list[int]:
    """The pids whose parent is `parent` now (zombies included), from a scan of /proc: the
    one copy of it (tests check what a process left behind; the density benchmark counts a
    daemon's VMMs and helpers)."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            stat = read_stat(int(entry.name))
            if stat is not None and stat.ppid == parent:
                found.append(int(entry.name))
    return found


def identity_of(pid: int) -> ProcessIdentity | None:
    stat = read_stat(pid)
    return None if stat is None else ProcessIdentity(pid=pid, start_time=stat.start_time)


def is_alive(identity: Identified) -> bool:
    """Whether that very process exists and has not exited (a zombie counts as exited)."""
    stat = read_stat(identity.pid)
    return stat is not None and stat.start_time == identity.start_time and stat.state != "Z"


def read_rss_bytes(pid: int) -> int:
    """Resident set size (status's VmRSS: statm's second field, in pages; statm is read
    in a fraction of status's time, and metering reads it ten times a second per VM), 0 if
    unknown."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * PAGE_SIZE
    except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
        return 0


def boot_time_ticks_now() -> float:
    """Seconds since host boot, in clock ticks (the unit of a process start time)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME) * CLOCK_TICKS


def process_age_seconds(identity: Identified) -> float:
    return max(0.0, (boot_time_ticks_now() - identity.start_time) / CLOCK_TICKS)


def read_cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def open_pidfd(identity: Identified) -> int | None:
    """A pidfd for exactly that process, or None if it is gone (or the pid was reused).

    The start time is checked *after* opening, so the pidfd cannot name a newer process. A
    zombie still gets one (its pidfd is readable at once, and a child can then be reaped).
    """
    try:
        fd = os.pidfd_open(identity.pid)
    except ProcessLookupError:
        return None
    except OSError as e:
        if e.errno == errno.ESRCH:
            return None
        raise
    stat = read_stat(identity.pid)
    if stat is None or stat.start_time != identity.start_time:
        os.close(fd)
        return None
    return fd


def signal_pidfd(fd: int, sig: int = signal.SIGKILL) -> bool:
    """Send a signal through a pidfd; False if the process has already exited."""
    try:
        signal.pidfd_send_signal(fd, sig)
    except ProcessLookupError:
        return False
    return True


@dataclass(frozen=True)
class ExitStatus:
    """How a process ended. Known only for our own children (the ones we can reap)."""

    exit_code: int | None = None
    signal: int | None = None

    def describe(self) -> str:
        if self.signal is not None:
            try:
                name = signal.Signals(self.signal).name
            except ValueError:
                name = "unknown"
            return f"signal {self.signal} ({name})"
        if self.exit_code is not None:
            return f"exit status {self.exit_code}"
        return "exit status unknown"


def reap_pidfd(fd: int) -> ExitStatus | None:
    """Reap an exited child through its pidfd (so no zombie stays).

    Returns its status, or None when the process is not our child (then it is not ours to
    reap) or has not exited yet.
    """
    try:
        result = os.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOHANG)
    except ChildProcessError:
        return None
    except OSError as e:
        if e.errno in (errno.ECHILD, errno.EINVAL):
            return None
        raise
    if result is None:
        return None
    if result.si_code == os.CLD_EXITED:
        return ExitStatus(exit_code=result.si_status)
    return ExitStatus(signal=result.si_status)


class ProcessWatch:
    """Watches one process through its pidfd in the event loop.

    When the process exits, `on_exit` is called once (from the loop) with its exit status
    (None when the process is not our child). Our children are reaped here. `wait()` returns
    once the exit has been seen, whoever asked for it.
    """

    def __init__(
        self,
        identity: Identified,
        fd: int,
        on_exit: Callable[[ExitStatus | None], None] | None = None,
    ) -> None:
        self.identity = identity
        self._fd: int | None = fd
        self._on_exit = on_exit
        self._loop = asyncio.get_running_loop()
        self._exited = asyncio.Event()
        self.status: ExitStatus | None = None
        self._loop.add_reader(fd, self._readable)

    @classmethod
    def open(
        cls,
        identity: Identified,
        on_exit: Callable[[ExitStatus | None], None] | None = None,
    ) -> ProcessWatch | None:
        """Start watching, or None if the process is already gone."""
        fd = open_pidfd(identity)
        if fd is None:
            return None
        return cls(identity, fd, on_exit)

    @property
    def exited(self) -> bool:
        return self._exited.is_set()

    def _readable(self) -> None:
        if self._fd is None or self._exited.is_set():
            return
        self.status = reap_pidfd(self._fd)
        self._loop.remove_reader(self._fd)
        self._exited.set()
        if self._on_exit is not None:
            self._on_exit(self.status)

    def kill(self, sig: int = signal.SIGKILL) -> bool:
        """Signal the process (never another one: this goes through the pidfd)."""
        if self._fd is None or self._exited.is_set():
            return False
        return signal_pidfd(self._fd, sig)

    async def wait(self, timeout: float | None = None) -> bool:
        """Wait for the exit; True if it happened within `timeout`."""
        try:
            await asyncio.wait_for(self._exited.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def kill_and_wait(self, timeout: float = 10.0) -> bool:
        self.kill(signal.SIGKILL)
        return await self.wait(timeout)

    def detach(self) -> None:
        """Stop watching; the process keeps running. The on_exit callback is not called."""
        self._on_exit = None
        if self._fd is not None:
            if not self._exited.is_set():
                self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        self.detach()


async def kill_identity(identity: Identified, timeout: float = 10.0) -> bool:
    """SIGKILL that very process (if it is still alive) and wait for it to go.

    Returns True if it was alive and has now gone, False if it was already gone.
    Raises TimeoutError if it does not go within `timeout`.
    """
    watch = ProcessWatch.open(identity)
    if watch is None:
        return False
    try:
        watch.kill(signal.SIGKILL)
        if not await watch.wait(timeout):
            raise TimeoutError(f"process {identity.pid} did not exit after SIGKILL")
        return True
    finally:
        watch.close()


def inheritable_fds() -> list[int]:
    """Our open descriptors that a new program would inherit (those without FD_CLOEXEC)."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if os.get_inheritable(fd):
                found.append(fd)
        except OSError:
            continue  # the listing's own descriptor, already closed
    return found


def spawn(
    argv: Sequence[str],
    *,
    stderr_path: Path,
    env: dict[str, str] | None = None,
) -> ProcessIdentity:
    """Start a program in its own session (so it outlives us), stdin/stdout on /dev/null and
    stderr to a file, and no other descriptor of ours. Returns its identity.

    posix_spawn (not subprocess.Popen) leaves reaping to us, through the pidfd: no Popen
    object can later waitpid() a reused pid. It has no close_fds, so every inheritable
    descriptor is closed explicitly: a VMM that outlives metald must not keep, say, the API's
    listening socket (hypercorn makes it inheritable) and with it the port.
    """
    file_actions: list[tuple[Any, ...]] = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
        # O_APPEND: metald may cut the file back under the writer (backends/vmm/logcaps.py).
        (
            os.POSIX_SPAWN_OPEN,
            2,
            str(stderr_path),
            os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND,
            0o600,
        ),
    ]
    file_actions += [(os.POSIX_SPAWN_CLOSE, fd) for fd in inheritable_fds() if fd > 2]
    pid = os.posix_spawnp(
        argv[0],
        list(argv),
        dict(os.environ) if env is None else env,
        file_actions=file_actions,
        setsid=True,
    )
    for _ in range(100):
        ident = identity_of(pid)
        if ident is not None:
            return ident
        time.sleep(0.001)  # pragma: no cover - /proc entry appears with the pid
    # The child is gone already and nobody could read its stat: reap it and report.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    raise OSError(errno.ESRCH, f"process {pid} vanished right after starting")


def thread_names(pid: int) -> dict[int, str]:
    """Every thread of the process by id, with its name (/proc/<pid>/task/*/comm; at most
    15 bytes); empty if there is no such process."""
    names: dict[int, str] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return names
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/comm", encoding="utf-8", errors="replace") as f:
                names[int(tid)] = f.read().rstrip("\n")
        except (FileNotFoundError, ProcessLookupError, PermissionError, ValueError):
            continue
    return names


def thread_cpu_ns(pid: int, tid: int) -> int | None:
    """The thread's CPU time in nanoseconds (the first field of its schedstat: the
    scheduler's own sum, exact, where stat's utime+stime are clock ticks of 10 ms), or
    None if the thread is gone."""
    try:
        with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
            return int(f.read().split(maxsplit=1)[0])
    except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
        return None


class ProcFiles:
    """Files of one process under /proc kept open and re-read with pread: a sampler that
    reads the same few files ten times a second pays the open and close once (they were
    40% of a usage sample). A file of a process that has ended reads as None; so does one
    of a pid the kernel gave to a new process (the open file is the old process's)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._fds: dict[str, int] = {}

    def read(self, name: str) -> bytes | None:
        """/proc/<pid>/<name> now (e.g. "stat", "task/<tid>/schedstat"), None if gone."""
        fd = self._fds.get(name)
        if fd is None:
            try:
                fd = os.open(f"/proc/{self.pid}/{name}", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return None
            self._fds[name] = fd
        try:
            data = os.pread(fd, 4096, 0)
        except OSError:
            data = b""
        if not data:
            self.forget(name)
            return None
        return data

    def forget(self, name: str) -> None:
        fd = self._fds.pop(name, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        for name in list(self._fds):
            self.forget(name)

    def stat(self) -> ProcStat | None:
        data = self.read("stat")
        try:
            return parse_stat(data.decode(errors="replace")) if data else None
        except (ValueError, IndexError):
            return None

    def thread_cpu_ns(self, tid: int) -> int | None:
        data = self.read(f"task/{tid}/schedstat")
        try:
            return int(data.split(maxsplit=1)[0]) if data else None
        except (ValueError, IndexError):
            return None

"""Jailer helpers started ahead of need, so a launch does not wait for a Python interpreter.

A jailer helper is a Python process (`python -I -m metald.jailer`): its interpreter start-up
and imports cost 50-150 ms of CPU, most of metald's own share of a CreateVm. A *spare* is a
helper started before a VM needs it (`--wait`): it has imported everything and waits on a
socket for its one job, which is the same as a helper started for the job (the spec, its
stderr, the report pipe), so the steps, checks and reports are the same code. A spare is
used once: it becomes that VM's VMM (or, with a PID namespace, forks it and exits).

Why not fork the helpers from a long-lived zygote: the VMM must be metald's own child
(clone CLONE_PARENT from the helper: metald reaps it, its pid cannot be reused behind
metald's back), which needs the helper itself to be metald's child. So each spare is
posix_spawned by metald, in its own session, exactly as a helper started for a job.

`Spares(count)` keeps up to `count` spares. A spare is put at the lowest CPU priority as it starts
(SCHED_IDLE: its start-up only uses CPU nobody else wants, never a booting guest's or a
launch in progress), and raised to normal (SCHED_OTHER) when it is taken, before its job is
sent; the helper sets it again itself, and the VMM inherits it. Taking a spare never waits:
with none ready, the launch starts a helper for itself (`spawn_helper`, the cost of before).
A taken spare is replaced (at idle priority again) once the VMM it became has started. A
spare that died while waiting is reaped and logged; closing the pool closes the spares'
sockets, and they exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metald.host.process import inheritable_fds, reap_pidfd

log = logging.getLogger(__name__)


@dataclass
class Helper:
    """A jailer helper waiting for its job: our child, its pidfd, our end of its socket."""

    pid: int
    pidfd: int
    sock: socket.socket
    spare: bool  # started ahead of need (else for one launch, at normal priority)

    def exited(self) -> bool:
        """Whether it has exited (its pidfd is readable), without reaping it."""
        try:
            return (
                os.waitid(os.P_PIDFD, self.pidfd, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
            )
        except ChildProcessError:
            return True

    def wake(self) -> None:
        """Normal CPU priority from now on (the VMM inherits the helper's)."""
        os.sched_setscheduler(self.pid, os.SCHED_OTHER, os.sched_param(0))

    def hand_job(self, spec_fd: int, stderr_fd: int, report_fd: int) -> None:
        """Send the job: the spec (a memfd), its stderr and the report pipe's write end."""
        socket.send_fds(self.sock, [b"job"], [spec_fd, stderr_fd, report_fd])
        self.sock.close()

    def discard(self) -> None:
        """Kill and reap it (it may have exited already); closes everything of ours."""
        self.sock.close()
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitid(os.P_PIDFD, self.pidfd, os.WEXITED)
        os.close(self.pidfd)


def spawn_helper(
    *,
    python: str = sys.executable,
    env: Mapping[str, str] | None = None,
    stderr_path: Path | None = None,
    spare: bool = False,
) -> Helper:
    """Start a helper in its own session, waiting for its job on a socket (its stdin).

    Nothing of metald's is inherited but that socket and stderr (`stderr_path`, appended;
    /dev/null for a spare: the job brings the VM's). A spare starts at idle priority."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    # >= 10: a dup2 onto 0 is then never a dup2 onto itself (which would keep close-on-exec).
    theirs_fd = fcntl.fcntl(theirs.fileno(), fcntl.F_DUPFD_CLOEXEC, 10)
    theirs.close()
    try:
        stderr = os.devnull if stderr_path is None else str(stderr_path)
        file_actions: list[tuple[Any, ...]] = [
            (os.POSIX_SPAWN_CLOSE, fd) for fd in inheritable_fds() if fd > 2
        ]
        file_actions += [
            (os.POSIX_SPAWN_DUP2, theirs_fd, 0),
            (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
            (os.POSIX_SPAWN_OPEN, 2, stderr, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600),
        ]
        pid = os.posix_spawn(
            python,
            [python, "-I", "-m", "metald.jailer", "--wait"],
            dict(os.environ if env is None else env),
            file_actions=file_actions,
            setsid=True,
            setsigmask=set(),
            setsigdef=_resettable_signals(),
        )
    except BaseException:
        ours.close()
        raise
    finally:
        os.close(theirs_fd)
    # Our child: its pid cannot be reused before we reap it, so this pidfd is exact.
    helper = Helper(pid=pid, pidfd=os.pidfd_open(pid), sock=ours, spare=spare)
    if spare:
        # posix_spawn's own scheduler attribute refuses SCHED_IDLE (EINVAL): set it now,
        # a moment into the interpreter's start-up.
        try:
            os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0))
        except OSError:
            helper.discard()
            raise
    return helper


def _resettable_signals() -> set[int]:
    return {int(s) for s in signal.valid_signals()} - {signal.SIGKILL, signal.SIGSTOP}


class Spares:
    """Up to `count` spare helpers, all alike (same interpreter and environment)."""

    def __init__(
        self, count: int, *, python: str = sys.executable, env: Mapping[str, str] | None = None
    ) -> None:
        if count < 0:
            raise ValueError("the number of spare jailer helpers must not be negative")
        self.count = count
        self.python = python
        self.env = dict(os.environ if env is None else env)
        self._spares: list[Helper] = []
        self._closed = False

    @property
    def pids(self) -> list[int]:
        return [h.pid for h in self._spares]

    def fill(self) -> None:
        """Start spares until there are `count` (each a posix_spawn: no wait)."""
        while not self._closed and len(self._spares) < self.count:
            try:
                self._spares.append(spawn_helper(python=self.python, env=self.env, spare=True))
            except OSError as e:
                log.warning("cannot start a spare jailer helper: %s", e)
                return

    def take(self) -> Helper | None:
        """A live spare, raised to normal priority; None if there is none. Its replacement is
        the caller's to start (`fill`, `fill_soon`) once the launch is over."""
        while self._spares:
            helper = self._spares.pop(0)
            if helper.exited():
                status = reap_pidfd(helper.pidfd)
                log.warning(
                    "a spare jailer helper (pid %d) ended while waiting (%s)",
                    helper.pid,
                    "status unknown" if status is None else status.describe(),
                )
                helper.sock.close()
                os.close(helper.pidfd)
                continue
            try:
                helper.wake()
            except OSError:  # it has just exited
                helper.discard()
                continue
            return helper
        return None

    def fill_soon(self) -> None:
        """`fill` on the event loop's next turn. The runtime calls this once the VMM a spare
        became has started: a replacement's start-up, even at idle priority, slowed the
        VMM's own start by a third when both ran at once (2 vCPUs that share a core)."""
        asyncio.get_running_loop().call_soon(self.fill)

    def close(self) -> None:
        """End every spare (each exits on its socket's end; killed if it has not started
        waiting yet) and reap it."""
        self._closed = True
        spares, self._spares = self._spares, []
        for helper in spares:
            helper.discard()

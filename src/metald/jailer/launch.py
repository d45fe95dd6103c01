"""metald's side of the jailer: start the helper, learn whether the VMM runs, and undo
everything the helper made when it does not.

    jailed = await launch_jailed(spec, stderr_path=..., spares=...)  # the VMM runs (-S)
    ... ProcessWatch.open(jailed.identity) ...            # watch it like any VMM
    await remove_jail(spec)                               # after the VMM has exited

The helper is metald's child in its own session (it outlives metald), with nothing of
metald's but its job socket (stdin), stdout (/dev/null) and stderr: a spare started ahead of
need (jailer/spares.py), else one posix_spawned for this launch. Its job, sent over the socket
with the descriptors: the spec (a memfd), its stderr (`stderr_path`, which then is the VMM's)
and the report pipe (fd 3 in the helper). With a PID namespace (the default) the helper
forks the VMM as metald's own child and exits: launch_jailed reaps the helper and returns the
VMM's identity (its host pid). Reaping the VMM is left to the caller's pidfd watch: no asyncio
child watcher ever waits for these pids.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from metald.core.models import ProcessIdentity
from metald.core.undo import Undo
from metald.host import netns as host_netns
from metald.host.mounts import mounts_under
from metald.host.process import ExitStatus, identity_of, reap_pidfd
from metald.jailer.cgroups import cgroup_dir, relative_cgroup
from metald.jailer.errors import JailerError
from metald.jailer.spares import Helper, Spares, spawn_helper
from metald.jailer.spec import STEPS, JailSpec, SpecError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30.0
_T = TypeVar("_T")


@dataclass(frozen=True)
class StepReport:
    step: str
    status: str  # "ok" or "skipped"
    ms: float
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class JailedProcess:
    """A VMM running in its jail."""

    identity: ProcessIdentity
    spec: JailSpec
    steps: tuple[StepReport, ...]
    cgroup_path: Path | None  # None: no cgroup (not asked, or skipped: see cgroup_note)
    cgroup_note: str | None  # why the cgroup or some of its limits were skipped
    launch_seconds: float  # from spawning the helper to the VMM's execve
    helper_ms: float  # the helper's own steps, as it measured them

    @property
    def pid(self) -> int:
        return self.identity.pid

    def host_path(self, inside: str) -> Path:
        """A path inside the jail (its writable dirs) as metald reaches it from the host."""
        return self.spec.host_path(inside)

    def step(self, name: str) -> StepReport | None:
        return next((s for s in self.steps if s.step == name), None)


async def launch_jailed(
    spec: JailSpec,
    *,
    stderr_path: Path,
    timeout: float = DEFAULT_TIMEOUT,
    python: str = sys.executable,
    env: Mapping[str, str] | None = None,
    spares: Spares | None = None,
) -> JailedProcess:
    """Run the jailer helper for `spec` and return once it has become the VMM.

    Raises JailerError(step, message) when a step fails (or the spec is refused: step
    "spec"), after removing what the earlier steps made: the TAP, the jail directory (only
    its root when the directory existed before: metald may keep `stderr_path` in it), the
    cgroup. The helper's mounts were only ever in its own mount namespace and went with it.
    `spares`: the helper is one of these when one is ready (jailer/spares.py: started with
    their own interpreter and environment); otherwise one is started for this launch with
    `python` and `env` (default: metald's). The VMM gets `spec.env` only.
    """
    try:
        spec.validate()
    except SpecError as e:
        raise JailerError("spec", str(e)) from None
    stderr_path = Path(stderr_path)
    started = time.monotonic()
    try:
        pid, pidfd, report_fd = _start(spec, stderr_path, python, env, spares)
    except OSError as e:
        raise JailerError("start", f"cannot start the jailer: {e}") from None
    reader = _Reports()
    try:
        try:
            await _read_until_eof(report_fd, reader, timeout)
        finally:
            os.close(report_fd)
        elapsed = time.monotonic() - started
        if reader.error is None and reader.exec_started:
            if spec.pid_namespace:
                # The helper has exited; the VMM (pid 1 of its namespace) is our own child:
                # its pid cannot be reused before we reap it.
                await _reap(pidfd)
                vmm_pid = reader.vmm_pid
            else:
                vmm_pid = pid
                os.close(pidfd)
            found = None if vmm_pid is None else identity_of(vmm_pid)
            if found is None:  # pragma: no cover - the VMM died at once and was reaped
                raise JailerError("exec", "the VMM vanished right after starting")
            return _result(spec, ProcessIdentity(*found), reader, elapsed)
        await _end_vmm_child(reader.vmm_pid)
        status = await _reap(pidfd)
        if reader.error is not None:
            step, message = reader.error
        else:
            step = reader.next_step()
            message = f"the jailer ended ({_describe(status)}) without a report"
            tail = _tail(stderr_path)
            if tail:
                message += f": {tail}"
    except TimeoutError:
        await _kill_and_reap(pidfd)
        await _end_vmm_child(reader.vmm_pid)
        step, message = reader.next_step(), f"no answer from the jailer within {timeout:g} s"
    except BaseException:
        # Cancelled (or a bug here): the helper must not live on, nor what it made.
        with contextlib.suppress(OSError):
            await _kill_and_reap(pidfd)
        await _end_vmm_child(reader.vmm_pid)
        await _undo(spec, reader.created)
        raise
    leftovers = await _undo(spec, reader.created)
    raise JailerError(step, message, leftovers=tuple(leftovers))


async def remove_jail(spec: JailSpec, *, remove_tap: bool = True, remove_dir: bool = True) -> None:
    """Remove what a jail left on the host once its VMM has exited: the cgroup, the whole
    jail directory (its root with the hard links, the writable dirs with the VMM's sockets
    and logs, and whatever metald kept beside the root, such as the stderr file) and,
    unless told not to, the TAP. `remove_dir=False` keeps the jail directory (a stopped
    VM's console log stays readable until the VM is started again or deleted).
    Idempotent. Raises JailerError(step="cleanup") naming whatever remains (a cgroup that
    still has processes: then nothing is touched; mount points under the jail directory)."""
    leftovers: list[str] = []
    if spec.cgroup is not None:
        path = cgroup_dir(spec.cgroup, spec.vm_id)
        if path is not None:
            pids = await asyncio.to_thread(_cgroup_pids, path)
            if pids:
                # The VMM (or something it started) still runs: its jail stays.
                raise JailerError(
                    "cleanup",
                    "the jail is still in use",
                    leftovers=(f"cgroup {path}: processes {' '.join(pids)}",),
                )
            try:
                await asyncio.to_thread(_remove_cgroup, path)
            except OSError as e:
                leftovers.append(f"cgroup {path}: {e.strerror or e}")
    if remove_dir:
        try:
            await asyncio.to_thread(_remove_jail_dir, spec.jail_dir)
        except OSError as e:
            leftovers.append(f"jail directory {spec.jail_dir}: {e.strerror or e}")
    if remove_tap and spec.tap is not None:
        try:
            await remove_tap_device(spec.netns_path, spec.tap.name)
        except OSError as e:
            leftovers.append(f"TAP {spec.tap.name}: {e.strerror or e}")
    if leftovers:
        raise JailerError("cleanup", "the jail is not entirely removed", leftovers=tuple(leftovers))


async def remove_tap_device(netns_path: str | None, name: str) -> bool:
    """Delete a network device in a namespace (None: metald's own); False if absent."""

    def work() -> bool:
        from pyroute2 import IPRoute  # heavy import, only needed here

        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=name)
            if not found:
                return False
            ipr.link("del", index=found[0])
            return True

    if netns_path is None:
        return await asyncio.to_thread(work)
    return await asyncio.to_thread(_in_netns, netns_path, work, False)


# -- spawning --


def _start(
    spec: JailSpec,
    stderr_path: Path,
    python: str,
    env: Mapping[str, str] | None,
    spares: Spares | None,
) -> tuple[int, int, int]:
    """A helper with its job handed over: (pid, pidfd, the read end of the report pipe).

    A spare that cannot take the job (it died just now) is discarded and a helper started
    for the job instead. One started for the job whose socket is closed has died: its
    report pipe then reads as empty at once, and its exit status and stderr tell why. Any
    other failure (no descriptor left, say) ends the helper and is raised (step "start")."""
    helper = spares.take() if spares is not None else None
    if helper is not None:
        try:
            return helper.pid, helper.pidfd, _hand_job(helper, spec, stderr_path)
        except OSError as e:
            log.warning("a spare jailer helper could not take its job: %s", e)
            helper.discard()
    helper = spawn_helper(python=python, env=env, stderr_path=stderr_path)
    try:
        report_fd = _hand_job(helper, spec, stderr_path)
    except (BrokenPipeError, ConnectionError):
        # It died before taking its job (its interpreter cannot start, say): its exit
        # status and its stderr (the VM's file from the spawn on) say why.
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        os.close(write_end)
        helper.sock.close()
        return helper.pid, helper.pidfd, read_end
    except BaseException:
        helper.discard()
        raise
    return helper.pid, helper.pidfd, report_fd


def _hand_job(helper: Helper, spec: JailSpec, stderr_path: Path) -> int:
    """Send the helper its spec (a memfd), its stderr (`stderr_path`, which then is the
    VMM's) and the write end of a new report pipe; returns the pipe's read end."""
    spec_fd = os.memfd_create("metald-jail-spec", os.MFD_CLOEXEC)
    stderr_fd = -1
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        os.write(spec_fd, spec.to_json().encode())
        os.lseek(spec_fd, 0, os.SEEK_SET)
        stderr_fd = os.open(
            stderr_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600
        )
        helper.hand_job(spec_fd, stderr_fd, write_end)
    except BaseException:
        os.close(read_end)
        raise
    finally:
        for fd in (spec_fd, stderr_fd, write_end):
            if fd >= 0:
                os.close(fd)
    return read_end


# -- reports --


class _Reports:
    def __init__(self) -> None:
        self.buffer = bytearray()
        self.steps: list[StepReport] = []
        self.created: list[dict[str, str]] = []
        self.error: tuple[str, str] | None = None
        self.exec_started = False
        self.helper_ms = 0.0
        self.vmm_pid: int | None = None  # the VMM forked into its PID namespace

    def feed(self, data: bytes) -> None:
        self.buffer += data
        while b"\n" in self.buffer:
            line, _, rest = bytes(self.buffer).partition(b"\n")
            self.buffer = bytearray(rest)
            self._line(line)

    def _line(self, line: bytes) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            self.error = self.error or (self.next_step(), f"unreadable report {line[:200]!r}")
            return
        if not isinstance(message, dict):
            return
        pid = message.get("vmm_pid")
        if isinstance(pid, int) and not isinstance(pid, bool) and pid > 1:
            self.vmm_pid = pid
            return
        if isinstance(message.get("created"), dict):
            self.created.append({str(k): str(v) for k, v in message["created"].items()})
            return
        step, status = str(message.get("step")), message.get("status")
        if status == "error":
            self.error = self.error or (step, str(message.get("error")))
        elif status == "starting" and step == "exec":
            self.exec_started = True
            self.helper_ms = float(message.get("ms", 0.0))
        elif status in ("ok", "skipped"):
            detail = message.get("detail")
            self.steps.append(
                StepReport(
                    step=step,
                    status=str(status),
                    ms=float(message.get("ms", 0.0)),
                    detail=detail if isinstance(detail, dict) else {},
                )
            )

    def next_step(self) -> str:
        """The step that was running when the helper went quiet."""
        if not self.steps:
            return "start"
        last = self.steps[-1].step
        index = STEPS.index(last) if last in STEPS else -1
        return STEPS[index + 1] if index + 1 < len(STEPS) else "exec"


async def _read_until_eof(fd: int, reports: _Reports, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    os.set_blocking(fd, False)

    def readable() -> None:
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                return
            except OSError as e:  # pragma: no cover - a pipe read does not fail otherwise
                if not done.done():
                    done.set_exception(e)
                return
            if not chunk:
                if not done.done():
                    done.set_result(None)
                return
            reports.feed(chunk)

    loop.add_reader(fd, readable)
    try:
        await asyncio.wait_for(done, timeout)
    finally:
        loop.remove_reader(fd)
    if reports.buffer:
        reports.feed(b"\n")


def _result(
    spec: JailSpec, identity: ProcessIdentity, reports: _Reports, elapsed: float
) -> JailedProcess:
    cgroup_path: Path | None = None
    note: str | None = None
    for s in reports.steps:
        if s.step != "cgroup":
            continue
        if "path" in s.detail:
            cgroup_path = Path(str(s.detail["path"]))
        note = s.detail.get("skipped") or s.detail.get("limits_skipped")
    return JailedProcess(
        identity=identity,
        spec=spec,
        steps=tuple(reports.steps),
        cgroup_path=cgroup_path,
        cgroup_note=None if note is None else str(note),
        launch_seconds=elapsed,
        helper_ms=reports.helper_ms,
    )


# -- ending a failed helper --


async def _reap(pidfd: int, timeout: float = 5.0) -> ExitStatus | None:
    """Wait for the helper to exit (it does, right after a failure report) and reap it;
    SIGKILL it if it does not within `timeout`. Closes the pidfd."""
    loop = asyncio.get_running_loop()
    exited = asyncio.Event()
    loop.add_reader(pidfd, exited.set)
    try:
        try:
            await asyncio.wait_for(exited.wait(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            await asyncio.wait_for(exited.wait(), timeout)
    finally:
        loop.remove_reader(pidfd)
    try:
        return reap_pidfd(pidfd)
    finally:
        os.close(pidfd)


async def _kill_and_reap(pidfd: int) -> None:
    with contextlib.suppress(ProcessLookupError, OSError):
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    await _reap(pidfd)


async def _end_vmm_child(pid: int | None) -> None:
    """Kill and reap the VMM process the helper forked (our child: CLONE_PARENT) when the
    launch failed after the fork. Never another process: an unreaped child's pid is ours."""
    if pid is None:
        return
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return
    if _parent_of(pid) != os.getpid():  # not ours after all: not ours to kill
        os.close(fd)
        return
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(fd, signal.SIGKILL)
    await _reap(fd)


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            text = f.read()
        return int(text[text.rindex(")") + 2 :].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _describe(status: ExitStatus | None) -> str:
    return "exit status unknown" if status is None else status.describe()


def _tail(path: Path, limit: int = 400) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            return f.read().decode(errors="replace").strip().replace("\n", " | ")
    except OSError:
        return ""


# -- undoing --


async def _undo(spec: JailSpec, created: list[dict[str, str]]) -> list[str]:
    """Remove what the helper announced it made, last first; what could not go."""
    undo = Undo(log, f"jail of {spec.vm_id}: a failed launch")
    for record in created:
        undo.add(f"{record.get('kind')} {record}", _remove_made, spec, record)
    return await undo.run_async()


async def _remove_made(spec: JailSpec, record: dict[str, str]) -> None:
    """Remove one thing the helper made, once it is proven to be this VM's."""
    kind = record.get("kind")
    try:
        if kind == "cgroup":
            path = Path(record["path"])
            if spec.cgroup is None or not str(path).endswith(
                "/" + relative_cgroup(spec.cgroup, spec.vm_id)
            ):
                raise OSError(errno.EINVAL, f"not this VM's cgroup: {path}")
            await asyncio.to_thread(_remove_cgroup, path)
        elif kind == "dir":
            if record["path"] not in (str(spec.jail_dir), str(spec.jail_root)):
                raise OSError(errno.EINVAL, f"not this VM's jail: {record['path']}")
            await asyncio.to_thread(_remove_jail_dir, Path(record["path"]))
        elif kind == "tap":
            if spec.tap is None or record["name"] != spec.tap.name:
                raise OSError(errno.EINVAL, f"not this VM's TAP: {record['name']}")
            await remove_tap_device(record.get("netns") or None, record["name"])
    except KeyError as e:
        raise OSError(errno.EINVAL, f"a malformed report: no {e}") from None


def _cgroup_pids(path: Path) -> list[str]:
    try:
        return (path / "cgroup.procs").read_text().split()
    except FileNotFoundError:
        return []


def _remove_cgroup(path: Path, attempts: int = 100) -> None:
    """rmdir a cgroup; a process that has just exited may hold it a moment longer."""
    for _ in range(attempts):
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
        time.sleep(0.01)
    raise OSError(errno.EBUSY, f"cgroup {path} still has processes")


def _remove_jail_dir(path: Path) -> None:
    """Remove a jail directory; never through a mount point (rmtree would cross it)."""
    if not path.exists():
        return
    mounted = mounts_under(path)
    if mounted:
        raise OSError(errno.EBUSY, f"mount points remain under {path}: {', '.join(mounted[:3])}")
    shutil.rmtree(path)


def _in_netns(netns_path: str, work: Callable[[], _T], missing: _T) -> _T:
    """Run `work` in the namespace (host.netns.run_in); `missing` if the namespace does not
    exist or its name is stale (it is gone, and its devices with it)."""
    if not host_netns.is_namespace(netns_path):
        return missing
    return host_netns.run_in(netns_path, work)

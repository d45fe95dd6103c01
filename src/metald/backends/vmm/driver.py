"""What a VMM supplies to the shared runtime (backends/vmm/runtime.py): a small driver.

The runtime owns everything every VMM needs — the VM's directory and files, disk copies, the
jail, launching, the pidfd watch, exits, adoption after a restart, orphans, CPU and memory
from /proc, the socket-path and kernel-command-line budgets. A driver owns only what is
particular to one VMM:

- `VmmDriver`: one per backend. It checks the host (binary, version, accelerator), builds the
  command line of one VMM process, connects to that process's control socket, and explains an
  exit. Its class attributes describe the VMM to the runtime (its control socket's name,
  whether a guest reset ends the process, which ``reboot=`` the guest kernel needs).
- `VmmControl`: one per VMM process, from `connect`. The verbs: prepare (configure a VMM that
  has started with its vCPUs stopped), start the vCPUs, pause, resume, reset, ask the guest to
  stop, the run state (for adoption), disk and network counters, and what the VMM said before
  it exited.

A control never launches or kills processes and never touches the host outside the VM's run
directory: the runtime does. Every failure is a `BackendError` whose message is safe to show
(the runtime strips host paths from it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from metald.core.models import LaunchSpec
from metald.core.states import VmState
from metald.host.process import ExitStatus


@dataclass(frozen=True)
class VmmHost:
    """What a driver found on this host at start-up (`VmmDriver.probe`)."""

    binary: str  # absolute path: a jailed VMM is executed by it
    version: str  # "" if unknown
    accelerator: str  # "kvm" or "tcg"
    accelerator_reason: str
    # Read-only host paths the VMM needs inside its jail: its binary, shared libraries,
    # loader, firmware (bind-mounted at the same place by the jailer).
    jail_paths: tuple[str, ...] = ()
    # Whether the VMM needs /dev/kvm in its jail.
    needs_kvm: bool = False
    # Under TCG, the host TSC rate the guest is told (see core/guest.py); else None.
    tsc_khz: int | None = None


@dataclass(frozen=True)
class Drive:
    """One disk as the VMM opens it: a per-VM copy (writable) or the original (read-only)."""

    drive_id: str  # the caller's disk id (spec.disks[i].id)
    node_id: str  # "disk<N>": N is its index, the root device first (it is /dev/vda)
    path: Path  # as the VMM sees it (inside its jail when jailed)
    read_only: bool
    source: Path  # the host file: the original, or the VM directory's copy
    is_root_device: bool


@dataclass(frozen=True)
class VmmFiles:
    """The files of one VMM process, as the VMM names them: paths inside its jail when it is
    jailed (its run directory is the jail's /run), host paths when it runs directly (its run
    directory is the VM's directory)."""

    run_dir: Path  # where the VMM makes its sockets and logs (writable by it)
    control_socket: Path
    console_log: Path
    kernel: Path
    initrd: Path | None
    drives: tuple[Drive, ...]
    agent_socket: Path | None = None  # a second serial port for the guest agent (tests)


@dataclass(frozen=True)
class LaunchContext:
    """One launch of one VM's VMM: what `argv` and `VmmControl.prepare` work from."""

    spec: LaunchSpec
    files: VmmFiles  # the VMM's view
    host_run_dir: Path  # files.run_dir as metald reaches it from the host
    uid: int  # the user the VMM runs as (metald's own when not jailed)
    gid: int
    kernel_cmdline: str  # the whole guest command line, within the kernel's budget


@dataclass(frozen=True)
class IoStats:
    """Counters of one VMM process since it started (None: the VMM does not report it)."""

    disk_read_bytes: int = 0
    disk_write_bytes: int = 0
    disk_read_ops: int = 0
    disk_write_ops: int = 0
    net_rx_bytes: int | None = None  # toward the guest
    net_tx_bytes: int | None = None  # from the guest
    net_rx_packets: int | None = None
    net_tx_packets: int | None = None


@dataclass(frozen=True)
class ExitReport:
    """Why a VMM process ended, for backend_info's exit_reason."""

    reason: str
    # The guest stopped itself (powered off, or reset where that ends the VMM): a shutdown
    # that finds the VMM gone reports "graceful" only then.
    by_guest: bool = False


class VmmControl(Protocol):
    """The control connection to one VMM process."""

    async def prepare(self, launch: LaunchContext) -> None:
        """Configure a VMM that has just started (vCPUs stopped) and check it is ready to
        boot. Called once per launch, after the VM's TAP (if any) is on its network."""

    async def start_vcpus(self) -> None:
        """Run the guest (QMP cont; Firecracker InstanceStart)."""

    async def pause(self) -> None: ...

    async def resume(self) -> None: ...

    async def reset(self) -> None:
        """A guest-visible hard reset in the same process (drivers whose
        `reboot_needs_new_process` is True are never asked)."""

    async def ask_guest_to_stop(self) -> None:
        """One request to the guest to run its shutdown path (Ctrl-Alt-Del). The runtime
        repeats it and waits for the process to exit. From the first request on, a guest
        reset counts as the guest's answer: a VMM that resets in place is told to end on it
        instead (a guest still in its kernel restarts on the keys)."""

    async def stop_abandoned(self) -> None:
        """The runtime stopped asking with the VMM still up (the request was cancelled):
        undo what asking changed."""

    async def runstate(self) -> VmState | None:
        """CREATED (vCPUs not started), RUNNING or PAUSED; None for a VMM that cannot carry
        on (crashed guest, internal error)."""

    async def io_stats(self) -> IoStats: ...

    def exit_event(self) -> str | None:
        """What the VMM said about its end before it exited (QEMU's SHUTDOWN reason), if
        anything; valid after `close`."""

    async def close(self) -> None:
        """Drop the connection (reading what the VMM still sent); the process is untouched."""


class VmmDriver(Protocol):
    """One VMM. Class attributes describe it to the runtime."""

    name: str  # "qemu", "firecracker": VM rows, jail directories, logs
    control_socket_name: str  # its control socket's file name in the run directory
    info_socket_key: str  # backend_info key for that socket's host path ("qmp_socket")
    reboot_needs_new_process: bool  # a guest reset ends the process (Firecracker)
    guest_reboot_arg: str  # the guest kernel's reboot= ("t" for microvm, "k" for Firecracker)
    guest_on_shutdown: str  # what the guest's init does at the end: "poweroff" or "reboot"
    supports_guest_agent: bool  # a second serial port (QEMU only)
    # A regex matching the names (/proc/<pid>/task/*/comm) of its vCPU threads, whose CPU
    # time is what metering bills ("": none known, no vCPU time).
    vcpu_thread: str

    async def probe(self) -> VmmHost:
        """Check the binary and the accelerator; BackendError saying what to install or set."""

    def argv(self, host: VmmHost, launch: LaunchContext) -> list[str]:
        """The command line that starts the VMM with its vCPUs stopped."""

    async def connect(
        self,
        vm_id: str,
        socket_path: str,
        *,
        host_run_dir: Path,
        uid: int,
        launch: LaunchContext | None,
        timeout: float,
    ) -> VmmControl:
        """Connect to a VMM's control socket. `socket_path` reaches the socket the runtime
        checked (a /proc/self/fd/N path, valid while the control lives: connect to it, never
        to a path of your own). `host_run_dir` is the VMM's run directory on the host and
        `uid` its user (files found there must be that user's); `launch` is None when
        adopting a VMM left by an earlier metald. BackendError if the VMM does not answer
        within `timeout`."""

    def describe_exit(
        self, event: str | None, status: ExitStatus | None, stderr_line: str
    ) -> ExitReport:
        """Why the process ended: the control's `exit_event`, the exit status (None when
        the process was not metald's child) and the first line of its stderr."""

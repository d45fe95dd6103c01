"""Firecracker as a driver of the shared VMM runtime (backends/vmm/driver.py).

The runtime launches `firecracker --api-sock <run dir>/firecracker.sock` (jailed like QEMU,
Firecracker's own seccomp filter left on) and hands the checked socket to `connect`. What is
particular to Firecracker, and lives here:

- It is configured after it starts, over its HTTP API (`api.py`, bodies from `config.py`):
  logger, metrics FIFO, serial console, machine, boot source, drives, NIC, entropy device;
  InstanceStart runs the guest. It cannot be reconfigured, and a guest reset ends the process
  (``reboot=k``; Firecracker exits with status 0), so a reboot is a new process: the driver
  says so with `reboot_needs_new_process` and the runtime relaunches.
- Its graceful stop is Ctrl-Alt-Del, which the guest's init turns into a reboot, so the
  process exits: `guest_on_shutdown` is "reboot".
- Disk and network counters come from its metrics FIFO (`metrics.py`), which a background
  task drains at `metrics_interval` after asking for a flush, so the FIFO never fills.
- It tells nothing before it exits: an exit is explained by its status and stderr alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import stat
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from metald.backends.firecracker import config
from metald.backends.firecracker.api import (
    STATE_NOT_STARTED,
    STATE_PAUSED,
    STATE_RUNNING,
    FirecrackerApi,
    FirecrackerApiError,
)
from metald.backends.firecracker.metrics import MetricsReader
from metald.backends.vmm.driver import (
    ExitReport,
    IoStats,
    LaunchContext,
    VmmControl,
    VmmDriver,
    VmmHost,
)
from metald.core.errors import BackendError
from metald.core.states import VmState
from metald.host.kvm import probe_image, probe_kvm_directly
from metald.host.process import ExitStatus
from metald.host.sockets import UnsafeSocket, fd_path, open_fifo_for_reading
from metald.jailer.host import dynamic_binary_paths, find_binary

log = logging.getLogger(__name__)

BINARY_ENV = "UNKEY_METALD_FIRECRACKER_BINARY"
SKIP_KVM_CHECK_ENV = "UNKEY_METALD_FIRECRACKER_SKIP_KVM_CHECK"
RELEASES_URL = "https://github.com/firecracker-microvm/firecracker/releases"
_VERSION = re.compile(r"v?(\d+\.\d+\.\d+\S*)")
_CONNECT_RETRY = 0.05  # s between attempts while the API socket is not listening yet

_STATES = {
    STATE_NOT_STARTED: VmState.CREATED,
    STATE_RUNNING: VmState.RUNNING,
    STATE_PAUSED: VmState.PAUSED,
}


class FirecrackerDriver:
    """Firecracker: the production VMM (KVM only)."""

    name = "firecracker"
    control_socket_name = "firecracker.sock"
    info_socket_key = "api_socket"
    reboot_needs_new_process = True
    guest_reboot_arg = "k"
    guest_on_shutdown = "reboot"
    supports_guest_agent = False
    # Firecracker names each vCPU thread
    vcpu_thread = r"^fc_vcpu \d+$"

    def __init__(
        self,
        binary: str = "firecracker",
        *,
        skip_kvm_check: bool = False,
        extra_jail_paths: Sequence[str] = (),
        api_timeout: float = 10.0,
        metrics_interval: float = 1.0,
        kvm_probe_timeout: float = 3.0,
    ) -> None:
        self.binary = binary
        self.kvm_probe_timeout = kvm_probe_timeout
        self.skip_kvm_check = skip_kvm_check
        self.extra_jail_paths = tuple(extra_jail_paths)
        self.api_timeout = api_timeout
        self.metrics_interval = metrics_interval

    async def probe(self) -> VmmHost:
        try:
            path = await asyncio.to_thread(find_binary, self.binary)
        except FileNotFoundError as e:
            raise BackendError(
                f"Firecracker binary {self.binary!r} not found: install it from "
                f"{RELEASES_URL} and set {BINARY_ENV}"
            ) from e
        version = await _read_version(path)
        if self.skip_kvm_check:
            log.warning("KVM check skipped (%s): development only", SKIP_KVM_CHECK_ENV)
            reason = f"KVM check skipped ({SKIP_KVM_CHECK_ENV})"
        else:
            # Booting a tiny firmware through the KVM API: /dev/kvm answering proves nothing
            # under broken nested virtualisation (host/kvm.py).
            result = await asyncio.to_thread(
                probe_kvm_directly, probe_image(), timeout=self.kvm_probe_timeout
            )
            if not result.works:
                raise BackendError(
                    f"Firecracker needs working KVM, and here {result.detail}: run metald on "
                    f"a host with KVM (or use the qemu backend; {SKIP_KVM_CHECK_ENV}=true "
                    "skips this check on a development host)"
                )
            reason = result.detail
        try:
            libraries = await asyncio.to_thread(dynamic_binary_paths, path)
        except OSError as e:
            raise BackendError(f"cannot find what {path} needs from the host: {e}") from e
        jail_paths = tuple(dict.fromkeys([*libraries, *self.extra_jail_paths]))
        log.info("firecracker %s at %s (%s)", version or "(version unknown)", path, reason)
        return VmmHost(
            binary=path,
            version=version,
            accelerator="kvm",
            accelerator_reason=reason,
            jail_paths=jail_paths,
            needs_kvm=True,
        )

    def argv(self, host: VmmHost, launch: LaunchContext) -> list[str]:
        # Never --no-seccomp: Firecracker's own filter stays on inside metald's jail.
        return [
            host.binary,
            "--api-sock", str(launch.files.control_socket),
            "--id", config.instance_id(launch.spec.vm_id),
            "--level", config.LOG_LEVEL,
        ]  # fmt: skip

    async def connect(
        self,
        vm_id: str,
        socket_path: str,
        *,
        host_run_dir: Path,
        uid: int,
        launch: LaunchContext | None,
        timeout: float,
    ) -> FirecrackerControl:
        # httpx opens a new connection whenever its pool wants one (after an idle spell, or
        # two calls at once), each time through the path: so the control holds a descriptor
        # of its own to the socket inode the runtime checked, valid for as long as it lives,
        # whatever the runtime does with its descriptor after this call.
        socket_fd = _hold_socket(socket_path)
        api = FirecrackerApi(fd_path(socket_fd), timeout=self.api_timeout)
        try:
            info = await _wait_until_answering(api, timeout)
            expected = config.instance_id(vm_id)
            if info.get("id") != expected:
                raise BackendError(
                    f"the API socket answers for instance {info.get('id')!r}, not {expected!r}"
                )
            control = FirecrackerControl(
                api, socket_fd=socket_fd, metrics_interval=self.metrics_interval
            )
            if launch is None:
                control.adopt(info, host_run_dir, owner_uid=uid)
        except BaseException:
            await api.aclose()
            os.close(socket_fd)
            raise
        return control

    def describe_exit(
        self, event: str | None, status: ExitStatus | None, stderr_line: str
    ) -> ExitReport:
        if status is None:
            return ExitReport("vmm exited unexpectedly")
        if status.signal is not None:
            return ExitReport(f"vmm exited unexpectedly (signal {status.signal})")
        if status.exit_code == 0:
            # A guest reset (reboot=k) or Ctrl-Alt-Del: Firecracker ends with the guest.
            return ExitReport("guest reset or shut down (firecracker exited)", by_guest=True)
        detail = f": {stderr_line}" if stderr_line else ""
        return ExitReport(f"vmm exited unexpectedly (exit status {status.exit_code}){detail}")


class FirecrackerControl:
    """The API connection to one Firecracker process, and its metrics."""

    def __init__(
        self, api: FirecrackerApi, *, socket_fd: int | None = None, metrics_interval: float = 1.0
    ) -> None:
        self.api = api
        self._socket_fd = socket_fd  # what api's path reaches (closed with the control)
        self.metrics_interval = metrics_interval
        self._started = False  # InstanceStart done: metrics can be flushed
        self._fifo_fd: int | None = None
        self._metrics: MetricsReader | None = None
        self._drainer: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ configuration

    async def prepare(self, launch: LaunchContext) -> None:
        if self._metrics is not None:
            raise BackendError("this Firecracker has been configured already")
        fifo = await asyncio.to_thread(make_run_files, launch)
        self._open_metrics(fifo, launch.uid)
        files = launch.files
        api = self.api
        # The logger and metrics first: what Firecracker says about the rest goes there.
        await api.put_logger(config.logger(files))
        await api.put_metrics(config.metrics(files))
        await api.put_serial(config.serial(files))
        await api.put_machine_config(config.machine_config(launch))
        await api.put_boot_source(config.boot_source(launch))
        for drive_id, body in config.drives(files):
            await api.put_drive(drive_id, body)
        if launch.spec.nic is not None:
            iface_id, body = config.network_interface(launch.spec.nic)
            await api.put_network_interface(iface_id, body)
        await api.put_entropy(config.entropy())

    def adopt(self, info: dict[str, object], host_run_dir: Path, *, owner_uid: int) -> None:
        """Carry on with a VMM an earlier metald configured: its state from `info` (GET /)
        and its metrics FIFO again (totals restart at zero: the earlier reader's are gone).
        `owner_uid` is the owner of the API socket the runtime checked: the VMM's user."""
        self._started = info.get("state") in (STATE_RUNNING, STATE_PAUSED)
        try:
            self._open_metrics(host_run_dir / config.METRICS_FIFO_NAME, owner_uid)
        except (OSError, BackendError) as e:
            # Not worth losing a running VM over: it runs on without disk and net counters.
            log.warning("adopted Firecracker without its metrics FIFO: %s", e)

    def _open_metrics(self, fifo: Path, owner_uid: int) -> None:
        try:
            fd = open_fifo_for_reading(fifo, owner_uid)
        except UnsafeSocket as e:
            raise BackendError(f"the metrics FIFO: {e.strerror}") from e
        except OSError as e:
            raise BackendError(f"cannot open the metrics FIFO: {e.strerror}") from e
        self._fifo_fd = fd
        self._metrics = MetricsReader(fd)
        self._drainer = asyncio.create_task(self._drain_forever(), name="firecracker-metrics")

    # --------------------------------------------------------------------------- verbs

    async def start_vcpus(self) -> None:
        await self.api.instance_start()
        self._started = True

    async def pause(self) -> None:
        await self.api.patch_vm("Paused")

    async def resume(self) -> None:
        await self.api.patch_vm("Resumed")

    async def reset(self) -> None:
        raise BackendError("Firecracker cannot reset a guest in place: a reboot is a new process")

    async def ask_guest_to_stop(self) -> None:
        await self.api.send_ctrl_alt_del()

    async def stop_abandoned(self) -> None:
        return None  # asking changed nothing: a guest reset always ends Firecracker

    async def runstate(self) -> VmState | None:
        info = await self.api.get_instance_info()
        state = _STATES.get(str(info["state"]))
        if state in (VmState.RUNNING, VmState.PAUSED):
            self._started = True
        return state

    async def io_stats(self) -> IoStats:
        if self._metrics is None:
            return IoStats()
        await self._flush()
        t = self._metrics.drain()
        return IoStats(
            disk_read_bytes=t.disk_read_bytes,
            disk_write_bytes=t.disk_write_bytes,
            disk_read_ops=t.disk_read_ops,
            disk_write_ops=t.disk_write_ops,
            net_rx_bytes=t.net_rx_bytes,
            net_tx_bytes=t.net_tx_bytes,
            net_rx_packets=t.net_rx_packets,
            net_tx_packets=t.net_tx_packets,
        )

    def exit_event(self) -> str | None:
        return None  # Firecracker says nothing before it exits

    async def close(self) -> None:
        if self._drainer is not None:
            self._drainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drainer
            self._drainer = None
        if self._metrics is not None:
            self._metrics.drain()  # what the VMM wrote last, for a caller still holding us
        if self._fifo_fd is not None:
            os.close(self._fifo_fd)
            self._fifo_fd = None
        await self.api.aclose()
        if self._socket_fd is not None:
            os.close(self._socket_fd)
            self._socket_fd = None

    # ------------------------------------------------------------------------ metrics

    async def _flush(self) -> None:
        """Ask for a metrics line (only after InstanceStart). A failure is not the caller's
        problem: the totals stay what they were, and the next flush catches up."""
        if not self._started:
            return
        try:
            await self.api.flush_metrics()
        except BackendError as e:
            log.debug("FlushMetrics: %s", e)

    async def _drain_forever(self) -> None:
        assert self._metrics is not None
        while True:
            await asyncio.sleep(self.metrics_interval)
            await self._flush()
            self._metrics.drain()


# ---------------------------------------------------------------------------- helpers


async def _wait_until_answering(api: FirecrackerApi, timeout: float) -> dict[str, object]:
    """GET / until it answers; a socket that is not listening yet is retried."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await api.get_instance_info()
        except FirecrackerApiError:
            raise
        except BackendError as e:
            if time.monotonic() + _CONNECT_RETRY >= deadline:
                raise BackendError(
                    f"Firecracker did not answer on its API socket within {timeout:g} s ({e})"
                ) from e
        await asyncio.sleep(_CONNECT_RETRY)


def _hold_socket(socket_path: str) -> int:
    """An O_PATH descriptor of the socket `socket_path` reaches. The path is the runtime's
    /proc/self/fd/N, a link to the inode it checked, so it is followed on purpose."""
    try:
        fd = os.open(socket_path, os.O_PATH | os.O_CLOEXEC)
    except OSError as e:
        raise BackendError(f"cannot reach the API socket: {e.strerror}") from e
    if not stat.S_ISSOCK(os.fstat(fd).st_mode):
        os.close(fd)
        raise BackendError("the API socket is not a socket")
    return fd


def make_run_files(launch: LaunchContext) -> Path:
    """The metrics FIFO and the (empty) log file in the VMM's run directory, owned by the
    VMM's user: Firecracker opens both but creates neither. Refuses anything already there
    (never follows a link the VMM may have planted). Returns the FIFO's host path."""
    run_dir = launch.host_run_dir
    dir_fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        try:
            os.mkfifo(config.METRICS_FIFO_NAME, 0o600, dir_fd=dir_fd)
            os.chown(
                config.METRICS_FIFO_NAME,
                launch.uid,
                launch.gid,
                dir_fd=dir_fd,
                follow_symlinks=False,
            )
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            log_fd = os.open(config.LOG_FILE_NAME, flags, 0o600, dir_fd=dir_fd)
            try:
                os.fchown(log_fd, launch.uid, launch.gid)
            finally:
                os.close(log_fd)
        except FileExistsError as e:
            raise BackendError(
                f"{e.filename or 'a file'} already exists in the VMM's run directory"
            ) from e
        except OSError as e:
            raise BackendError(f"cannot make the VMM's metrics FIFO and log: {e}") from e
    finally:
        os.close(dir_fd)
    return run_dir / config.METRICS_FIFO_NAME


async def _read_version(binary: str) -> str:
    try:
        proc = await asyncio.create_subprocess_exec(
            binary,
            "--version",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
    except (OSError, TimeoutError) as e:
        raise BackendError(f"cannot run {binary!r} --version: {e}") from e
    match = _VERSION.search(out.decode(errors="replace"))
    return match.group(1) if match else ""


if TYPE_CHECKING:  # mypy checks that both satisfy the runtime's protocols

    def _is_driver(driver: FirecrackerDriver) -> VmmDriver:
        return driver

    def _is_control(control: FirecrackerControl) -> VmmControl:
        return control

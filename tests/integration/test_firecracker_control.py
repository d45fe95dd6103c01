"""The Firecracker driver and control against the API stand-in (tests/fakes/firecracker).

The stand-in serves Firecracker's API strictly by the spec (every body validated against its
schema, the ordering rules enforced) and runs the guest under QEMU, so a request the spec
would reject fails these tests. When a real `firecracker` is on PATH, the last test sends a
real one everything the driver sends, up to InstanceStart, and checks what it was told: that
needs no working KVM guest (Firecracker takes InstanceStart where nested KVM cannot run the
guest: its vCPU threads start, the guest never gets far), so it runs here; it is skipped
without one. The VMM runs unjailed here, started as the runtime would
start it (the driver's argv) and reached as the runtime reaches it (a checked socket handed
over as /proc/self/fd/N); the runtime itself is not involved. The default guest image comes
from the asset store at $METALD_TEST_ASSETS (default <repo>/var/assets).

Every process a test starts is ended by its pid; the run directories are removed.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakes.firecracker.make_launcher import write_launcher
from fakes.firecracker.real import real_firecracker_binary, thread_status

from metald.assets.store import LocalAssetStore
from metald.backends.firecracker.api import FirecrackerApiError
from metald.backends.firecracker.driver import FirecrackerControl, FirecrackerDriver
from metald.backends.vmm.driver import Drive, LaunchContext, VmmFiles, VmmHost
from metald.core.errors import BackendError
from metald.core.models import LaunchSpec, NicSpec, RateLimit, ResolvedDisk
from metald.core.states import VmState
from metald.host.process import ExitStatus
from metald.host.sockets import fd_path, open_socket_path

STORE_DIR = Path(os.environ.get("METALD_TEST_ASSETS", Path(__file__).parents[2] / "var" / "assets"))
DEADLINE = 90.0  # TCG guests on a busy 2-CPU machine; typically a few seconds
CONNECT_TIMEOUT = 30.0
READY = re.compile(r"^METALD-GUEST READY vm=(\S+) ", re.M)
HEARTBEAT = re.compile(r"^METALD-GUEST HEARTBEAT (\d+)\s*$", re.M)
SHUTDOWN = re.compile(r"^METALD-GUEST SHUTDOWN\s*$", re.M)
NET = re.compile(r"^METALD-GUEST NET eth0 ", re.M)
HOST_IP, GUEST_IP = "172.30.98.1", "172.30.98.2"


@pytest.fixture(scope="module")
def launcher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Named "firecracker": its process's comm, which the session leak check looks for.
    return write_launcher(tmp_path_factory.mktemp("bin") / "firecracker", Path(sys.executable))


@pytest.fixture(scope="module")
def boot_files() -> tuple[Path, Path | None]:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (Debian package qemu-system-x86)")
    store = LocalAssetStore(STORE_DIR)
    if store.default() is None:
        pytest.skip(f"no default guest image in {STORE_DIR} (`make guest` builds it)")
    return store.default_boot()


@dataclass
class Vmm:
    """One VMM process started as the runtime would, and its run directory."""

    proc: subprocess.Popen[bytes]
    launch: LaunchContext

    @property
    def run_dir(self) -> Path:
        return self.launch.host_run_dir

    def console(self) -> str:
        try:
            return self.launch.files.console_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stderr(self) -> str:
        return (self.run_dir / "stderr.log").read_text(errors="replace")

    async def wait_console(self, pattern: re.Pattern[str], count: int = 1) -> None:
        await wait_until(
            lambda: len(pattern.findall(self.console())) >= count,
            f"{pattern.pattern!r} x{count} on the console",
        )

    def heartbeats(self) -> int:
        return len(HEARTBEAT.findall(self.console()))

    async def wait_exit(self) -> ExitStatus:
        await wait_until(lambda: self.proc.poll() is not None, "the VMM's exit")
        code = self.proc.returncode
        return ExitStatus(signal=-code) if code < 0 else ExitStatus(exit_code=code)


async def wait_until(predicate: Callable[[], object], what: str, timeout: float = DEADLINE) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"not seen within {timeout:.0f} s: {what}")


class Rig:
    """Starts VMMs with the driver's command line and connects to them; ends them all."""

    def __init__(self, driver: FirecrackerDriver, host: VmmHost) -> None:
        self.driver, self.host = driver, host
        self.vmms: list[Vmm] = []

    def launch_context(
        self,
        vm_id: str,
        boot_files: tuple[Path, Path | None],
        disks: tuple[Drive, ...] = (),
        nic: NicSpec | None = None,
        vcpus: int = 1,
    ) -> LaunchContext:
        # A short directory: the API and the stand-in's QMP socket paths must fit sun_path.
        run_dir = Path(tempfile.mkdtemp(prefix="fc"))
        kernel, initrd = boot_files
        cmdline = f"console=ttyS0 reboot=k panic=-1 quiet metald.vm_id={vm_id}"
        if nic is not None:
            cmdline += f" {nic.guest_args}"
        return LaunchContext(
            spec=LaunchSpec(
                vm_id=vm_id,
                vcpu_count=vcpus,
                memory_bytes=256 * 1024 * 1024,
                kernel=kernel,
                initrd=initrd,
                kernel_args="",
                disks=tuple(
                    ResolvedDisk(d.drive_id, d.source, d.read_only, d.is_root_device) for d in disks
                ),
                nic=nic,
            ),
            files=VmmFiles(
                run_dir=run_dir,
                control_socket=run_dir / self.driver.control_socket_name,
                console_log=run_dir / "console.log",
                kernel=kernel,
                initrd=initrd,
                drives=disks,
            ),
            host_run_dir=run_dir,
            uid=os.getuid(),
            gid=os.getgid(),
            kernel_cmdline=f"{cmdline} metald.on_shutdown={self.driver.guest_on_shutdown}",
        )

    def start(self, launch: LaunchContext, argv: list[str] | None = None) -> Vmm:
        with (launch.host_run_dir / "stderr.log").open("wb") as err:
            proc = subprocess.Popen(
                argv or self.driver.argv(self.host, launch),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                cwd=launch.host_run_dir,
            )
        vmm = Vmm(proc, launch)
        self.vmms.append(vmm)
        return vmm

    async def connect(self, vmm: Vmm, *, adopt: bool = False) -> FirecrackerControl:
        """As the runtime does: wait for the socket, check it, hand it over by descriptor."""
        sock = vmm.launch.files.control_socket
        await wait_until(lambda: sock.exists() or vmm.proc.poll() is not None, "the API socket")
        assert vmm.proc.poll() is None, vmm.stderr()
        fd = open_socket_path(sock, os.getuid())
        try:
            control = await self.driver.connect(
                vmm.launch.spec.vm_id,
                fd_path(fd),
                host_run_dir=vmm.run_dir,
                uid=os.getuid(),
                launch=None if adopt else vmm.launch,
                timeout=CONNECT_TIMEOUT,
            )
        finally:
            os.close(fd)  # the control must not depend on the runtime's descriptor
        return control

    def close(self) -> None:
        for vmm in self.vmms:
            if vmm.proc.poll() is None:
                vmm.proc.kill()  # by its pid
            vmm.proc.wait()
            shutil.rmtree(vmm.run_dir, ignore_errors=True)


@pytest.fixture
async def rig(launcher: Path) -> AsyncIterator[Rig]:
    driver = FirecrackerDriver(str(launcher), skip_kvm_check=True, metrics_interval=0.2)
    r = Rig(driver, await driver.probe())
    yield r
    r.close()


@pytest.fixture
def netns() -> Iterator[str]:
    """A namespace the test makes, with TAP `tap0` (HOST_IP/24, up); removed afterwards."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("a network namespace and a TAP need root and iproute2")
    name = f"fcdrv{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for cmd in (
            "tuntap add dev tap0 mode tap",
            f"addr add {HOST_IP}/24 dev tap0",
            "link set tap0 up",
            "link set lo up",
        ):
            subprocess.run(["ip", "-n", name, *cmd.split()], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def read_only_disk(tmp_path: Path) -> Drive:
    image = tmp_path / "data.img"
    with image.open("wb") as f:
        f.write(b"metald" * 1000)
        f.truncate(8 * 1024 * 1024)
    return Drive("data-ro", "disk0", image, True, image, False)


async def test_probe_finds_the_standin_binary(rig: Rig, launcher: Path) -> None:
    assert rig.host.binary == str(launcher)
    assert rig.host.version == "1.16.1"
    assert rig.host.needs_kvm


async def test_connect_times_out_on_a_socket_nobody_serves(rig: Rig, tmp_path: Path) -> None:
    import socket

    path = Path(tempfile.mkdtemp(prefix="fc")) / "firecracker.sock"
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(path))  # bound, never listening: connections are refused
            fd = open_socket_path(path, os.getuid())
            try:
                with pytest.raises(BackendError, match="did not answer on its API socket"):
                    await rig.driver.connect(
                        "vm-x", fd_path(fd), host_run_dir=tmp_path, uid=0, launch=None, timeout=0.5
                    )
            finally:
                os.close(fd)
    finally:
        shutil.rmtree(path.parent)


async def test_connect_refuses_another_instance(
    rig: Rig, boot_files: tuple[Path, Path | None]
) -> None:
    launch = rig.launch_context("vm-fc-mine", boot_files)
    argv = rig.driver.argv(rig.host, launch)
    argv[argv.index("--id") + 1] = "vm-fc-other"
    vmm = rig.start(launch, argv)
    with pytest.raises(BackendError, match="answers for instance 'vm-fc-other'"):
        await rig.connect(vmm)


@pytest.mark.guest
async def test_a_vms_life(rig: Rig, boot_files: tuple[Path, Path | None], tmp_path: Path) -> None:
    launch = rig.launch_context("vm-fc-life", boot_files, (read_only_disk(tmp_path),))
    vmm = rig.start(launch)
    control = await rig.connect(vmm)
    try:
        assert await control.runstate() == VmState.CREATED
        await control.prepare(launch)  # every body checked by the stand-in against the spec
        assert (vmm.run_dir / "metrics.fifo").is_fifo()
        assert (vmm.run_dir / "firecracker.log").is_file()
        assert await control.runstate() == VmState.CREATED
        assert not READY.search(vmm.console()), "the guest ran before InstanceStart"

        await control.start_vcpus()
        assert await control.runstate() == VmState.RUNNING
        await vmm.wait_console(READY)
        assert READY.findall(vmm.console()) == ["vm-fc-life"]

        # A refused call names itself and carries Firecracker's fault_message.
        with pytest.raises(FirecrackerApiError) as refused:
            await control.api.put_boot_source({"kernel_image_path": str(launch.files.kernel)})
        assert refused.value.call == "PUT /boot-source"
        assert refused.value.status == 400
        assert str(refused.value).startswith("PUT /boot-source: ")
        assert refused.value.fault_message

        await control.pause()
        assert await control.runstate() == VmState.PAUSED
        beats = vmm.heartbeats()
        await asyncio.sleep(2.5)  # heartbeats come every second while the guest runs
        assert vmm.heartbeats() == beats, "the guest ran while paused"
        await control.resume()
        assert await control.runstate() == VmState.RUNNING
        await vmm.wait_console(HEARTBEAT, beats + 1)

        # The kernel read the read-only disk when it probed it (partition table). Totals
        # only grow across Firecracker's resetting flushes.
        first = await control.io_stats()
        assert first.disk_read_bytes > 0 and first.disk_read_ops > 0
        assert first.disk_write_bytes == 0 and first.disk_write_ops == 0
        await asyncio.sleep(0.5)  # the background drainer flushes a few times meanwhile
        second = await control.io_stats()
        assert second.disk_read_bytes >= first.disk_read_bytes
        assert second.disk_read_ops >= first.disk_read_ops

        await control.ask_guest_to_stop()
        status = await vmm.wait_exit()
    finally:
        await control.close()
    assert SHUTDOWN.search(vmm.console())
    assert status == ExitStatus(exit_code=0), vmm.stderr()
    assert control.exit_event() is None
    report = rig.driver.describe_exit(control.exit_event(), status, "")
    assert report.by_guest
    assert not launch.files.control_socket.exists()  # Firecracker removes it on exit


@pytest.mark.guest
async def test_adoption_carries_on_with_a_running_vmm(
    rig: Rig, boot_files: tuple[Path, Path | None], tmp_path: Path
) -> None:
    launch = rig.launch_context("vm-fc-adopt", boot_files, (read_only_disk(tmp_path),))
    vmm = rig.start(launch)
    first = await rig.connect(vmm)
    try:
        await first.prepare(launch)
        await first.start_vcpus()
        await vmm.wait_console(READY)
        await first.pause()
    finally:
        await first.close()  # as when metald stops: the VMM carries on

    control = await rig.connect(vmm, adopt=True)
    try:
        assert await control.runstate() == VmState.PAUSED
        await control.resume()
        assert await control.runstate() == VmState.RUNNING
        # The FIFO is read again: a flush reaches this reader (the earlier totals are gone).
        stats = await control.io_stats()
        assert stats.disk_write_bytes == 0
        assert control._metrics is not None and control._metrics.totals.lines > 0
        await control.ask_guest_to_stop()
        status = await vmm.wait_exit()
    finally:
        await control.close()
    assert status == ExitStatus(exit_code=0), vmm.stderr()


@pytest.mark.guest
async def test_a_killed_vmm_is_an_unexpected_exit(
    rig: Rig, boot_files: tuple[Path, Path | None]
) -> None:
    launch = rig.launch_context("vm-fc-reset", boot_files)
    vmm = rig.start(launch)
    control = await rig.connect(vmm)
    try:
        with pytest.raises(BackendError, match="a reboot is a new process"):
            await control.reset()
        await control.prepare(launch)
        await control.start_vcpus()
        await vmm.wait_console(READY)
    finally:
        await control.close()
    vmm.proc.kill()  # an unexpected end, by its pid
    status = await vmm.wait_exit()
    report = rig.driver.describe_exit(None, status, "")
    assert report.reason == "vmm exited unexpectedly (signal 9)"
    assert not report.by_guest


@pytest.mark.guest
async def test_the_guest_network_with_rate_limits(
    rig: Rig, boot_files: tuple[Path, Path | None], netns: str
) -> None:
    nic = NicSpec(
        netns=netns,
        tap="tap0",
        mac="02:00:ac:1e:62:02",
        guest_args=f"metald.ip4={GUEST_IP}/24 metald.gw4={HOST_IP}",
        rx_rate_limit=RateLimit(bandwidth=10_000_000, burst=1_000_000),
        tx_rate_limit=RateLimit(bandwidth=5_000_000, refill_time_ms=100),
    )
    launch = rig.launch_context("vm-fc-net", boot_files, nic=nic)
    # The VMM runs in the VM's namespace, as the jailer puts it there.
    vmm = rig.start(launch, ["ip", "netns", "exec", netns, *rig.driver.argv(rig.host, launch)])
    control = await rig.connect(vmm)
    try:
        await control.prepare(launch)  # the interface and its limiters, checked by the spec
        await control.start_vcpus()
        await vmm.wait_console(NET)
        ping = await asyncio.to_thread(
            subprocess.run,
            ["ip", "netns", "exec", netns, "ping", "-c", "3", "-W", "5", GUEST_IP],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert ping.returncode == 0, ping.stdout + ping.stderr
        stats = await control.io_stats()
        # The pings and their answers crossed the card (ARP too): both directions counted.
        assert stats.net_rx_packets is not None and stats.net_rx_packets >= 3
        assert stats.net_tx_packets is not None and stats.net_tx_packets >= 3
        assert stats.net_rx_bytes and stats.net_tx_bytes
        await control.ask_guest_to_stop()
        status = await vmm.wait_exit()
    finally:
        await control.close()
    assert status == ExitStatus(exit_code=0), vmm.stderr()


# -- a real Firecracker, API only -------------------------------------------------------------


async def get_json(socket_path: Path, path: str) -> Any:
    async with httpx.AsyncClient(
        transport=httpx.AsyncHTTPTransport(uds=str(socket_path)), base_url="http://localhost"
    ) as client:
        r = await client.get(path)
    assert r.status_code == 200, r.text
    return r.json()


async def test_a_real_firecracker_takes_every_request_the_driver_sends(
    netns: str, tmp_path: Path
) -> None:
    binary = real_firecracker_binary()
    store = LocalAssetStore(STORE_DIR)
    if store.default() is None:
        pytest.skip(f"no default guest image in {STORE_DIR} (`make guest` builds it)")
    driver = FirecrackerDriver(binary, skip_kvm_check=True, metrics_interval=0.2)
    rig = Rig(driver, await driver.probe())
    try:
        nic = NicSpec(
            netns=netns,
            tap="tap0",
            mac="02:00:ac:1e:62:03",
            guest_args=f"metald.ip4={GUEST_IP}/24 metald.gw4={HOST_IP}",
            rx_rate_limit=RateLimit(bandwidth=10_000_000, burst=1_000_000),
            tx_rate_limit=RateLimit(bandwidth=5_000_000, refill_time_ms=100),
        )
        # 3 vCPUs: odd counts are fine with SMT off (a real Firecracker says so).
        launch = rig.launch_context(
            "vm-fc-real", store.default_boot(), (read_only_disk(tmp_path),), nic=nic, vcpus=3
        )
        vmm = rig.start(launch, ["ip", "netns", "exec", netns, *driver.argv(rig.host, launch)])
        control = await rig.connect(vmm)
        try:
            # Its own seccomp filter is on from the start where the API is served (the VMM
            # thread gets its filter at InstanceStart).
            assert thread_status(vmm.proc.pid)["fc_api"]["Seccomp"] == "2"
            await control.prepare(launch)
            assert await control.runstate() == VmState.CREATED
            log = (vmm.run_dir / "firecracker.log").read_text()
            assert "Status code: 400" not in log, log

            # What it was told, read back.
            sock = launch.files.control_socket
            cfg = await get_json(sock, "/vm/config")
            assert cfg["machine-config"] | {"vcpu_count": 3, "mem_size_mib": 256, "smt": False} \
                == cfg["machine-config"]  # fmt: skip
            assert cfg["boot-source"]["boot_args"] == launch.kernel_cmdline
            assert cfg["boot-source"]["kernel_image_path"] == str(launch.files.kernel)
            [drive] = cfg["drives"]
            assert (drive["drive_id"], drive["is_read_only"], drive["is_root_device"]) == (
                "data_ro", True, False
            )  # fmt: skip
            [iface] = cfg["network-interfaces"]
            assert (iface["host_dev_name"], iface["guest_mac"]) == ("tap0", nic.mac)
            assert iface["rx_rate_limiter"]["bandwidth"] == {
                "size": 10_000_000, "refill_time": 1000, "one_time_burst": 1_000_000
            }  # fmt: skip
            assert iface["tx_rate_limiter"]["bandwidth"] == {
                "size": 500_000, "refill_time": 100, "one_time_burst": None
            }  # fmt: skip
            assert cfg["entropy"] is not None

            await control.start_vcpus()
            assert await control.runstate() == VmState.RUNNING
            threads = thread_status(vmm.proc.pid)
            assert {"fc_vcpu 0", "fc_vcpu 1", "fc_vcpu 2"} <= set(threads), sorted(threads)
            for name in ("firecracker", "fc_api", "fc_vcpu 0"):
                assert threads[name]["Seccomp"] == "2", (name, threads[name])
            await control.pause()
            assert await control.runstate() == VmState.PAUSED
            await control.resume()
            assert await control.runstate() == VmState.RUNNING
            # Its metrics FIFO is read: the line it writes at the start and a flush's.
            await control.io_stats()
            assert control._metrics is not None and control._metrics.totals.lines >= 2
            assert control._metrics.totals.dropped_lines == 0

            with pytest.raises(FirecrackerApiError, match="not supported after starting"):
                await control.api.put_boot_source({"kernel_image_path": str(launch.files.kernel)})
        finally:
            await control.close()
        assert vmm.proc.poll() is None, vmm.stderr()
    finally:
        rig.close()

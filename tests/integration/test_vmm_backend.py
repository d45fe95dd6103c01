"""The VMM runtime with each driver against real guests (the default guest image, under TCG
on these machines): QEMU, and Firecracker driven through its API stand-in
(tests/fakes/firecracker: the spec's API, strictly, with the guest itself under QEMU; a real
`firecracker` cannot run here). Every test that takes `backend` runs once per driver; the few
about QEMU's own command line, QMP socket or stderr say so and skip for Firecracker.

Uses the asset store at $METALD_TEST_ASSETS (default: <repo>/var/assets, which `make guest`
builds); skipped when it has no default guest. Every VM lives under a per-test temp dir; the
teardown destroys each one through the backend, then kills anything still recorded there by
pid and start time, and removes the directory.

Tests marked BOTH run twice: with QEMU run directly ("direct") and launched through the
jailer ("jailed": needs root, skipped otherwise). A jailed run has its own jail base under
the test's temp dir and a cgroup parent of this test session (checked empty at the end); its
teardown kills any process whose root is a jail there. Network tests make their own network
namespace (pyroute2) and remove it; nothing touches the machine's own namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
from fakes.firecracker.make_launcher import standin_host_paths, write_launcher

from metald.assets.store import LocalAssetStore
from metald.backends.firecracker.driver import FirecrackerDriver
from metald.backends.qemu.driver import QemuDriver
from metald.backends.qemu.host_paths import qemu_host_paths
from metald.backends.vmm.jail import JailSettings, processes_rooted_at
from metald.backends.vmm.runtime import VmmRuntime
from metald.core.errors import BackendError, InvalidArgument
from metald.core.models import LaunchSpec, NicSpec, ProcessIdentity, ResolvedDisk
from metald.core.states import VmState
from metald.host.mounts import mounts_under
from metald.host.process import identity_of, is_alive, kill_identity, read_cmdline
from metald.jailer import ensure_jail_user
from metald.jailer.cgroups import cgroup_dir, cgroup_mount

pytestmark = pytest.mark.guest

STORE_DIR = Path(os.environ.get("METALD_TEST_ASSETS", Path(__file__).parents[2] / "var" / "assets"))
ACCEL = os.environ.get("METALD_TEST_QEMU_ACCEL", "auto")
BOOT_TIMEOUT = 90.0  # TCG on a busy 2-CPU machine; typically ~4 s

READY = re.compile(r"^METALD-GUEST READY vm=(\S+) boot=(\S+)", re.M)
HEARTBEAT = re.compile(r"^METALD-GUEST HEARTBEAT (\d+)\s*$", re.M)
SHUTDOWN = re.compile(r"^METALD-GUEST SHUTDOWN\s*$", re.M)
NET = re.compile(r"^METALD-GUEST NET (\S+) ip4=(\S+) ip6=(\S+)\s*$", re.M)

# Run a test with QEMU run directly and jailed.
BOTH = pytest.mark.parametrize("mode", ["direct", "jailed"])
CGROUP_PARENT = f"metald-test-{os.getpid()}"
_T = TypeVar("_T")


@pytest.fixture(scope="module")
def boot_files() -> tuple[Path, Path | None]:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (Debian package qemu-system-x86)")
    store = LocalAssetStore(STORE_DIR)
    if store.default() is None:
        pytest.skip(
            f"no default guest image in {STORE_DIR}: run "
            f"`.venv/bin/metald assets build --store {STORE_DIR}` (or set METALD_TEST_ASSETS)"
        )
    return store.default_boot()


@pytest.fixture
def vm_root(tmp_path: Path) -> Iterator[Path]:
    # tempfile's directory (the session's, see conftest), short enough for the stand-in's
    # sockets; made after tmp_path: the session's base temp dir is wiped when pytest first
    # makes a tmp_path, so a directory made before that would vanish under a running test.
    root = Path(tempfile.mkdtemp(prefix="v")) / "vms"
    yield root
    # Whatever a test left: kill it by recorded pid + start time (never by name).
    for process_file in root.glob("*/process.json"):
        with contextlib.suppress(Exception):
            data = json.loads(process_file.read_text())
            ident = ProcessIdentity(int(data["pid"]), int(data["start_time"]))
            if is_alive(ident):
                os.kill(ident.pid, signal.SIGKILL)
    shutil.rmtree(root.parent, ignore_errors=True)


@dataclass(frozen=True)
class Profile:
    """What a test may expect of one driver."""

    kind: str
    socket_key: str  # backend_info's control socket entry
    socket_name: str
    poweroff_reason: str  # the exit reason when the guest ends itself
    reboot_in_place: bool  # False: a reboot is a new process (and, jailed, a new jail)
    comm: str  # the VMM process's name


PROFILES = {
    "qemu": Profile("qemu", "qmp_socket", "qmp.sock", "guest powered off", True, "qemu-system"),
    "firecracker": Profile(
        "firecracker",
        "api_socket",
        "firecracker.sock",
        "guest reset or shut down (firecracker exited)",
        False,
        "firecracker",
    ),
}


@pytest.fixture(params=sorted(PROFILES))
def profile(request: pytest.FixtureRequest) -> Profile:
    return PROFILES[str(request.param)]


@pytest.fixture(scope="session")
def standin_binary(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, tuple[str, ...]]:
    """The stand-in's launcher, named `firecracker`, and the host paths it needs in a jail."""
    python = Path(sys.executable).absolute()
    launcher = write_launcher(tmp_path_factory.mktemp("fc") / "firecracker", python)
    paths = [*standin_host_paths(python), "/proc/cpuinfo"]
    return launcher, tuple(paths)


def qemu_only(profile: Profile) -> None:
    if profile.kind != "qemu":
        pytest.skip("about QEMU itself")


@pytest.fixture
def mode() -> str:
    """How QEMU runs; BOTH parametrizes it."""
    return "direct"


@pytest.fixture(scope="module")
def jail_ids() -> tuple[int, int]:
    if os.geteuid() != 0:
        pytest.skip("the jailer needs root")
    return ensure_jail_user()


@pytest.fixture(scope="module")
def cgroup_parent() -> Iterator[str]:
    """The VM cgroups' parent of this test module; it must be empty at the end."""
    yield CGROUP_PARENT
    mount = cgroup_mount(JailSettings(uid=1, gid=1).cgroup(memory_bytes=1, vcpu_count=1))
    if mount is not None:
        parent = Path(mount) / CGROUP_PARENT
        if parent.exists():
            leftovers = [p.name for p in parent.iterdir() if p.is_dir()]
            parent.rmdir()
            assert leftovers == [], f"VM cgroups left behind: {leftovers}"


@pytest.fixture
def jail(mode: str, request: pytest.FixtureRequest) -> Iterator[JailSettings | None]:
    if mode == "direct":
        yield None
        return
    uid, gid = request.getfixturevalue("jail_ids")
    parent = request.getfixturevalue("cgroup_parent")
    # tempfile's directory (the session's, see conftest): short enough for socket paths.
    base = Path(tempfile.mkdtemp(prefix="j"))
    settings = JailSettings(uid=uid, gid=gid, chroot_base=base, cgroup_parent=parent)
    yield settings
    # Whatever a test left: any process rooted in a jail here is killed (by identity).
    stray = []
    for jail_dir in [
        *settings.backend_dir("qemu").glob("*"),
        *settings.backend_dir("firecracker").glob("*"),
    ]:
        for ident in processes_rooted_at(jail_dir / "root"):
            stray.append(ident.pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(ident.pid, signal.SIGKILL)
    assert mounts_under(settings.chroot_base) == []
    shutil.rmtree(settings.chroot_base, ignore_errors=True)
    assert stray == [], f"jailed VMMs left running: {stray}"


_RUNTIMES: dict[str, Callable[[Path, JailSettings | None], VmmRuntime]] = {}


def make_runtime(vm_root: Path, jail: JailSettings | None) -> VmmRuntime:
    """Another runtime with the current test's driver (a restarted metald)."""
    return _RUNTIMES["current"](vm_root, jail)


@pytest.fixture
def runtime_factory(
    profile: Profile, request: pytest.FixtureRequest
) -> Iterator[Callable[[Path, JailSettings | None], VmmRuntime]]:
    if profile.kind == "qemu":

        def make(vm_root: Path, jail: JailSettings | None) -> VmmRuntime:
            return VmmRuntime(QemuDriver(accelerator=ACCEL), vm_root, jail=jail)

    else:
        launcher, paths = request.getfixturevalue("standin_binary")

        def make(vm_root: Path, jail: JailSettings | None) -> VmmRuntime:
            driver = FirecrackerDriver(
                str(launcher), skip_kvm_check=True, extra_jail_paths=paths, metrics_interval=0.5
            )
            return VmmRuntime(driver, vm_root, jail=jail)

    _RUNTIMES["current"] = make
    yield make
    _RUNTIMES.pop("current", None)


@pytest.fixture
async def backend(
    vm_root: Path,
    boot_files: tuple[Path, Path | None],
    jail: JailSettings | None,
    runtime_factory: Callable[[Path, JailSettings | None], VmmRuntime],
) -> AsyncIterator[VmmRuntime]:
    b = runtime_factory(vm_root, jail)
    await b.start()
    yield b
    for name in dirs_under(vm_root):
        await b.destroy(name)
    if jail is not None:
        await b.remove_orphans(set())
    await b.close()


def spec_for(
    boot_files: tuple[Path, Path | None],
    vm_id: str,
    disks: tuple[ResolvedDisk, ...] = (),
    kernel: Path | None = None,
    nic: NicSpec | None = None,
) -> LaunchSpec:
    k, i = boot_files
    return LaunchSpec(
        vm_id=vm_id,
        vcpu_count=1,
        memory_bytes=256 * 1024 * 1024,
        kernel=kernel or k,
        initrd=i,
        kernel_args="",
        disks=disks,
        nic=nic,
    )


def status_fields(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def assert_no_jail_left(b: VmmRuntime, vm_id: str) -> None:
    """Nothing of the VM's jail: no directory, no cgroup, no process rooted in it."""
    assert b.jail is not None
    jail_dir = b.jail.backend_dir(b.name) / vm_id
    assert not jail_dir.exists(), f"jail directory left: {jail_dir}"
    cgroup = cgroup_dir(b.jail.cgroup(memory_bytes=1, vcpu_count=1), vm_id)
    assert cgroup is None or not cgroup.exists(), f"cgroup left: {cgroup}"
    assert processes_rooted_at(jail_dir / "root") == []


def dirs_under(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def fd_targets(pid: int) -> dict[int, str]:
    fds = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            fds[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
    return fds


def start_sleeper() -> subprocess.Popen[bytes]:
    """An unrelated live process (not a QEMU of ours)."""
    return subprocess.Popen(["sleep", "300"])


async def runstate(b: VmmRuntime, vm_id: str) -> VmState | None:
    """The VMM's own run state (None without a running VMM), asked through its control."""
    vm = b._vms.get(vm_id)
    if vm is None or not vm.alive or vm.control is None:
        return None
    return await vm.control.runstate()


def identity(b: VmmRuntime, vm_id: str) -> ProcessIdentity | None:
    """The VMM process the runtime watches for the VM (None without one)."""
    vm = b._vms.get(vm_id)
    return vm.identity if vm is not None and vm.alive else None


def console(b: VmmRuntime, vm_id: str) -> str:
    try:
        return Path(b.info(vm_id)["console_log"]).read_text(errors="replace")
    except FileNotFoundError:
        return ""


async def wait_for(b: VmmRuntime, vm_id: str, pattern: re.Pattern[str], count: int = 1) -> float:
    start = time.monotonic()
    while time.monotonic() - start < BOOT_TIMEOUT:
        if len(pattern.findall(console(b, vm_id))) >= count:
            return time.monotonic() - start
        await asyncio.sleep(0.1)
    tail = console(b, vm_id)[-2000:]
    raise AssertionError(f"{pattern.pattern!r} x{count} not seen in {BOOT_TIMEOUT} s:\n{tail}")


def heartbeats(b: VmmRuntime, vm_id: str) -> int:
    return len(HEARTBEAT.findall(console(b, vm_id)))


@BOTH
async def test_lifecycle(
    mode: str,
    profile: Profile,
    backend: VmmRuntime,
    boot_files: tuple[Path, Path | None],
    tmp_path: Path,
) -> None:
    data = tmp_path / "data.img"
    with data.open("wb") as f:
        f.write(b"metald" * 1000)
        f.truncate(64 * 1024 * 1024)
    vm = "vm-life"
    t0 = time.monotonic()
    ident = await backend.create(
        spec_for(boot_files, vm, disks=(ResolvedDisk("data", data, False, False),))
    )
    created_in = time.monotonic() - t0
    vm_dir = backend.vm_dir(vm)
    assert is_alive(ident)
    assert await runstate(backend, vm) is VmState.CREATED
    # A sparse per-VM copy of the writable disk; the original is left alone.
    copy = vm_dir / "disk0.img"
    assert copy.stat().st_size == data.stat().st_size
    assert copy.stat().st_blocks * 512 < 4 * 1024 * 1024
    info = backend.info(vm)
    assert info["pid"] == str(ident.pid)
    assert info["accelerator"] == backend.accelerator()
    await asyncio.sleep(1.0)
    assert not READY.search(console(backend, vm)), "the guest ran before boot"

    assert await backend.boot(vm) == ident
    ready_in = await wait_for(backend, vm, READY)
    print(f"\n{mode}: create {created_in:.2f} s, boot -> READY {ready_in:.1f} s")
    assert await runstate(backend, vm) is VmState.RUNNING
    await wait_for(backend, vm, HEARTBEAT, 2)
    usage = await backend.usage(vm)
    assert usage.cpu_time_ns > 0
    assert usage.memory_bytes > 10 * 1024 * 1024
    assert usage.disk_read_bytes > 0  # the guest kernel read the partition table
    assert usage.disk_read_ops > 0

    await backend.pause(vm)
    assert await runstate(backend, vm) is VmState.PAUSED
    await asyncio.sleep(0.5)
    before = heartbeats(backend, vm)
    await asyncio.sleep(2.5)
    assert heartbeats(backend, vm) == before, "heartbeats while paused"
    await backend.resume(vm)
    await wait_for(backend, vm, HEARTBEAT, before + 1)

    before_reboot = console(backend, vm)
    rebooted = await backend.reboot(vm)
    if profile.reboot_in_place:
        assert rebooted == ident
        await wait_for(backend, vm, READY, 2)
        boots = READY.findall(console(backend, vm))
    else:
        # A new process (Firecracker exits on a guest reset) with the same disks; jailed, in
        # a new jail with a new console log.
        assert rebooted != ident and is_alive(rebooted) and not is_alive(ident)
        assert identity(backend, vm) == rebooted
        fresh_console = mode == "jailed"
        await wait_for(backend, vm, READY, 1 if fresh_console else 2)
        boots = READY.findall((before_reboot if fresh_console else "") + console(backend, vm))
        ident = rebooted
    assert boots[0][1] != boots[1][1], "a reboot gives a new boot id"

    assert await backend.shutdown(vm, timeout=60, force=False) == "graceful"
    assert SHUTDOWN.search(console(backend, vm))
    assert not is_alive(ident)
    assert identity(backend, vm) is None
    assert backend.info(vm)["exit_reason"] == profile.poweroff_reason
    assert "pid" not in backend.info(vm)
    assert await runstate(backend, vm) is None
    assert (await backend.usage(vm)).cpu_time_ns == 0

    # Boot again from SHUTDOWN: a new QEMU from the saved spec, same disk copy. (A jailed
    # QEMU gets a new jail, and with it a new console log.)
    t0 = time.monotonic()
    ident2 = await backend.boot(vm)
    relaunched_in = time.monotonic() - t0
    assert ident2 != ident and is_alive(ident2)
    await wait_for(backend, vm, READY, 3 if mode == "direct" else 1)
    assert backend.info(vm)["pid"] == str(ident2.pid)
    print(f"{mode}: boot again (new QEMU) {relaunched_in:.2f} s")

    await backend.destroy(vm)
    assert not is_alive(ident2)
    assert not vm_dir.exists()
    if mode == "jailed":
        assert_no_jail_left(backend, vm)
    await backend.destroy(vm)  # idempotent
    assert data.read_bytes()[:6] == b"metald"


async def test_paused_and_forced_shutdowns(
    backend: VmmRuntime, boot_files: tuple[Path, Path | None]
) -> None:
    exits: list[tuple[str, str]] = []

    async def on_exit(vm_id: str, reason: str) -> None:
        exits.append((vm_id, reason))

    backend.set_exit_callback(on_exit)
    # Still in prelaunch: no guest to ask, so it is killed at once.
    await backend.create(spec_for(boot_files, "vm-pre"))
    assert await backend.shutdown("vm-pre", timeout=30, force=False) == "forced"

    await backend.create(spec_for(boot_files, "vm-pau"))
    await backend.boot("vm-pau")
    await wait_for(backend, "vm-pau", READY)
    await backend.pause("vm-pau")
    # Paused: resumed first, then the guest runs its shutdown path.
    assert await backend.shutdown("vm-pau", timeout=60, force=False) == "graceful"
    assert SHUTDOWN.search(console(backend, "vm-pau"))

    ident = await backend.boot("vm-pau")
    assert await backend.shutdown("vm-pau", timeout=60, force=True) == "forced"
    assert not is_alive(ident)
    assert backend.info("vm-pau")["exit_reason"].startswith("vmm exited")
    await asyncio.sleep(0.3)
    assert exits == [], "requested exits must not be reported"


async def test_graceful_shutdown_of_a_guest_still_booting(
    profile: Profile, backend: VmmRuntime, boot_files: tuple[Path, Path | None]
) -> None:
    """Right after a boot or reboot the guest cannot take Ctrl-Alt-Del yet: first it has no
    keyboard driver (the keys are lost), then its kernel has one but its init has not taken
    the keys over yet (Linux restarts the machine on them: kernel.ctrl-alt-del=1), then its
    init traps them. The shutdown must still end gracefully, well within its timeout, instead
    of waiting the whole timeout and killing the guest. Under TCG on a loaded machine the
    middle phase lasts longer than the interval at which the keys are sent again (seen: 6 s
    of guest time), so a guest that restarts on them has to count as stopped, or every
    repeat restarts its boot and the shutdown ends forced after the whole timeout."""
    await backend.create(spec_for(boot_files, "vm-early"))
    await backend.boot("vm-early")
    await wait_for(backend, "vm-early", READY)
    await backend.reboot("vm-early")
    started = time.monotonic()
    how = await backend.shutdown("vm-early", timeout=60, force=False)
    text = console(backend, "vm-early")
    assert how == "graceful", f"{how} after {time.monotonic() - started:.0f} s:\n{text[-3000:]}"
    assert time.monotonic() - started < 45
    # The second boot may be stopped by its init (before or after its READY line) or, still
    # in the kernel, by the kernel's own restart: both are the guest's answer to the keys.
    assert SHUTDOWN.search(text) or "reboot: Restarting system" in text, text[-3000:]
    assert backend.info("vm-early")["exit_reason"] in (profile.poweroff_reason, "guest reset")


@BOTH
async def test_unexpected_exit_calls_back_within_2s(
    mode: str, backend: VmmRuntime, boot_files: tuple[Path, Path | None]
) -> None:
    got = asyncio.get_running_loop().create_future()

    async def on_exit(vm_id: str, reason: str) -> None:
        if not got.done():
            got.set_result((vm_id, reason, time.monotonic()))

    backend.set_exit_callback(on_exit)
    ident = await backend.create(spec_for(boot_files, "vm-kill"))
    await backend.boot("vm-kill")
    killed_at = time.monotonic()
    os.kill(ident.pid, signal.SIGKILL)
    vm_id, reason, at = await asyncio.wait_for(got, 5)
    assert vm_id == "vm-kill"
    assert reason == "vmm exited unexpectedly (signal 9)"
    assert at - killed_at < 2.0
    assert backend.info("vm-kill")["exit_reason"] == reason
    assert not (backend.vm_dir("vm-kill") / "process.json").exists()
    # The exited child was reaped: no zombie left.
    assert identity_of(ident.pid) is None or identity_of(ident.pid) != ident


async def test_guest_poweroff_is_reported(
    profile: Profile, backend: VmmRuntime, boot_files: tuple[Path, Path | None]
) -> None:
    got = asyncio.get_running_loop().create_future()

    async def on_exit(vm_id: str, reason: str) -> None:
        got.set_result(reason)

    backend.set_exit_callback(on_exit)
    ident = await backend.create(spec_for(boot_files, "vm-off"))
    await backend.boot("vm-off")
    await wait_for(backend, "vm-off", READY)
    # The guest powering itself off (SIGTERM to its init runs the same path as Ctrl-Alt-Del,
    # but here metald did not ask): Ctrl-Alt-Del straight over QMP, behind the backend's back.
    vm = backend._vms["vm-off"]
    assert vm.control is not None
    await vm.control.ask_guest_to_stop()
    assert await asyncio.wait_for(got, 60) == profile.poweroff_reason
    assert not is_alive(ident)


@BOTH
async def test_adopt_after_restart(
    mode: str,
    vm_root: Path,
    backend: VmmRuntime,
    boot_files: tuple[Path, Path | None],
    jail: JailSettings | None,
) -> None:
    ident = await backend.create(spec_for(boot_files, "vm-adopt"))
    await backend.boot("vm-adopt")
    await wait_for(backend, "vm-adopt", READY)
    info = backend.info("vm-adopt")
    await backend.close()
    assert is_alive(ident), "close() must leave the VMM running"

    fresh = make_runtime(vm_root, jail)
    await fresh.start()
    try:
        assert await fresh.adopt("vm-adopt", ident) == VmState.RUNNING
        assert identity(fresh, "vm-adopt") == ident
        assert fresh.info("vm-adopt") == info  # the same sockets and console, found again
        await fresh.pause("vm-adopt")
        assert await runstate(fresh, "vm-adopt") is VmState.PAUSED
        usage = await fresh.usage("vm-adopt")
        assert usage.cpu_time_ns > 0 and usage.uptime_seconds >= 0
        await fresh.resume("vm-adopt")
        got = asyncio.get_running_loop().create_future()

        async def on_exit(vm_id: str, reason: str) -> None:
            got.set_result(reason)

        fresh.set_exit_callback(on_exit)
        os.kill(ident.pid, signal.SIGKILL)
        assert "exited unexpectedly" in await asyncio.wait_for(got, 5)
        # Gone now: adopting again says so and leaves spec and disks for a later boot.
        assert await fresh.adopt("vm-adopt", ident) is None
        assert (fresh.vm_dir("vm-adopt") / "spec.json").exists()
        ident2 = await fresh.boot("vm-adopt")
        assert is_alive(ident2)
        await fresh.destroy("vm-adopt")
        assert not is_alive(ident2)
        if mode == "jailed":
            assert_no_jail_left(fresh, "vm-adopt")
    finally:
        await fresh.close()


@BOTH
async def test_adopt_with_a_stale_identity_kills_the_unrecorded_vmm(
    mode: str,
    vm_root: Path,
    backend: VmmRuntime,
    boot_files: tuple[Path, Path | None],
    jail: JailSettings | None,
) -> None:
    ident = await backend.create(spec_for(boot_files, "vm-stale"))
    await backend.close()
    fresh = make_runtime(vm_root, jail)
    try:
        stale = ProcessIdentity(ident.pid, ident.start_time - 1)
        assert await fresh.adopt("vm-stale", stale) is None
        # process.json named a live QEMU of this VM that the caller did not know: it went.
        await asyncio.sleep(0.2)
        assert not is_alive(ident)
    finally:
        await fresh.close()


@BOTH
async def test_remove_orphans(
    mode: str,
    vm_root: Path,
    backend: VmmRuntime,
    boot_files: tuple[Path, Path | None],
    jail: JailSettings | None,
) -> None:
    keep = await backend.create(spec_for(boot_files, "vm-keep"))
    orphan = await backend.create(spec_for(boot_files, "vm-orphan"))
    # Jailed: a QEMU whose VM directory is gone too (metald lost everything but the jail),
    # and an empty cgroup of a VM nobody knows.
    lost = await backend.create(spec_for(boot_files, "vm-lost")) if jail is not None else None
    await backend.close()
    if jail is not None:
        shutil.rmtree(vm_root / "vm-lost")
        stale_cgroup = cgroup_dir(jail.cgroup(memory_bytes=1, vcpu_count=1), "vm-gone")
        assert stale_cgroup is not None
        stale_cgroup.mkdir(parents=True)
    # A directory whose process.json names a live process that is not a QEMU of ours.
    stranger_dir = vm_root / "vm-stranger"
    stranger_dir.mkdir()
    sleeper = start_sleeper()
    try:
        s_ident = identity_of(sleeper.pid)
        assert s_ident is not None
        (stranger_dir / "process.json").write_text(
            f'{{"pid": {s_ident.pid}, "start_time": {s_ident.start_time}}}'
        )
        (vm_root / "not a vm id").mkdir()
        fresh = make_runtime(vm_root, jail)
        try:
            removed = await fresh.remove_orphans({"vm-keep"})
            if jail is None:
                assert removed == ["vm-orphan"]
            else:
                assert removed == ["vm-orphan", "vm-gone", "vm-lost"]
                assert lost is not None and not is_alive(lost)
                for name in ("vm-orphan", "vm-gone", "vm-lost"):
                    assert_no_jail_left(fresh, name)
                assert (jail.backend_dir(fresh.name) / "vm-keep" / "root").exists()
            assert not is_alive(orphan)
            assert not (vm_root / "vm-orphan").exists()
            assert is_alive(keep)
            assert (vm_root / "vm-keep").exists()
            assert sleeper.poll() is None, "a process that is not provably ours was killed"
            assert stranger_dir.exists()
            assert await fresh.adopt("vm-keep", keep) == VmState.CREATED
            await fresh.destroy("vm-keep")
            assert not is_alive(keep)
            if jail is not None:
                assert_no_jail_left(fresh, "vm-keep")
        finally:
            await fresh.close()
    finally:
        sleeper.kill()
        sleeper.wait()
        shutil.rmtree(stranger_dir, ignore_errors=True)


@BOTH
async def test_bad_kernel_leaves_nothing(
    profile: Profile,
    mode: str,
    vm_root: Path,
    backend: VmmRuntime,
    boot_files: tuple[Path, Path | None],
    tmp_path: Path,
) -> None:
    qemu_only(profile)
    bad = tmp_path / "not-a-kernel"
    bad.write_bytes(b"this is not a kernel\n" * 5000)
    with pytest.raises(BackendError) as err:
        await backend.create(spec_for(boot_files, "vm-bad", kernel=bad))
    # QEMU's own words (which depend on the bytes), e.g. "linux kernel too old to load a ram
    # disk" or "invalid kernel header".
    assert err.value.message.startswith("qemu failed to start VM vm-bad: qemu: ")
    assert "kernel" in err.value.message
    assert str(tmp_path) not in err.value.message
    assert str(vm_root) not in err.value.message
    assert not (vm_root / "vm-bad").exists()
    assert identity(backend, "vm-bad") is None
    if mode == "jailed":
        assert_no_jail_left(backend, "vm-bad")

    with pytest.raises(BackendError) as err:
        await backend.create(spec_for(boot_files, "vm-bad", kernel=tmp_path / "missing"))
    if mode == "direct":
        assert "could not open kernel file 'missing'" in err.value.message
    else:  # the jailer cannot place it
        assert err.value.message == (
            "could not jail the VMM of VM vm-bad: jailer step mount failed: "
            "file to place missing: No such file or directory"
        )
        assert_no_jail_left(backend, "vm-bad")
    assert str(tmp_path) not in err.value.message
    assert not (vm_root / "vm-bad").exists()


@BOTH
async def test_a_missing_disk_leaves_nothing(
    mode: str,
    vm_root: Path,
    backend: VmmRuntime,
    boot_files: tuple[Path, Path | None],
    tmp_path: Path,
) -> None:
    good = tmp_path / "good.img"
    good.write_bytes(b"\0" * 4096)
    disks = (
        ResolvedDisk("good", good, read_only=False, is_root_device=False),
        ResolvedDisk("gone", tmp_path / "gone.img", read_only=False, is_root_device=False),
    )
    with pytest.raises(BackendError) as err:
        await backend.create(spec_for(boot_files, "vm-nodisk", disks=disks))
    assert "could not copy disk gone.img" in err.value.message
    assert str(tmp_path) not in err.value.message
    assert dirs_under(vm_root) == []


@BOTH
async def test_read_only_disk_is_shared(
    profile: Profile,
    mode: str,
    backend: VmmRuntime,
    boot_files: tuple[Path, Path | None],
    tmp_path: Path,
) -> None:
    qemu_only(profile)
    image = tmp_path / "ro.img"
    image.write_bytes(b"\0" * 1024 * 1024)
    image.chmod(0o444)
    ident = await backend.create(
        spec_for(boot_files, "vm-ro", disks=(ResolvedDisk("ro", image, True, True),))
    )
    drive = next(a for a in read_cmdline(ident.pid) if a.startswith("id=disk0,"))
    assert "readonly=on" in drive
    if mode == "direct":
        assert f"file={image}" in drive
    else:  # the original itself, placed in the jail
        assert "file=/disk0.img," in drive
        inside = os.stat(f"/proc/{ident.pid}/root/disk0.img")
        assert (inside.st_dev, inside.st_ino) == (image.stat().st_dev, image.stat().st_ino)
        assert image.stat().st_uid == 0  # still root's: never handed to the jail user
    assert not (backend.vm_dir("vm-ro") / "disk0.img").exists()
    await backend.destroy("vm-ro")
    assert image.exists()


@BOTH
async def test_the_vmm_inherits_none_of_our_descriptors(
    profile: Profile, mode: str, backend: VmmRuntime, boot_files: tuple[Path, Path | None]
) -> None:
    qemu_only(profile)
    # Like hypercorn's listening socket: inheritable. A VMM holding it would keep the port
    # busy after metald dies.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.set_inheritable(True)
    try:
        ident = await backend.create(spec_for(boot_files, "vm-fds"))
        ours = f"socket:[{os.fstat(listener.fileno()).st_ino}]"
        theirs = fd_targets(ident.pid)
        assert ours not in theirs.values()
        assert theirs[0] == theirs[1] == "/dev/null"
        assert theirs[2].endswith("/vm-fds/vmm.stderr")
        await backend.destroy("vm-fds")
    finally:
        listener.close()


# -- jailed only --

JAILED = pytest.mark.parametrize("mode", ["jailed"])


def check_confinement(
    backend: VmmRuntime, vm_id: str, pid: int, ids: tuple[int, int], data: Path
) -> None:
    uid, gid = ids
    # Its root is the VM's jail; the host paths metald reports are inside it.
    jail = backend.jail_spec(vm_id)
    assert jail is not None
    root, jail_root = os.stat(f"/proc/{pid}/root"), os.stat(jail.jail_root)
    assert (root.st_dev, root.st_ino) == (jail_root.st_dev, jail_root.st_ino)
    info = backend.info(vm_id)
    assert info["qmp_socket"] == str(jail.jail_root / "run/qmp.sock")
    assert info["console_log"] == str(jail.jail_root / "run/console.log")
    assert Path(info["qmp_socket"]).owner() == "metald-vm"

    # Only what it needs: kernel, initrd, its disk, QEMU with libraries and firmware
    # (read-only), device nodes, and /run.
    inside = Path(f"/proc/{pid}/root")
    host_tops = {p.split("/")[1] for p in qemu_host_paths(backend.host.binary)}
    expected = {"vmlinux", "initrd", "disk0.img", "dev", "run"} | host_tops
    assert {p.name for p in inside.iterdir()} == expected
    devices = {"null", "urandom"} | ({"kvm"} if backend.accelerator() == "kvm" else set())
    assert {p.name for p in (inside / "dev").iterdir()} == devices
    assert {p.name for p in (inside / "run").iterdir()} == {"qmp.sock", "console.log"}
    assert [p.name for p in (inside / "usr/bin").iterdir()] == ["qemu-system-x86_64"]
    # The writable disk is the VM directory's copy, handed to the jail user.
    copy = backend.vm_dir(vm_id) / "disk0.img"
    placed = os.stat(inside / "disk0.img")
    assert (placed.st_dev, placed.st_ino) == (copy.stat().st_dev, copy.stat().st_ino)
    assert (placed.st_uid, placed.st_gid) == (uid, gid)
    assert data.stat().st_uid == 0  # the caller's original is untouched
    # No /proc or /sys, every mount nosuid.
    mounts = [line.split() for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines()]
    assert all("nosuid" in fields[5].split(",") for fields in mounts)
    assert not {"/proc", "/sys"} & {fields[4] for fields in mounts}
    # In the VM's cgroup (limits only where this host's cgroup v2 has the controllers).
    assert backend.jail is not None
    cgroup = cgroup_dir(backend.jail.cgroup(memory_bytes=1, vcpu_count=1), vm_id)
    assert cgroup is not None and (cgroup / "cgroup.procs").read_text().split() == [str(pid)]


@JAILED
async def test_a_jailed_vmm_is_unprivileged_and_sees_only_its_jail(
    profile: Profile,
    mode: str,
    backend: VmmRuntime,
    boot_files: tuple[Path, Path | None],
    jail_ids: tuple[int, int],
    tmp_path: Path,
) -> None:
    qemu_only(profile)
    uid, gid = jail_ids
    data = tmp_path / "data.img"
    data.write_bytes(b"\0" * 1024 * 1024)
    ident = await backend.create(
        spec_for(boot_files, "vm-conf", disks=(ResolvedDisk("data", data, False, False),))
    )
    pid = ident.pid
    status = status_fields(pid)
    assert status["Name"].startswith("qemu-system")
    assert status["Uid"].split() == [str(uid)] * 4
    assert status["Gid"].split() == [str(gid)] * 4
    assert status["Groups"] == ""
    for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[caps], 16) == 0, caps
    assert status["NoNewPrivs"] == "1"

    check_confinement(backend, "vm-conf", pid, jail_ids, data)

    await backend.destroy("vm-conf")
    assert not is_alive(ident)
    assert_no_jail_left(backend, "vm-conf")
    assert data.exists()


def plant_symlink(qmp: Path, target: Path) -> None:
    qmp.rename(qmp.with_name("qmp.real"))
    qmp.symlink_to(target)


@JAILED
async def test_a_planted_qmp_socket_is_not_followed(
    profile: Profile,
    mode: str,
    vm_root: Path,
    backend: VmmRuntime,
    boot_files: tuple[Path, Path | None],
    jail: JailSettings | None,
    tmp_path: Path,
) -> None:
    """A compromised VMM owns its /run: a symlink it puts there in place of its QMP socket
    (to some root-owned socket) must not be connected to; the VMM is not adopted."""
    ident = await backend.create(spec_for(boot_files, "vm-plant"))
    await backend.close()
    decoy_path = tmp_path / "decoy.sock"
    decoy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    decoy.bind(str(decoy_path))
    decoy.listen()
    decoy.setblocking(False)
    try:
        plant_symlink(Path(backend.info("vm-plant")[profile.socket_key]), decoy_path)
        fresh = make_runtime(vm_root, jail)
        try:
            assert await fresh.adopt("vm-plant", ident) is None
            assert not is_alive(ident)
            with pytest.raises(BlockingIOError):
                decoy.accept()  # nobody connected to it
            # Gone for good: booting again gets a new jail and a genuine socket.
            ident2 = await fresh.boot("vm-plant")
            assert is_alive(ident2) and await runstate(fresh, "vm-plant") is VmState.RUNNING
            await fresh.destroy("vm-plant")
            assert_no_jail_left(fresh, "vm-plant")
        finally:
            await fresh.close()
    finally:
        decoy.close()


@pytest.fixture
def netns_name() -> Iterator[str]:
    """A network namespace of this test only (no devices but lo); removed afterwards."""
    from pyroute2 import netns

    name = f"mqb{os.getpid()}-{time.monotonic_ns() % 100000}"
    netns.create(name)
    try:
        yield name
    finally:
        netns.remove(name)
        assert name not in netns.listnetns()


async def in_thread(func: Callable[..., _T], *args: object) -> _T:
    """pyroute2's synchronous API refuses to run inside an event loop: a thread it is."""
    return await asyncio.to_thread(func, *args)


def links_in(netns_name: str) -> dict[str, dict[str, str]]:
    from pyroute2 import NetNS

    with NetNS(netns_name) as ns:
        return {
            str(link.get_attr("IFLA_IFNAME")): {
                "state": str(link.get_attr("IFLA_OPERSTATE")),
                "mac": str(link.get_attr("IFLA_ADDRESS")),
            }
            for link in ns.get_links()
        }


def add_address(netns_name: str, ifname: str, address: str, prefix: int) -> None:
    from pyroute2 import NetNS

    with NetNS(netns_name) as ns:
        index = ns.link_lookup(ifname=ifname)[0]
        ns.addr("add", index=index, address=address, prefixlen=prefix)


async def assert_answers_ping(netns_name: str, address: str) -> None:
    """The guest answers through its TAP (pinged from inside the test's namespace)."""
    for _ in range(10):
        if await in_thread(ping_from, netns_name, address):
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"{address} does not answer on its NIC")


def ping_from(netns_name: str, address: str) -> bool:
    result = subprocess.run(
        ["ip", "netns", "exec", netns_name, "ping", "-c", "1", "-W", "2", address],
        capture_output=True,
        check=False,
    )
    return result.returncode == 0


@JAILED
async def test_a_nic_in_the_vms_network_namespace(
    mode: str, backend: VmmRuntime, boot_files: tuple[Path, Path | None], netns_name: str
) -> None:
    tap = "tap-mqb0"
    nic = NicSpec(
        netns=netns_name,
        tap=tap,
        mac="02:00:0a:7b:00:02",
        guest_args="metald.ip4=10.123.0.2/24 metald.gw4=10.123.0.1",
    )
    vm = "vm-net"
    # Every QEMU gets a new TAP; the callback connects it (here: the guest's gateway
    # address on it, inside the test's namespace) before the guest runs.
    connected: list[str] = []

    async def connect_tap(vm_id: str) -> None:
        assert await runstate(backend, vm_id) is VmState.CREATED
        await in_thread(add_address, netns_name, tap, "10.123.0.1", 24)
        connected.append(vm_id)

    backend.set_tap_callback(connect_tap)
    ident = await backend.create(spec_for(boot_files, vm, nic=nic))
    assert connected == [vm]
    # The jailer made the TAP in the VM's namespace, and QEMU runs in that namespace.
    assert set(await in_thread(links_in, netns_name)) == {"lo", tap}
    assert os.stat(f"/proc/{ident.pid}/ns/net").st_ino == os.stat(f"/run/netns/{netns_name}").st_ino
    await backend.boot(vm)
    await wait_for(backend, vm, READY)
    (net,) = NET.findall(console(backend, vm))
    assert net == ("eth0", "10.123.0.2/24", "-")
    await assert_answers_ping(netns_name, "10.123.0.2")

    # Shut down: the persistent TAP goes with the QEMU...
    assert await backend.shutdown(vm, timeout=30, force=True) == "forced"
    assert set(await in_thread(links_in, netns_name)) == {"lo"}
    # ... so booting again is not blocked by it: a new QEMU, a new TAP, connected again.
    ident2 = await backend.boot(vm)
    assert connected == [vm, vm]
    assert set(await in_thread(links_in, netns_name)) == {"lo", tap}
    await wait_for(backend, vm, NET)
    await wait_for(backend, vm, READY)
    await assert_answers_ping(netns_name, "10.123.0.2")

    # An unexpected exit releases it too.
    got = asyncio.get_running_loop().create_future()

    async def on_exit(vm_id: str, reason: str) -> None:
        got.set_result(reason)

    backend.set_exit_callback(on_exit)
    os.kill(ident2.pid, signal.SIGKILL)
    await asyncio.wait_for(got, 5)
    assert set(await in_thread(links_in, netns_name)) == {"lo"}

    ident3 = await backend.boot(vm)
    assert tap in await in_thread(links_in, netns_name)
    await backend.destroy(vm)
    assert not is_alive(ident3)
    assert set(await in_thread(links_in, netns_name)) == {"lo"}
    assert_no_jail_left(backend, vm)


@JAILED
async def test_a_tap_that_cannot_be_connected_fails_the_create(
    mode: str,
    vm_root: Path,
    backend: VmmRuntime,
    boot_files: tuple[Path, Path | None],
    netns_name: str,
) -> None:
    async def refuse(vm_id: str) -> None:
        raise BackendError("no bridge for it")

    backend.set_tap_callback(refuse)
    nic = NicSpec(netns=netns_name, tap="tap-mqb1", mac="02:00:0a:7b:00:03", guest_args="")
    with pytest.raises(BackendError, match="its TAP could not be connected: no bridge for it"):
        await backend.create(spec_for(boot_files, "vm-notap", nic=nic))
    assert dirs_under(vm_root) == []
    assert set(await in_thread(links_in, netns_name)) == {"lo"}
    assert_no_jail_left(backend, "vm-notap")


async def test_a_nic_needs_the_jailer(
    vm_root: Path, backend: VmmRuntime, boot_files: tuple[Path, Path | None]
) -> None:
    nic = NicSpec(netns="nowhere", tap="tap-x", mac="02:00:00:00:00:01", guest_args="")
    with pytest.raises(BackendError, match="needs the jailer"):
        await backend.create(spec_for(boot_files, "vm-nonic", nic=nic))
    assert dirs_under(vm_root) == []


async def test_long_vm_root_is_refused(profile: Profile, tmp_path: Path) -> None:
    qemu_only(profile)
    root = tmp_path / ("x" * 100)
    with pytest.raises(BackendError, match=r"Unix socket|AF_UNIX"):
        await VmmRuntime(QemuDriver(accelerator="tcg"), root).start()


async def test_a_vm_id_too_long_for_the_socket_path_is_an_invalid_argument(
    profile: Profile, boot_files: tuple[Path, Path | None], tmp_path: Path
) -> None:
    qemu_only(profile)
    # A root of exactly 60 bytes, wherever pytest's temp dir is (its path length varies).
    short = Path(tempfile.mkdtemp(prefix="m", dir="/tmp"))
    root = short / ("r" * (59 - len(str(short))))
    assert len(str(root)) == 60
    b = VmmRuntime(QemuDriver(accelerator="tcg"), root)
    try:
        await b.start()
        with pytest.raises(InvalidArgument, match="vm_id: at most 33 characters"):
            await b.create(spec_for(boot_files, "v" * 34))
        assert dirs_under(root) == []
    finally:
        await b.close()
        shutil.rmtree(short)


async def test_missing_binary_names_the_package(profile: Profile, tmp_path: Path) -> None:
    qemu_only(profile)
    with pytest.raises(BackendError, match="qemu-system-x86"):
        await VmmRuntime(QemuDriver("no-such-qemu-binary"), tmp_path).start()


async def test_kill_identity_never_kills_a_reused_pid() -> None:
    sleeper = start_sleeper()
    try:
        ident = identity_of(sleeper.pid)
        assert ident is not None
        assert not await kill_identity(ProcessIdentity(ident.pid, ident.start_time + 1))
        assert sleeper.poll() is None
        assert await kill_identity(ident)
    finally:
        sleeper.kill()
        sleeper.wait()

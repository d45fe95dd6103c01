"""The QEMU backend against real guests (the default guest image, under TCG on these machines).

Uses the asset store at $METALD_TEST_ASSETS (default: <repo>/var/assets, which `make guest`
builds); skipped when it has no default guest. Every VM lives under a per-test temp dir; the
teardown destroys each one through the backend, then kills anything still recorded there by
pid and start time, and removes the directory.
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
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from metald.assets.store import LocalAssetStore
from metald.backends.process import identity_of, is_alive, kill_identity, read_cmdline
from metald.backends.qemu.backend import QemuBackend
from metald.core.errors import BackendError, InvalidArgument
from metald.core.models import LaunchSpec, ProcessIdentity, ResolvedDisk
from metald.core.states import VmState

pytestmark = pytest.mark.guest

STORE_DIR = Path(os.environ.get("METALD_TEST_ASSETS", Path(__file__).parents[2] / "var" / "assets"))
ACCEL = os.environ.get("METALD_TEST_QEMU_ACCEL", "auto")
BOOT_TIMEOUT = 90.0  # TCG on a busy 2-CPU machine; typically ~4 s

READY = re.compile(r"^METALD-GUEST READY vm=(\S+) boot=(\S+)", re.M)
HEARTBEAT = re.compile(r"^METALD-GUEST HEARTBEAT (\d+)\s*$", re.M)
SHUTDOWN = re.compile(r"^METALD-GUEST SHUTDOWN\s*$", re.M)


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
    # Under tmp_path: the session's base temp dir is wiped when pytest first makes a tmp_path,
    # so a tempfile.mkdtemp() made before that would vanish under a running test.
    root = tmp_path / "vms"
    yield root
    # Whatever a test left: kill it by recorded pid + start time (never by name).
    for process_file in root.glob("*/process.json"):
        with contextlib.suppress(Exception):
            data = json.loads(process_file.read_text())
            ident = ProcessIdentity(int(data["pid"]), int(data["start_time"]))
            if is_alive(ident):
                os.kill(ident.pid, signal.SIGKILL)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
async def backend(
    vm_root: Path, boot_files: tuple[Path, Path | None]
) -> AsyncIterator[QemuBackend]:
    b = QemuBackend(vm_root, accelerator=ACCEL)
    await b.start()
    yield b
    for name in dirs_under(vm_root):
        await b.destroy(name)
    await b.close()


def spec_for(
    boot_files: tuple[Path, Path | None],
    vm_id: str,
    disks: tuple[ResolvedDisk, ...] = (),
    kernel: Path | None = None,
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
    )


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


def console(b: QemuBackend, vm_id: str) -> str:
    try:
        return b.console_log(vm_id).read_text(errors="replace")
    except FileNotFoundError:
        return ""


async def wait_for(b: QemuBackend, vm_id: str, pattern: re.Pattern[str], count: int = 1) -> float:
    start = time.monotonic()
    while time.monotonic() - start < BOOT_TIMEOUT:
        if len(pattern.findall(console(b, vm_id))) >= count:
            return time.monotonic() - start
        await asyncio.sleep(0.1)
    tail = console(b, vm_id)[-2000:]
    raise AssertionError(f"{pattern.pattern!r} x{count} not seen in {BOOT_TIMEOUT} s:\n{tail}")


def heartbeats(b: QemuBackend, vm_id: str) -> int:
    return len(HEARTBEAT.findall(console(b, vm_id)))


async def test_lifecycle(
    backend: QemuBackend, boot_files: tuple[Path, Path | None], tmp_path: Path
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
    assert await backend.runstate(vm) == "prelaunch"
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
    print(f"\ncreate {created_in:.2f} s, boot -> READY {ready_in:.1f} s")
    assert await backend.runstate(vm) == "running"
    await wait_for(backend, vm, HEARTBEAT, 2)
    usage = await backend.usage(vm)
    assert usage.cpu_time_ns > 0
    assert usage.memory_bytes > 10 * 1024 * 1024
    assert usage.disk_read_bytes > 0  # the guest kernel read the partition table
    assert usage.disk_read_ops > 0

    await backend.pause(vm)
    assert await backend.runstate(vm) == "paused"
    await asyncio.sleep(0.5)
    before = heartbeats(backend, vm)
    await asyncio.sleep(2.5)
    assert heartbeats(backend, vm) == before, "heartbeats while paused"
    await backend.resume(vm)
    await wait_for(backend, vm, HEARTBEAT, before + 1)

    await backend.reboot(vm)
    await wait_for(backend, vm, READY, 2)
    boots = READY.findall(console(backend, vm))
    assert boots[0][1] != boots[1][1], "a reboot gives a new boot id"

    assert await backend.shutdown(vm, timeout=60, force=False) == "graceful"
    assert SHUTDOWN.search(console(backend, vm))
    assert not is_alive(ident)
    assert backend.identity(vm) is None
    assert backend.info(vm)["exit_reason"] == "guest powered off"
    assert "pid" not in backend.info(vm)
    assert await backend.runstate(vm) is None
    assert (await backend.usage(vm)).cpu_time_ns == 0

    # Boot again from SHUTDOWN: a new QEMU from the saved spec, same disk copy.
    ident2 = await backend.boot(vm)
    assert ident2 != ident and is_alive(ident2)
    await wait_for(backend, vm, READY, 3)
    assert backend.info(vm)["pid"] == str(ident2.pid)

    await backend.destroy(vm)
    assert not is_alive(ident2)
    assert not vm_dir.exists()
    await backend.destroy(vm)  # idempotent
    assert data.read_bytes()[:6] == b"metald"


async def test_paused_and_forced_shutdowns(
    backend: QemuBackend, boot_files: tuple[Path, Path | None]
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
    backend: QemuBackend, boot_files: tuple[Path, Path | None]
) -> None:
    """Right after a boot or reboot the guest cannot take Ctrl-Alt-Del yet (no keyboard driver,
    no trap in its init): the shutdown must still end gracefully, well within its timeout,
    instead of waiting the whole timeout and killing the guest."""
    await backend.create(spec_for(boot_files, "vm-early"))
    await backend.boot("vm-early")
    await wait_for(backend, "vm-early", READY)
    await backend.reboot("vm-early")
    started = time.monotonic()
    assert await backend.shutdown("vm-early", timeout=60, force=False) == "graceful"
    assert time.monotonic() - started < 45
    # The second boot may be stopped before or after its READY line: both are graceful.
    assert SHUTDOWN.search(console(backend, "vm-early"))


async def test_unexpected_exit_calls_back_within_2s(
    backend: QemuBackend, boot_files: tuple[Path, Path | None]
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
    backend: QemuBackend, boot_files: tuple[Path, Path | None]
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
    assert vm.qmp is not None
    await vm.qmp.execute(
        "send-key",
        {"keys": [{"type": "qcode", "data": k} for k in ("ctrl", "alt", "delete")]},
    )
    assert await asyncio.wait_for(got, 60) == "guest powered off"
    assert not is_alive(ident)


async def test_adopt_after_restart(
    vm_root: Path, backend: QemuBackend, boot_files: tuple[Path, Path | None]
) -> None:
    ident = await backend.create(spec_for(boot_files, "vm-adopt"))
    await backend.boot("vm-adopt")
    await wait_for(backend, "vm-adopt", READY)
    await backend.close()
    assert is_alive(ident), "close() must leave the VMM running"

    fresh = QemuBackend(vm_root, accelerator=ACCEL)
    await fresh.start()
    try:
        assert await fresh.adopt("vm-adopt", ident) == VmState.RUNNING
        assert fresh.identity("vm-adopt") == ident
        await fresh.pause("vm-adopt")
        assert await fresh.runstate("vm-adopt") == "paused"
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
    finally:
        await fresh.close()


async def test_adopt_with_a_stale_identity_kills_the_unrecorded_vmm(
    vm_root: Path, backend: QemuBackend, boot_files: tuple[Path, Path | None]
) -> None:
    ident = await backend.create(spec_for(boot_files, "vm-stale"))
    await backend.close()
    fresh = QemuBackend(vm_root, accelerator=ACCEL)
    try:
        stale = ProcessIdentity(ident.pid, ident.start_time - 1)
        assert await fresh.adopt("vm-stale", stale) is None
        # process.json named a live QEMU of this VM that the caller did not know: it went.
        await asyncio.sleep(0.2)
        assert not is_alive(ident)
    finally:
        await fresh.close()


async def test_remove_orphans(
    vm_root: Path, backend: QemuBackend, boot_files: tuple[Path, Path | None]
) -> None:
    keep = await backend.create(spec_for(boot_files, "vm-keep"))
    orphan = await backend.create(spec_for(boot_files, "vm-orphan"))
    await backend.close()
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
        fresh = QemuBackend(vm_root, accelerator=ACCEL)
        try:
            removed = await fresh.remove_orphans({"vm-keep"})
            assert removed == ["vm-orphan"]
            assert not is_alive(orphan)
            assert not (vm_root / "vm-orphan").exists()
            assert is_alive(keep)
            assert (vm_root / "vm-keep").exists()
            assert sleeper.poll() is None, "a process that is not provably ours was killed"
            assert stranger_dir.exists()
            assert await fresh.adopt("vm-keep", keep) == VmState.CREATED
            await fresh.destroy("vm-keep")
            assert not is_alive(keep)
        finally:
            await fresh.close()
    finally:
        sleeper.kill()
        sleeper.wait()
        shutil.rmtree(stranger_dir, ignore_errors=True)


async def test_bad_kernel_leaves_nothing(
    vm_root: Path, backend: QemuBackend, boot_files: tuple[Path, Path | None], tmp_path: Path
) -> None:
    bad = tmp_path / "not-a-kernel"
    bad.write_bytes(b"this is not a kernel\n" * 5000)
    with pytest.raises(BackendError) as err:
        await backend.create(spec_for(boot_files, "vm-bad", kernel=bad))
    # QEMU's own words (which depend on the bytes), e.g. "linux kernel too old to load a ram
    # disk" or "invalid kernel header".
    assert err.value.message.startswith("QEMU failed to start VM vm-bad: qemu: ")
    assert "kernel" in err.value.message
    assert str(tmp_path) not in err.value.message
    assert str(vm_root) not in err.value.message
    assert not (vm_root / "vm-bad").exists()
    assert backend.identity("vm-bad") is None

    with pytest.raises(BackendError) as err:
        await backend.create(spec_for(boot_files, "vm-bad", kernel=tmp_path / "missing"))
    assert "could not open kernel file 'missing'" in err.value.message
    assert str(tmp_path) not in err.value.message
    assert not (vm_root / "vm-bad").exists()


async def test_a_missing_disk_leaves_nothing(
    vm_root: Path, backend: QemuBackend, boot_files: tuple[Path, Path | None], tmp_path: Path
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


async def test_read_only_disk_is_shared(
    backend: QemuBackend, boot_files: tuple[Path, Path | None], tmp_path: Path
) -> None:
    image = tmp_path / "ro.img"
    image.write_bytes(b"\0" * 1024 * 1024)
    image.chmod(0o444)
    ident = await backend.create(
        spec_for(boot_files, "vm-ro", disks=(ResolvedDisk("ro", image, True, True),))
    )
    drive = next(a for a in read_cmdline(ident.pid) if a.startswith("id=disk0,"))
    assert f"file={image}" in drive and "readonly=on" in drive
    assert not (backend.vm_dir("vm-ro") / "disk0.img").exists()
    await backend.destroy("vm-ro")
    assert image.exists()


async def test_the_vmm_inherits_none_of_our_descriptors(
    backend: QemuBackend, boot_files: tuple[Path, Path | None]
) -> None:
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
        assert theirs[2].endswith("/vm-fds/qemu.stderr")
        await backend.destroy("vm-fds")
    finally:
        listener.close()


async def test_long_vm_root_is_refused(tmp_path: Path) -> None:
    root = tmp_path / ("x" * 100)
    with pytest.raises(BackendError, match=r"Unix socket|AF_UNIX"):
        await QemuBackend(root, accelerator="tcg").start()


async def test_a_vm_id_too_long_for_the_socket_path_is_an_invalid_argument(
    boot_files: tuple[Path, Path | None], tmp_path: Path
) -> None:
    # A root of exactly 60 bytes, wherever pytest's temp dir is (its path length varies).
    short = Path(tempfile.mkdtemp(prefix="m", dir="/tmp"))
    root = short / ("r" * (59 - len(str(short))))
    assert len(str(root)) == 60
    b = QemuBackend(root, accelerator="tcg")
    try:
        await b.start()
        with pytest.raises(InvalidArgument, match="vm_id: at most 37 characters"):
            await b.create(spec_for(boot_files, "v" * 38))
        assert dirs_under(root) == []
    finally:
        await b.close()
        shutil.rmtree(short)


async def test_missing_binary_names_the_package(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="qemu-system-x86"):
        await QemuBackend(tmp_path, qemu_binary="no-such-qemu-binary").start()


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

"""The default guest image boots under QEMU microvm and keeps its init contract.

Uses the asset store at $METALD_TEST_ASSETS (default: <repo>/var/assets, which `make guest`
builds). Each test starts its own QEMU in its own session, kills it by pid when done and
removes its temp directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from metald.assets.guest_agent import GuestAgent
from metald.assets.guest_builder import build_default_guest, existing_guest, make_rootfs
from metald.assets.store import LocalAssetStore
from metald.core.guest import GuestArgs, kernel_command_line
from metald.host.cpu import host_tsc_khz

pytestmark = pytest.mark.guest

STORE_DIR = Path(os.environ.get("METALD_TEST_ASSETS", Path(__file__).parents[2] / "var" / "assets"))
QEMU = shutil.which("qemu-system-x86_64")


def cmdline(**guest: Any) -> str:
    """console=ttyS0 reboot=t panic=-1 quiet, the TCG timer fix (see kernel_args.py) and
    the guest's metald.* arguments."""
    return kernel_command_line(GuestArgs(**guest), accel="tcg", tsc_khz=host_tsc_khz())


READY_RE = re.compile(
    r"^METALD-GUEST READY vm=(?P<vm>\S+) boot=(?P<boot>\S+) uptime=(?P<uptime>[\d.]+)"
    r" root=(?P<root>\S+)",
    re.M,
)
HEARTBEAT_RE = re.compile(r"^METALD-GUEST HEARTBEAT (\d+)\s*$", re.M)
SHUTDOWN_RE = re.compile(r"^METALD-GUEST SHUTDOWN\s*$", re.M)
ERROR_RE = re.compile(r"^METALD-GUEST ERROR .*$", re.M)

BOOT_TIMEOUT = 90.0  # TCG under load can be slow; typical is ~4 s


@pytest.fixture(scope="module")
def store() -> LocalAssetStore:
    s = LocalAssetStore(STORE_DIR)
    if s.default() is None:
        pytest.skip(
            f"no default guest image in {STORE_DIR}: run "
            f"`.venv/bin/metald assets build --store {STORE_DIR}` (or set METALD_TEST_ASSETS)"
        )
    if QEMU is None:
        pytest.skip("qemu-system-x86_64 is not installed (Debian package qemu-system-x86)")
    return s


@pytest.fixture
def tmp() -> Iterator[Path]:
    # Not tmp_path: pytest keeps those around; this leaves nothing behind.
    with tempfile.TemporaryDirectory(prefix="metald-guest-test-") as d:
        yield Path(d)


class Guest:
    """One QEMU microvm with the console in a file and QMP on a Unix socket."""

    def __init__(
        self,
        work: Path,
        kernel: Path,
        initrd: Path | None,
        append: str,
        extra: Sequence[str] = (),
    ) -> None:
        self.console_path = work / "console.log"
        self.qmp_path = work / "qmp.sock"
        self.args = [
            str(QEMU),
            "-M", "microvm,x-option-roms=off,rtc=off",
            "-device", "i8042",
            "-accel", "tcg",
            "-cpu", "max",
            "-m", "256",
            "-smp", "1",
            "-nodefaults", "-no-user-config", "-nographic", "-display", "none",
            "-chardev", f"file,id=con0,path={self.console_path}",
            "-serial", "chardev:con0",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            "-kernel", str(kernel),
            *(["-initrd", str(initrd)] if initrd else []),
            "-append", append,
            *extra,
        ]  # fmt: skip
        self.proc: asyncio.subprocess.Process | None = None
        self.started = 0.0
        self.qmp: QMPClient | None = None

    async def start(self) -> None:
        self.started = time.monotonic()
        self.proc = await asyncio.create_subprocess_exec(
            *self.args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )

    def console(self) -> str:
        try:
            return self.console_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    async def wait_for(
        self, pattern: re.Pattern[str], timeout: float, after: int = 0
    ) -> re.Match[str]:
        """The first match of pattern in the console at or after offset ``after``."""
        deadline = time.monotonic() + timeout
        while True:
            m = pattern.search(self.console(), after)
            if m:
                return m
            assert self.proc is not None
            if self.proc.returncode is not None:
                err = await self.proc.stderr.read() if self.proc.stderr else b""
                pytest.fail(
                    f"QEMU exited ({self.proc.returncode}) before {pattern.pattern!r}: "
                    f"{err.decode(errors='replace')}\n--- console ---\n{self.console()}"
                )
            if time.monotonic() > deadline:
                pytest.fail(f"no {pattern.pattern!r} within {timeout} s:\n{self.console()}")
            await asyncio.sleep(0.05)

    async def connect_qmp(self) -> QMPClient:
        if self.qmp is None:
            client = QMPClient("metald-test")
            deadline = time.monotonic() + 10
            while True:
                try:
                    await client.connect(str(self.qmp_path))
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.05)
            self.qmp = client
        return self.qmp

    async def execute(self, cmd: str, args: dict[str, object] | None = None) -> object:
        client = await self.connect_qmp()
        return await client.execute(cmd, args)

    async def ctrl_alt_del(self) -> None:
        keys = [{"type": "qcode", "data": k} for k in ("ctrl", "alt", "delete")]
        await self.execute("send-key", {"keys": keys})

    async def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        return await asyncio.wait_for(self.proc.wait(), timeout)

    async def close(self) -> None:
        if self.qmp is not None:
            with contextlib.suppress(Exception, EOFError):
                await self.qmp.disconnect()
            self.qmp = None
        if self.proc is not None:
            if self.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()


@contextlib.asynccontextmanager
async def running_guest(
    work: Path, kernel: Path, initrd: Path | None, append: str, extra: Sequence[str] = ()
) -> AsyncIterator[Guest]:
    guest = Guest(work, kernel, initrd, append, extra)
    try:
        await guest.start()
        yield guest
    finally:
        await guest.close()


def _report(what: str, seconds: float, ready: re.Match[str]) -> None:
    print(f"\n{what}: create->READY {seconds:.2f} s wall, guest uptime {ready['uptime']} s")


async def test_boot_ready_heartbeat_pause_and_ctrl_alt_del(
    store: LocalAssetStore, tmp: Path
) -> None:
    kernel, initrd = store.default_boot()
    append = cmdline(vm_id="test1")
    async with running_guest(tmp, kernel, initrd, append) as g:
        ready = await g.wait_for(READY_RE, BOOT_TIMEOUT)
        _report("boot", time.monotonic() - g.started, ready)
        assert ready["vm"] == "test1"
        assert ready["root"] == "initramfs"
        assert re.fullmatch(r"[0-9a-f-]{36}", ready["boot"])
        assert len(READY_RE.findall(g.console())) == 1

        # Heartbeats advance, one a second.
        first = await g.wait_for(HEARTBEAT_RE, 20, ready.end())
        third = await g.wait_for(re.compile(r"^METALD-GUEST HEARTBEAT 3\s*$", re.M), 20)
        assert int(first[1]) == 1 and third.start() > first.start()

        # A paused guest prints nothing; after cont the sequence goes on where it stopped.
        await g.execute("stop")
        await asyncio.sleep(0.3)
        before = HEARTBEAT_RE.findall(g.console())
        await asyncio.sleep(2.5)
        assert HEARTBEAT_RE.findall(g.console()) == before
        await g.execute("cont")
        nxt = int(before[-1]) + 1
        await g.wait_for(re.compile(rf"^METALD-GUEST HEARTBEAT {nxt}\s*$", re.M), 20)

        # Ctrl-Alt-Del runs the init's shutdown path; QEMU exits by itself.
        await g.ctrl_alt_del()
        await g.wait_for(SHUTDOWN_RE, 20)
        rc = await g.wait_exit(20)
        assert rc == 0
        assert not ERROR_RE.search(g.console()), g.console()
        assert "Kernel panic" not in g.console()


async def test_on_shutdown_reboot_resets_the_guest(store: LocalAssetStore, tmp: Path) -> None:
    """With metald.on_shutdown=reboot the init ends with a reset (Firecracker's exit path);
    QEMU without -no-reboot boots the guest again, with a new boot id."""
    kernel, initrd = store.default_boot()
    append = cmdline(vm_id="rb1", on_shutdown="reboot")
    async with running_guest(tmp, kernel, initrd, append) as g:
        first = await g.wait_for(READY_RE, BOOT_TIMEOUT)
        _report("boot", time.monotonic() - g.started, first)
        await g.wait_for(HEARTBEAT_RE, 20, first.end())
        await g.ctrl_alt_del()
        down = await g.wait_for(SHUTDOWN_RE, 20, first.end())
        t0 = time.monotonic()
        second = await g.wait_for(READY_RE, BOOT_TIMEOUT, down.end())
        _report("reboot", time.monotonic() - t0, second)
        assert second["vm"] == "rb1"
        assert second["boot"] != first["boot"]
        assert g.proc is not None and g.proc.returncode is None


async def test_reboot_with_no_reboot_makes_qemu_exit(store: LocalAssetStore, tmp: Path) -> None:
    kernel, initrd = store.default_boot()
    append = cmdline(vm_id="rb2", on_shutdown="reboot")
    async with running_guest(tmp, kernel, initrd, append, ["-no-reboot"]) as g:
        ready = await g.wait_for(READY_RE, BOOT_TIMEOUT)
        await g.wait_for(HEARTBEAT_RE, 20, ready.end())
        await g.ctrl_alt_del()
        await g.wait_for(SHUTDOWN_RE, 20)
        assert await g.wait_exit(20) == 0


async def test_network_from_the_kernel_command_line(store: LocalAssetStore, tmp: Path) -> None:
    """eth0 is configured from metald.ip4/gw4/ip6/gw6/dns/mac (QEMU user networking, so no
    root or host interfaces are needed) before READY, without errors."""
    kernel, initrd = store.default_boot()
    mac = "52:54:00:12:34:56"
    append = cmdline(
        vm_id="net1",
        mac=mac,
        ip4="10.0.2.15/24",
        gw4="10.0.2.2",
        ip6="fec0::15/64",
        gw6="fec0::2",
        dns=("10.0.2.3", "fec0::3"),
    )
    extra = [
        "-netdev", "user,id=n0,restrict=on",
        "-device", f"virtio-net-device,netdev=n0,mac={mac}",
    ]  # fmt: skip
    async with running_guest(tmp, kernel, initrd, append, extra) as g:
        ready = await g.wait_for(READY_RE, BOOT_TIMEOUT)
        net = re.search(r"^METALD-GUEST NET (\S+) ip4=(\S+) ip6=(\S+)\s*$", g.console(), re.M)
        assert net is not None, g.console()
        assert net.groups() == ("eth0", "10.0.2.15/24", "fec0::15/64")
        assert net.start() < ready.start()
        assert not ERROR_RE.search(g.console()), g.console()


async def test_no_network_arguments_configure_nothing(store: LocalAssetStore, tmp: Path) -> None:
    kernel, initrd = store.default_boot()
    async with running_guest(tmp, kernel, initrd, cmdline(vm_id="nonet")) as g:
        await g.wait_for(READY_RE, BOOT_TIMEOUT)
        assert "METALD-GUEST NET" not in g.console()
        assert not ERROR_RE.search(g.console()), g.console()


async def test_agent_port_runs_commands(store: LocalAssetStore, tmp: Path) -> None:
    kernel, initrd = store.default_boot()
    agent_sock = tmp / "agent.sock"
    extra = [
        "-chardev", f"socket,id=agent,path={agent_sock},server=on,wait=off",
        "-device", "isa-serial,chardev=agent,iobase=0x2f8,irq=3",
    ]  # fmt: skip
    append = cmdline(vm_id="agent", agent="ttyS1")
    async with running_guest(tmp, kernel, initrd, append, extra) as g:
        await g.wait_for(READY_RE, BOOT_TIMEOUT)
        agent = await GuestAgent.connect(agent_sock)
        try:
            assert await agent.run("echo hello; hostname") == (0, "hello\nagent\n")
            status, _ = await agent.run("false")
            assert status == 1
        finally:
            await agent.close()
        assert not ERROR_RE.search(g.console()), g.console()


def _rootfs_image(store: LocalAssetStore, initrd: Path, out: Path, scratch: Path) -> None:
    """A writable copy of the store's rootfs, or one made from the initrd's own tree."""
    default = store.default()
    if default is not None and default.rootfs is not None:
        shutil.copyfile(store.resolve("rootfs", default.rootfs), out)
        return
    tree = scratch / "tree"
    tree.mkdir()
    subprocess.run(
        ["cpio", "-idm", "--quiet", "--no-absolute-filenames"],
        input=gzip.decompress(initrd.read_bytes()),
        cwd=tree,
        check=True,
    )
    make_rootfs(tree, out, size_mb=32)
    shutil.rmtree(tree)


async def test_root_filesystem_switch_root(store: LocalAssetStore, tmp: Path) -> None:
    """metald.root=/dev/vda mounts the ext4 image and runs the same init from it."""
    kernel, initrd = store.default_boot()
    assert initrd is not None
    disk = tmp / "rootfs.ext4"
    _rootfs_image(store, initrd, disk, tmp)
    append = cmdline(vm_id="root1", root="/dev/vda")
    extra = [
        "-drive", f"file={disk},if=none,format=raw,id=d0",
        "-device", "virtio-blk-device,drive=d0",
    ]  # fmt: skip
    async with running_guest(tmp, kernel, initrd, append, extra) as g:
        ready = await g.wait_for(READY_RE, BOOT_TIMEOUT)
        _report("boot from rootfs", time.monotonic() - g.started, ready)
        assert ready["root"] == "/dev/vda", g.console()
        assert not ERROR_RE.search(g.console()), g.console()
        await g.wait_for(HEARTBEAT_RE, 20, ready.end())
        await g.ctrl_alt_del()
        await g.wait_for(SHUTDOWN_RE, 20)
        assert await g.wait_exit(20) == 0


def test_the_image_is_current_and_a_rebuild_is_a_no_op(store: LocalAssetStore, tmp: Path) -> None:
    """`make guest` twice costs nothing: the store's guest matches the recipe, so a build
    returns it without downloading or unpacking anything."""
    if existing_guest(store) is None:
        pytest.skip(f"the image in {STORE_DIR} is from an older recipe: run metald assets build")
    steps: list[str] = []
    got = build_default_guest(store, tmp / "work", lambda step, i, n: steps.append(step))
    assert got.reused and steps == ["done"]
    assert "virtio_net" in got.modules and "virtio_blk" in got.modules
    assert not (tmp / "work").exists()

"""What a tenant's VM is given from the asset store is the file that was resolved at create
time, with real QEMU guests (TCG): a rename-swap and then a symlink swapped into the store
after the create reach neither the first boot nor a boot after a shutdown (a new VMM from
the saved spec); jailed, the jail's /initrd is the very inode that was resolved.

The store is a private copy of the default guest's store ($METALD_TEST_ASSETS, default
<repo>/var/assets: copied, not hard-linked, since the store refuses files with hard links it
does not account for), with the default initrd also placed by an "operator" at
custom/initrd. The swap puts garbage there: a guest given it could not boot at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from metald.assets.store import LocalAssetStore
from metald.backends.qemu.driver import QemuDriver
from metald.backends.vmm.disks import sparse_copy
from metald.backends.vmm.jail import JailSettings, processes_rooted_at
from metald.backends.vmm.runtime import VmmRuntime
from metald.core.errors import BackendError, InvalidArgument
from metald.core.models import LaunchSpec, ResolvedDisk
from metald.host.mounts import mounts_under
from metald.host.process import is_alive
from metald.jailer import ensure_jail_user

pytestmark = pytest.mark.guest

STORE_DIR = Path(os.environ.get("METALD_TEST_ASSETS", Path(__file__).parents[2] / "var" / "assets"))
ACCEL = os.environ.get("METALD_TEST_QEMU_ACCEL", "auto")
BOOT_TIMEOUT = 120.0  # TCG on a busy 2-CPU machine
READY = re.compile(r"^METALD-GUEST READY vm=(\S+) boot=(\S+)", re.M)
CGROUP_PARENT = f"metald-test-pin-{os.getpid()}"


@pytest.fixture(scope="module")
def private_store() -> Iterator[LocalAssetStore]:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (Debian package qemu-system-x86)")
    shared = LocalAssetStore(STORE_DIR)
    if shared.default() is None:
        pytest.skip(f"no default guest image in {STORE_DIR} (`metald assets build`)")
    root = Path(tempfile.mkdtemp(prefix="pinstore-"))
    store_root = root / "assets"
    store_root.mkdir()
    for name in ("blobs", "assets"):
        subprocess.run(
            ["cp", "-a", "--reflink=auto", str(STORE_DIR / name), str(store_root / name)],
            check=True,
        )
    shutil.copy2(STORE_DIR / "default.json", store_root / "default.json")
    yield LocalAssetStore(store_root)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def operator_files(private_store: LocalAssetStore, tmp_path: Path) -> Path:
    """custom/initrd (the default guest's initrd, as an operator would place a file) and
    custom/garbage (what the swap puts in its place)."""
    default = private_store.default()
    assert default is not None and default.initrd is not None
    custom = private_store.root / "custom"
    shutil.rmtree(custom, ignore_errors=True)
    custom.mkdir()
    shutil.copyfile(private_store.get(default.initrd).path, custom / "initrd")
    (custom / "garbage").write_bytes(os.urandom(1 << 20))
    (custom / "disk.img").write_bytes(b"original disk" + bytes(4096))
    return custom


@pytest.fixture
def jail(request: pytest.FixtureRequest) -> Iterator[JailSettings | None]:
    if request.param == "direct":
        yield None
        return
    if os.geteuid() != 0:
        pytest.skip("the jailer needs root")
    uid, gid = ensure_jail_user()
    base = Path(tempfile.mkdtemp(prefix="j"))
    settings = JailSettings(uid=uid, gid=gid, chroot_base=base, cgroup_parent=CGROUP_PARENT)
    yield settings
    stray = []
    for jail_dir in settings.backend_dir("qemu").glob("*"):
        for ident in processes_rooted_at(jail_dir / "root"):
            stray.append(ident.pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(ident.pid, signal.SIGKILL)
    assert mounts_under(settings.chroot_base) == []
    shutil.rmtree(settings.chroot_base, ignore_errors=True)
    assert stray == [], f"jailed VMMs left running: {stray}"


@pytest.fixture
async def backend(jail: JailSettings | None) -> AsyncIterator[VmmRuntime]:
    vm_root = Path(tempfile.mkdtemp(prefix="v")) / "vms"
    b = VmmRuntime(QemuDriver(accelerator=ACCEL), vm_root, jail=jail)
    await b.start()
    yield b
    if vm_root.is_dir():
        for d in vm_root.iterdir():
            await b.destroy(d.name)
    if jail is not None:
        await b.remove_orphans(set())
    await b.close()
    shutil.rmtree(vm_root.parent, ignore_errors=True)


def console(b: VmmRuntime, vm_id: str) -> str:
    try:
        return Path(b.info(vm_id)["console_log"]).read_text(errors="replace")
    except FileNotFoundError:
        return ""


async def wait_ready(b: VmmRuntime, vm_id: str) -> None:
    start = time.monotonic()
    while time.monotonic() - start < BOOT_TIMEOUT:
        text = console(b, vm_id)
        if READY.search(text):
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"no READY in {BOOT_TIMEOUT} s:\n{console(b, vm_id)[-2000:]}")


def jail_inode(b: VmmRuntime, vm_id: str, inside: str) -> tuple[int, int] | None:
    """(dev, ino) of a file as the VM's jailed VMM sees it (None when not jailed)."""
    if b.jail is None:
        return None
    st = os.stat(f"/proc/{b.info(vm_id)['pid']}/root{inside}")
    return st.st_dev, st.st_ino


@pytest.mark.parametrize("jail", ["direct", "jailed"], indirect=True)
async def test_a_swap_into_the_store_after_create_reaches_no_guest(
    private_store: LocalAssetStore, operator_files: Path, backend: VmmRuntime
) -> None:
    store, custom = private_store, operator_files
    original = os.stat(custom / "initrd")
    # What the service does at CreateVm: resolve as the tenant (a pin comes back).
    kernel, _ = store.default_boot()
    initrd = store.resolve("config.boot.initrd_path", "custom/initrd", customer="alice")
    disk = store.resolve("config.storage[0].path", "custom/disk.img", customer="alice")
    vm = "vm-pin"
    spec = LaunchSpec(
        vm_id=vm,
        vcpu_count=1,
        memory_bytes=256 * 1024 * 1024,
        kernel=kernel,
        initrd=initrd,
        kernel_args="",
        disks=(ResolvedDisk("data", disk, False, False),),
    )
    await backend.create(spec)

    # Rename-swap: the original moves aside, garbage takes its name (and the disk's).
    os.rename(custom / "initrd", custom / "initrd.orig")
    os.rename(custom / "garbage", custom / "initrd")
    (custom / "disk.img").write_bytes(b"swapped disk")
    assert (custom / "initrd").read_bytes() != (custom / "initrd.orig").read_bytes()

    # The VMM made at create boots; then, after a shutdown, a new VMM (and jail) made from
    # the saved spec: the one that would see a swapped name.
    expected = (original.st_dev, original.st_ino)
    for _ in range(2):
        ident = await backend.boot(vm)
        await wait_ready(backend, vm)
        if backend.jail is not None:
            assert jail_inode(backend, vm, "/initrd") == expected
        assert await backend.shutdown(vm, timeout=60, force=True) == "forced"
        assert not is_alive(ident)
    copy = (backend.vm_dir(vm) / "disk0.img").read_bytes()
    assert copy.startswith(b"original disk")

    # Now a symlink (to more garbage) in its place, and a new VMM again.
    (custom / "initrd").unlink()
    (custom / "initrd").symlink_to("initrd.orig-garbage")
    (custom / "initrd.orig-garbage").write_bytes(os.urandom(1 << 20))
    with pytest.raises(InvalidArgument, match="symbolic link"):
        store.resolve("config.boot.initrd_path", "custom/initrd", customer="alice")
    await backend.boot(vm)
    await wait_ready(backend, vm)
    if backend.jail is not None:
        assert jail_inode(backend, vm, "/initrd") == expected
    # The store's link accounting holds with the VM running: the pin is the only other name.
    assert os.stat(custom / "initrd.orig").st_nlink == 2
    assert store.resolve("f", "custom/initrd.orig", customer="bob") == initrd
    await backend.destroy(vm)


async def test_a_disk_copy_reads_the_open_file_and_follows_no_symlink(tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    src.write_bytes(b"disk bytes" * 100)
    await sparse_copy(src, tmp_path / "copy.img")
    assert (tmp_path / "copy.img").read_bytes() == src.read_bytes()
    (tmp_path / "link.img").symlink_to(src)
    with pytest.raises(BackendError, match="symbolic link"):
        await sparse_copy(tmp_path / "link.img", tmp_path / "copy2.img")
    (tmp_path / "alias").symlink_to(tmp_path)
    with pytest.raises(BackendError, match="symbolic link"):
        await sparse_copy(tmp_path / "alias" / "src.img", tmp_path / "copy3.img")
    assert not (tmp_path / "copy2.img").exists() and not (tmp_path / "copy3.img").exists()

"""The jailer against the real kernel: namespaces, TAP devices, mounts, cgroups, privileges,
and a real QEMU guest booted inside a jail.

Needs root (skipped otherwise). Each test makes its own network namespace, jail base
directory and cgroup parent, and removes them in finally blocks; no test touches the
machine's own network namespace. The jail user is the `metald-vm` system user (created
here if missing, as metald's set-up does).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from cross_vmm import attack, pid_namespace_members

from metald.assets.store import LocalAssetStore
from metald.backends.qemu.command import SANDBOX
from metald.backends.qemu.host_paths import qemu_host_paths
from metald.core.errors import BackendError
from metald.host.cpu import host_tsc_khz
from metald.host.mounts import mounts_under
from metald.host.process import ProcessWatch, child_pids, identity_of
from metald.jailer import (
    STEPS,
    CgroupSpec,
    DeviceNode,
    JailedProcess,
    JailerError,
    JailSpec,
    PlacedFile,
    Rlimit,
    TapSpec,
    ensure_jail_user,
    launch_jailed,
    remove_jail,
    vmm_devices,
)
from metald.jailer.cgroups import cgroup_dir, cgroup_mount
from metald.jailer.helper import EXIT_CODES, TEST_HOOKS_ENV
from metald.jailer.host import dynamic_binary_paths
from metald.jailer.spares import Spares

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the jailer needs root")

STORE_DIR = Path(os.environ.get("METALD_TEST_ASSETS", Path(__file__).parents[2] / "var" / "assets"))
BUSYBOX = "/usr/bin/busybox"
BOOT_TIMEOUT = 90.0
_names = itertools.count()


# -- fixtures --


@pytest.fixture(scope="module")
def jail_ids() -> tuple[int, int]:
    return ensure_jail_user()


@pytest.fixture(scope="module")
def cgroup_parent() -> Iterator[str]:
    """A cgroup parent of this test run only; removed (it must be empty by then)."""
    name = f"metald-test-{os.getpid()}"
    yield name
    mount = cgroup_mount(CgroupSpec())
    if mount is not None:
        parent = Path(mount) / name
        if parent.exists():
            leftovers = [p.name for p in parent.iterdir() if p.is_dir()]
            parent.rmdir()
            assert leftovers == [], f"VM cgroups left behind: {leftovers}"


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"mjt{os.getpid()}-{next(_names)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture
def jail_base() -> Iterator[Path]:
    # tempfile's directory (the session's, see conftest): short enough for a QMP socket path.
    base = Path(tempfile.mkdtemp(prefix="j"))
    try:
        yield base
    finally:
        assert mounts_under(base) == []
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def hooks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TEST_HOOKS_ENV, "1")


@pytest.fixture(scope="module")
def boot_files() -> tuple[Path, Path | None]:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (Debian package qemu-system-x86)")
    store = LocalAssetStore(STORE_DIR)
    if store.default() is None:
        pytest.skip(f"no default guest image in {STORE_DIR} (`metald assets build`)")
    return store.default_boot()


class Jails:
    """Every jail a test launched: killed, reaped and removed at teardown."""

    def __init__(self) -> None:
        self.running: list[tuple[JailedProcess, ProcessWatch]] = []

    async def launch(self, spec: JailSpec, spares: Spares | None = None) -> JailedProcess:
        jailed = await launch_jailed(
            spec, stderr_path=Path(spec.jail_base, f"{spec.vm_id}.err"), spares=spares
        )
        watch = ProcessWatch.open(jailed.identity)
        assert watch is not None, "the VMM exited at once"
        self.running.append((jailed, watch))
        return jailed

    async def stop(self, jailed: JailedProcess) -> None:
        for entry in list(self.running):
            if entry[0] is jailed:
                await entry[1].kill_and_wait()
                entry[1].close()
                self.running.remove(entry)
        await remove_jail(jailed.spec)


@pytest.fixture
async def jails() -> AsyncIterator[Jails]:
    j = Jails()
    try:
        yield j
    finally:
        for jailed, watch in j.running:
            await watch.kill_and_wait()
            watch.close()
            await remove_jail(jailed.spec)


# -- helpers --


def busybox_spec(
    base: Path,
    ids: tuple[int, int],
    *,
    script: str,
    netns: str | None = None,
    tap: str | None = None,
    cgroup_parent: str | None = None,
    **changes: object,
) -> JailSpec:
    """A jail whose 'VMM' is a busybox shell running `script` (then sleeping), to look at
    the jail from inside."""
    uid, gid = ids
    fields: dict[str, object] = {
        "vm_id": f"vm{next(_names)}",
        "uid": uid,
        "gid": gid,
        "backend": "probe",
        "jail_base": str(base),
        "netns": netns,
        "tap": None if tap is None else TapSpec(tap),
        "host_paths": (BUSYBOX,),
        "devices": vmm_devices(kvm=True, tap=tap is not None),
        "cgroup": None
        if cgroup_parent is None
        else CgroupSpec.for_vm(memory_bytes=64 << 20, vcpu_count=1, parent=cgroup_parent),
        "argv": (BUSYBOX, "sh", "-c", f"{script}\nexec {BUSYBOX} sleep 600"),
    }
    fields.update(changes)
    return JailSpec(**fields)  # type: ignore[arg-type]


def qemu_spec(
    base: Path,
    ids: tuple[int, int],
    boot: tuple[Path, Path | None],
    *,
    netns: str,
    tap: str,
    cgroup_parent: str,
    **changes: object,
) -> JailSpec:
    kernel, initrd = boot
    assert initrd is not None
    vm_id = f"q{next(_names)}"
    tsc = host_tsc_khz()
    append = "console=ttyS0 panic=-1 quiet reboot=t"
    if tsc:
        append += f" tsc_early_khz={tsc} tsc=reliable"
    append += f" metald.vm_id={vm_id}"
    argv = (
        "/usr/bin/qemu-system-x86_64",
        "-M", "microvm,x-option-roms=off,rtc=off",
        "-device", "i8042",
        "-accel", "tcg",
        "-cpu", "max",
        "-m", "256",
        "-smp", "1",
        "-nodefaults", "-no-user-config", "-nographic", "-display", "none",
        "-sandbox", SANDBOX,
        "-S",
        "-chardev", "socket,id=qmp,path=/run/qmp.sock,server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-chardev", "file,id=con0,path=/run/console.log",
        "-serial", "chardev:con0",
        "-kernel", "/vmlinux",
        "-initrd", "/initrd",
        "-append", append,
        "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
        "-device", "virtio-net-device,netdev=n0",
    )  # fmt: skip
    uid, gid = ids
    fields: dict[str, object] = {
        "vm_id": vm_id,
        "uid": uid,
        "gid": gid,
        "argv": argv,
        "jail_base": str(base),
        "netns": netns,
        "tap": TapSpec(tap),
        "files": (
            PlacedFile(str(kernel), "/vmlinux"),
            PlacedFile(str(initrd), "/initrd"),
        ),
        "devices": vmm_devices(kvm=True, tap=True),
        "host_paths": qemu_host_paths(),
        "cgroup": CgroupSpec.for_vm(memory_bytes=256 << 20, vcpu_count=1, parent=cgroup_parent),
    }
    fields.update(changes)
    return JailSpec(**fields)  # type: ignore[arg-type]


def slurp(path: str | Path) -> str:
    return Path(path).read_text(errors="replace")


def exists(path: str | Path) -> bool:
    return Path(path).exists()


def listing(path: str | Path) -> list[str]:
    return sorted(p.name for p in Path(path).iterdir())


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True)


def status_fields(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def links(netns: str) -> dict[str, dict[str, object]]:
    out = subprocess.run(
        ["ip", "-n", netns, "-j", "-d", "link", "show"], capture_output=True, text=True, check=True
    ).stdout
    return {link["ifname"]: link for link in json.loads(out)}


# Children this process had before the test (see _children_before): when the whole suite runs,
# e2e tests kill daemons with SIGKILL and this process, a subreaper, inherits what those
# daemons left (their VMMs, their spare jailer helpers); those are not this file's leftovers.
_before: set[str] = set()  # their pids


@pytest.fixture(autouse=True)
def _children_before() -> None:
    _before.clear()
    _before.update(child.split()[0] for child in _all_children())


def our_children() -> list[str]:
    """Processes whose parent is this test process (zombies included) and that the test
    made (not there when it began)."""
    return [child for child in _all_children() if child.split()[0] not in _before]


def _all_children() -> list[str]:
    """This process's children, each as "pid pid (comm) state"."""
    found = []
    for pid in child_pids(os.getpid()):
        try:
            text = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        found.append(
            f"{pid} {text[: text.rindex(')') + 1].split(' ', 1)[1]} {text[text.rindex(')') + 2]}"
        )
    return found


def assert_no_leftovers(spec: JailSpec) -> None:
    assert not spec.jail_dir.exists(), f"jail directory left: {spec.jail_dir}"
    assert mounts_under(Path(spec.jail_base)) == []
    if spec.cgroup is not None:
        path = cgroup_dir(spec.cgroup, spec.vm_id)
        assert path is None or not path.exists(), f"cgroup left: {path}"
    if spec.netns is not None and exists(spec.netns_path or "") and spec.tap is not None:
        assert spec.tap.name not in links(spec.netns), "TAP left in the namespace"
    assert our_children() == []


async def wait_until(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def wait_for_file(path: Path, pattern: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError):
            text = slurp(path)
            if re.search(pattern, text, re.M):
                return text
        await asyncio.sleep(0.05)
    raise AssertionError(f"{pattern!r} not in {path} after {timeout} s")


# -- a jailed QEMU --


def check_qemu_confinement(
    spec: JailSpec, jailed: JailedProcess, ids: tuple[int, int], netns: str
) -> None:
    uid, gid = ids
    pid = jailed.pid
    status = status_fields(pid)
    assert status["Name"].startswith("qemu-system")
    assert status["Uid"].split() == [str(uid)] * 4
    assert status["Gid"].split() == [str(gid)] * 4
    assert status["Groups"] == ""
    for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[caps], 16) == 0, caps
    assert status["NoNewPrivs"] == "1"
    # seccomp: the jailer's filter and QEMU's own -sandbox filter on top of it.
    assert status["Seccomp"] == "2"
    assert int(status["Seccomp_filters"]) >= 2
    assert status["NSpid"].split()[-1] == "1"  # pid 1 of its own PID namespace

    # Its root is the jail (the same directory), its network namespace the VM's.
    root = os.stat(f"/proc/{pid}/root")
    jail_root = os.stat(spec.jail_root)
    assert (root.st_dev, root.st_ino) == (jail_root.st_dev, jail_root.st_ino)
    assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{netns}").st_ino
    assert os.stat(f"/proc/{pid}/ns/net").st_ino != os.stat("/proc/self/ns/net").st_ino
    for ns in ("mnt", "ipc"):
        assert os.stat(f"/proc/{pid}/ns/{ns}").st_ino != os.stat(f"/proc/self/ns/{ns}").st_ino

    # Only what was allowed is in the jail.
    inside = Path(f"/proc/{pid}/root")
    assert listing(inside) == sorted(["vmlinux", "initrd", "dev", "usr", "lib", "lib64", "run"])
    assert sorted(p.name for p in (inside / "dev").iterdir()) == ["kvm", "net", "null", "urandom"]
    assert [p.name for p in (inside / "dev/net").iterdir()] == ["tun"]
    assert sorted(p.name for p in (inside / "run").iterdir()) == ["console.log", "qmp.sock"]
    assert [p.name for p in (inside / "usr/bin").iterdir()] == ["qemu-system-x86_64"]
    kvm = os.stat(inside / "dev/kvm")
    assert stat.S_ISCHR(kvm.st_mode) and (kvm.st_uid, kvm.st_gid) == (uid, gid)
    assert os.readlink(inside / "lib64") == os.readlink("/lib64")
    # Every mount is nosuid; all but the root, /dev and /run are read-only, and /dev and
    # /run are noexec; there is no /proc or /sys.
    mounts = {
        fields[4]: fields[5].split(",")
        for fields in (line.split() for line in slurp(f"/proc/{pid}/mountinfo").splitlines())
    }
    for mount_point, options in mounts.items():
        assert "nosuid" in options, (mount_point, options)
        if mount_point == "/dev":
            assert "noexec" in options
        elif mount_point == "/run":
            assert "noexec" in options and "nodev" in options and "rw" in options
        elif mount_point != "/":
            assert "ro" in options and "nodev" in options, (mount_point, options)
    assert "/run" in mounts and "/dev" in mounts
    assert "/proc" not in mounts and "/sys" not in mounts
    # The kernel and initrd are bind-mounted read-only from the files the helper opened (no
    # hard link: the asset store accounts for every name its files have), and they are the
    # very files named in the spec.
    assert jailed.step("mount") is not None
    assert jailed.step("mount").detail["files"] == {"/vmlinux": "bind-ro", "/initrd": "bind-ro"}  # type: ignore[union-attr]
    for f in spec.files:
        placed = os.stat(inside / f.target.lstrip("/"))
        original = os.stat(f.source)
        assert (placed.st_dev, placed.st_ino) == (original.st_dev, original.st_ino)

    # The TAP is in the VM's namespace, owned by the jail user, up.
    tap = links(netns)["tap-jq"]
    info = tap["linkinfo"]["info_data"]  # type: ignore[index]
    assert info["type"] == "tap" and info["persist"] is True
    assert info["user"] in ("metald-vm", str(uid))
    assert "UP" in tap["flags"]  # type: ignore[operator]

    # cgroup: the VMM is in the VM's cgroup; limits where this host's cgroup v2 allows.
    assert jailed.cgroup_path is not None
    assert (jailed.cgroup_path / "cgroup.procs").read_text().split() == [str(pid)]
    if (jailed.cgroup_path / "memory.max").exists():
        assert int((jailed.cgroup_path / "memory.max").read_text()) == spec.cgroup.memory_max  # type: ignore[union-attr]
    else:
        assert jailed.cgroup_note and "memory" in jailed.cgroup_note
    limits = Path(f"/proc/{pid}/limits").read_text()
    assert re.search(r"^Max open files\s+4096\s+4096", limits, re.M)
    assert re.search(r"^Max core file size\s+0\s+0", limits, re.M)


@pytest.mark.guest
async def test_jailed_qemu_is_unprivileged_confined_and_boots(
    jail_ids: tuple[int, int],
    netns: str,
    jail_base: Path,
    cgroup_parent: str,
    boot_files: tuple[Path, Path | None],
    jails: Jails,
) -> None:
    spec = qemu_spec(
        jail_base, jail_ids, boot_files, netns=netns, tap="tap-jq", cgroup_parent=cgroup_parent
    )
    jailed = await jails.launch(spec)
    assert [s.step for s in jailed.steps] == list(STEPS[:-1])

    # QEMU makes its chardevs one after the other once it runs.
    await wait_until(
        lambda: (
            exists(jailed.host_path("/run/qmp.sock"))
            and exists(jailed.host_path("/run/console.log"))
        ),
        10,
    )
    check_qemu_confinement(spec, jailed, jail_ids, netns)

    # QMP over the socket in the jail, from the host; the guest boots.
    from qemu.qmp import QMPClient

    client = QMPClient("jailer-test")
    await client.connect(str(jailed.host_path("/run/qmp.sock")))
    try:
        assert (await client.execute("query-status"))["status"] == "prelaunch"  # type: ignore[index]
        await client.execute("cont")
        console = await wait_for_file(
            jailed.host_path("/run/console.log"),
            rf"^METALD-GUEST READY vm={spec.vm_id} ",
            BOOT_TIMEOUT,
        )
        assert "METALD-GUEST READY" in console
    finally:
        await client.disconnect()
    print(
        f"jailed QEMU: launch {jailed.launch_seconds * 1000:.1f} ms "
        f"(helper steps {jailed.helper_ms:.1f} ms: "
        + ", ".join(f"{s.step} {s.ms:.1f}" for s in jailed.steps)
        + ")"
    )

    await jails.stop(jailed)
    assert_no_leftovers(spec)


# -- the jail seen from inside --


async def test_jail_from_inside(
    jail_ids: tuple[int, int], netns: str, jail_base: Path, jails: Jails
) -> None:
    uid, gid = jail_ids
    disk = jail_base / "disk.img"
    disk.write_bytes(b"\0" * 4096)
    kernel = jail_base / "kernel"
    kernel.write_bytes(b"kernel")
    kernel.chmod(0o644)
    other_fs = Path(tempfile.mkdtemp(dir="/dev/shm"))  # tmpfs: not the jail's filesystem
    try:
        elsewhere = other_fs / "ro.img"
        elsewhere.write_bytes(b"elsewhere")
        elsewhere.chmod(0o644)
        bb = BUSYBOX
        script = f"""
{bb} id -u > /run/uid; {bb} id -g > /run/gid; {bb} id -G > /run/groups
{bb} ls -a / > /run/root
{bb} ls -a /usr/bin > /run/usrbin
{bb} ls /proc > /run/proc 2>&1 || echo none > /run/proc
{bb} ip -o link > /run/links 2>&1
echo changed >> /disk.img && echo ok > /run/write-disk
echo changed >> /kernel 2>/dev/null || echo denied > /run/write-kernel
echo changed >> /elsewhere 2>/dev/null || echo denied > /run/write-elsewhere
{bb} mknod /run/x c 1 3 2>/dev/null || echo denied > /run/mknod
{bb} touch /newfile 2>/dev/null || echo denied > /run/write-root
{bb} cat /elsewhere > /run/read-elsewhere
{bb} cp {bb} /run/bb && /run/bb true 2>/dev/null || echo denied > /run/exec-run
{bb} echo done > /run/done
"""
        spec = busybox_spec(
            jail_base,
            jail_ids,
            script=script,
            netns=netns,
            tap="tap-in",
            files=(
                PlacedFile(str(disk), "/disk.img", read_only=False),
                PlacedFile(str(kernel), "/kernel"),
                PlacedFile(str(elsewhere), "/elsewhere"),
            ),
        )
        jailed = await jails.launch(spec)
        run = spec.host_path("/run")
        await wait_for_file(run / "done", "done", 10)

        def read(name: str) -> str:
            return (run / name).read_text().strip()

        assert read("uid") == str(uid) and read("gid") == str(gid)
        assert read("groups") == str(gid)
        assert sorted(read("root").split()) == sorted(
            [".", "..", "dev", "disk.img", "elsewhere", "kernel", "run", "usr"]
        )
        assert read("usrbin").split() == [".", "..", "busybox"]
        assert read("proc") in ("none", "")  # no /proc in the jail
        names = re.findall(r"^\d+: ([^:@]+)", read("links"), re.M)
        assert sorted(names) == ["lo", "tap-in"]  # the VM's namespace, not the host's
        assert read("write-disk") == "ok"
        assert read("write-kernel") == "denied"
        assert read("write-elsewhere") == "denied"
        assert read("mknod") == "denied"
        assert read("write-root") == "denied"
        assert read("read-elsewhere") == "elsewhere"
        assert read("exec-run") == "denied"  # /run is writable, not executable
        assert disk.read_bytes().endswith(b"changed\n")
        assert (disk.stat().st_uid, disk.stat().st_gid) == (uid, gid)  # handed to the jail user
        assert kernel.read_bytes() == b"kernel"
        placed = jailed.step("mount").detail["files"]  # type: ignore[union-attr]
        assert placed == {"/disk.img": "link", "/kernel": "bind-ro", "/elsewhere": "bind-ro"}
        await jails.stop(jailed)
        assert_no_leftovers(spec)
        assert disk.exists() and kernel.exists() and elsewhere.exists()  # only links went
    finally:
        shutil.rmtree(other_fs)


async def test_a_file_the_jail_user_owns_is_bound_read_only_not_linked(
    jail_ids: tuple[int, int], jail_base: Path, jails: Jails
) -> None:
    uid, gid = jail_ids
    asset = jail_base / "owned.img"
    asset.write_bytes(b"asset")
    os.chown(asset, uid, gid)
    asset.chmod(0o444)  # not writable, but its owner could chmod it through a hard link
    spec = busybox_spec(
        jail_base,
        jail_ids,
        script=f"{BUSYBOX} chmod 666 /a 2>/dev/null || echo denied > /run/chmod",
        files=(PlacedFile(str(asset), "/a"),),
    )
    jailed = await jails.launch(spec)
    await wait_for_file(spec.host_path("/run/chmod"), "denied", 10)
    assert jailed.step("mount").detail["files"] == {"/a": "bind-ro"}  # type: ignore[union-attr]
    assert stat.S_IMODE(asset.stat().st_mode) == 0o444
    await jails.stop(jailed)
    assert_no_leftovers(spec)


async def test_a_dynamically_linked_vmm_without_netns(jail_base: Path, jails: Jails) -> None:
    """No netns, no TAP, no cgroup: the VMM still gets an empty network namespace of its
    own (only loopback), a PID namespace and the seccomp filter; libraries found by ldd."""
    uid, gid = ensure_jail_user()
    spec = JailSpec(
        vm_id="plain",
        uid=uid,
        gid=gid,
        backend="probe",
        jail_base=str(jail_base),
        host_paths=tuple(dynamic_binary_paths("sleep")),
        argv=("/usr/bin/sleep", "600"),
        rlimits=(Rlimit("NOFILE", 64, 128),),
    )
    jailed = await jails.launch(spec)
    assert [(s.step, s.status) for s in jailed.steps] == [
        ("netns", "ok"),
        ("tap", "skipped"),
        ("mount", "ok"),
        ("cgroup", "skipped"),
        ("rlimits", "ok"),
        ("privileges", "ok"),
        ("seccomp", "ok"),
    ]
    pid = jailed.pid
    assert jailed.step("netns").detail == {"netns": "private", "devices": ["lo"]}  # type: ignore[union-attr]
    assert os.stat(f"/proc/{pid}/ns/net").st_ino != os.stat("/proc/self/ns/net").st_ino
    assert os.stat(f"/proc/{pid}/ns/pid").st_ino != os.stat("/proc/self/ns/pid").st_ino
    assert status_fields(pid)["NSpid"].split()[-1] == "1"  # pid 1 of its namespace
    assert status_fields(pid)["Seccomp"] == "2"
    assert int(status_fields(pid)["PPid"]) == os.getpid()  # our child: we reap it
    assert re.search(r"^Max open files\s+64\s+128", slurp(f"/proc/{pid}/limits"), re.M)
    assert jailed.cgroup_path is None
    await jails.stop(jailed)
    assert_no_leftovers(spec)


async def test_the_namespaces_and_filter_can_be_turned_off(jail_base: Path, jails: Jails) -> None:
    """The helper then becomes the VMM itself, in metald's network and PID namespaces."""
    uid, gid = ensure_jail_user()
    spec = JailSpec(
        vm_id="plain",
        uid=uid,
        gid=gid,
        backend="probe",
        jail_base=str(jail_base),
        host_paths=tuple(dynamic_binary_paths("sleep")),
        argv=("/usr/bin/sleep", "600"),
        pid_namespace=False,
        private_network=False,
        deny_user_namespaces=False,
    )
    jailed = await jails.launch(spec)
    assert [(s.step, s.status) for s in jailed.steps if s.status == "ok"] == [
        ("mount", "ok"),
        ("rlimits", "ok"),
        ("privileges", "ok"),
    ]
    pid = jailed.pid
    for ns in ("net", "pid"):
        assert os.stat(f"/proc/{pid}/ns/{ns}").st_ino == os.stat(f"/proc/self/ns/{ns}").st_ino
    assert status_fields(pid)["Seccomp"] == "0"
    await jails.stop(jailed)
    assert_no_leftovers(spec)


# -- one VMM cannot reach another --

# Ids of no host user (jail ids come from a range no user or group holds).
TEST_IDS = (299_901, 299_902)


async def test_two_vmms_with_their_own_ids_and_pid_namespaces_cannot_reach_each_other(
    jail_base: Path, jails: Jails
) -> None:
    bb = BUSYBOX
    script = f"""
echo secret > /run/secret
{bb} unshare -U {bb} true 2>/run/userns || true
{bb} ls /proc > /run/proc 2>&1 || true
echo done > /run/done
"""
    a, b = (busybox_spec(jail_base, (i, i), script=script, host_paths=(bb,)) for i in TEST_IDS)
    ja, jb = await jails.launch(a), await jails.launch(b)
    for spec in (a, b):
        await wait_for_file(spec.host_path("/run/done"), "done", 10)
    for jailed, ids in ((ja, TEST_IDS[0]), (jb, TEST_IDS[1])):
        status = status_fields(jailed.pid)
        assert status["Uid"].split() == [str(ids)] * 4 and status["Gid"].split() == [str(ids)] * 4
        assert status["NSpid"].split()[-1] == "1"
        assert status["Seccomp"] == "2"
    ns = [os.stat(f"/proc/{j.pid}/ns/pid").st_ino for j in (ja, jb)]
    assert len({*ns, os.stat("/proc/self/ns/pid").st_ino}) == 3
    net = [os.stat(f"/proc/{j.pid}/ns/net").st_ino for j in (ja, jb)]
    assert len({*net, os.stat("/proc/self/ns/net").st_ino}) == 3
    # Inside: no user namespace can be made; no other process is visible (no /proc at all).
    assert "Operation not permitted" in slurp(a.host_path("/run/userns"))
    assert "No such file" in slurp(a.host_path("/run/proc"))
    # The files a VMM makes are its own, 0600 (umask 077) in its 0700 run directory.
    secret = b.host_path("/run/secret")
    assert (secret.stat().st_uid, stat.S_IMODE(secret.stat().st_mode)) == (TEST_IDS[1], 0o600)
    # Running as A's ids, B can be neither signalled, traced nor read...
    got = await asyncio.to_thread(attack, (TEST_IDS[0],) * 2, jb.pid, secret)
    denied = "Operation not permitted"
    assert got == {
        "uid": TEST_IDS[0],
        "signal": denied,
        "ptrace": denied,
        "file": "Permission denied",
        "environ": "Permission denied",
        "root": "Permission denied",
    }, got
    # ...while B's own ids can (the same attempts are not refused for some other reason).
    own = await asyncio.to_thread(attack, (TEST_IDS[1],) * 2, jb.pid, secret)
    assert own == {**{k: "ok" for k in got}, "uid": TEST_IDS[1]}, own
    await jails.stop(ja)
    await jails.stop(jb)
    assert_no_leftovers(a)
    assert_no_leftovers(b)


async def test_ending_pid_1_ends_every_process_of_the_vmm(jail_base: Path, jails: Jails) -> None:
    bb = BUSYBOX
    script = f"""
{bb} sleep 600 &
{bb} sh -c '{bb} sleep 600 & {bb} sleep 600' &
echo started > /run/started
"""
    spec = busybox_spec(jail_base, (TEST_IDS[0],) * 2, script=script)
    jailed = await jails.launch(spec)
    await wait_for_file(spec.host_path("/run/started"), "started", 10)
    await wait_until(lambda: len(pid_namespace_members(jailed.pid)) >= 4, 10)
    members = pid_namespace_members(jailed.pid)
    assert jailed.pid in members and os.getpid() not in members
    await jails.stop(jailed)  # SIGKILL to the VMM alone
    # Every other process of its namespace was killed by the kernel with it.
    await wait_until(lambda: all(identity_of(p) is None or is_zombie(p) for p in members), 10)
    assert_no_leftovers(spec)


def is_zombie(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    return False


async def test_rlimit_fsize_bounds_every_file_and_does_not_kill_the_vmm(
    jail_base: Path, jails: Jails
) -> None:
    """A write past RLIMIT_FSIZE fails (EFBIG) instead of killing the VMM: SIGXFSZ stays
    ignored, so a console flooded while metald is away stops growing and the VM lives on."""
    bb = BUSYBOX
    limit = 64 * 1024
    script = f"""
{bb} yes flood | {bb} head -c 200000 > /run/big 2>/run/big.err
echo alive > /run/alive
"""
    spec = busybox_spec(
        jail_base,
        (TEST_IDS[0],) * 2,
        script=script,
        rlimits=(Rlimit("FSIZE", limit, limit), Rlimit("CORE", 0, 0)),
    )
    jailed = await jails.launch(spec)
    await wait_for_file(spec.host_path("/run/alive"), "alive", 30)
    assert spec.host_path("/run/big").stat().st_size == limit
    assert "error" in slurp(spec.host_path("/run/big.err"))  # the write failed (EFBIG)
    sigign = int(status_fields(jailed.pid)["SigIgn"], 16)
    assert sigign & (1 << (25 - 1))  # SIGXFSZ (25) ignored in the VMM
    await jails.stop(jailed)
    assert_no_leftovers(spec)


# -- failures: every step, and realistic bad settings --


@pytest.mark.parametrize("step", STEPS)
async def test_each_step_made_to_fail_leaves_nothing(
    step: str,
    hooks: None,
    jail_ids: tuple[int, int],
    netns: str,
    jail_base: Path,
    cgroup_parent: str,
) -> None:
    disk = jail_base / "disk.img"
    disk.write_bytes(b"x")
    spec = busybox_spec(
        jail_base,
        jail_ids,
        script="true",
        netns=netns,
        tap="tap-f",
        cgroup_parent=cgroup_parent,
        files=(PlacedFile(str(disk), "/disk.img", read_only=False),),
        fail_at=step,
    )
    with pytest.raises(JailerError) as caught:
        await launch_jailed(spec, stderr_path=jail_base / "err")
    assert caught.value.step == step
    assert "test hook" in caught.value.reason
    assert caught.value.leftovers == ()
    assert isinstance(caught.value, BackendError)
    assert_no_leftovers(spec)
    assert disk.exists()


async def test_the_hook_is_ignored_without_the_environment_variable(
    jail_ids: tuple[int, int], jail_base: Path, jails: Jails
) -> None:
    assert os.environ.get(TEST_HOOKS_ENV) != "1"
    spec = busybox_spec(jail_base, jail_ids, script="true", fail_at="mount")
    jailed = await jails.launch(spec)
    await jails.stop(jailed)
    assert_no_leftovers(spec)


async def test_a_missing_netns(jail_ids: tuple[int, int], jail_base: Path) -> None:
    spec = busybox_spec(
        jail_base, jail_ids, script="true", netns=f"no-such-ns-{os.getpid()}", tap="tap-x"
    )
    with pytest.raises(JailerError) as caught:
        await launch_jailed(spec, stderr_path=jail_base / "err")
    assert caught.value.step == "netns"
    assert "does not exist" in caught.value.reason
    assert not exists(f"/run/netns/no-such-ns-{os.getpid()}")  # not created either
    assert_no_leftovers(spec)


async def test_a_stale_netns_name_is_refused_as_lost(
    jail_ids: tuple[int, int], jail_base: Path
) -> None:
    stale = Path(f"/run/netns/stale-ns-{os.getpid()}")  # a name whose mount was lost
    stale.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(stale, os.O_CREAT | os.O_WRONLY, 0o600))
    try:
        spec = busybox_spec(jail_base, jail_ids, script="true", netns=stale.name, tap="tap-x")
        with pytest.raises(JailerError) as caught:
            await launch_jailed(spec, stderr_path=jail_base / "err")
        assert caught.value.step == "netns"
        assert "stale" in caught.value.reason
        assert not spec.jail_dir.exists()  # nothing made (a stale name has no links to check)
    finally:
        os.unlink(stale)


async def test_a_tap_name_in_use_is_refused_and_kept(
    jail_ids: tuple[int, int], netns: str, jail_base: Path
) -> None:
    sh("ip", "-n", netns, "tuntap", "add", "dev", "taken0", "mode", "tap")  # a stale TAP
    spec = busybox_spec(jail_base, jail_ids, script="true", netns=netns, tap="taken0")
    with pytest.raises(JailerError) as caught:
        await launch_jailed(spec, stderr_path=jail_base / "err")
    assert caught.value.step == "tap"
    assert "already exists" in caught.value.reason
    assert "taken0" in links(netns)  # someone else's device: left alone
    assert not spec.jail_dir.exists()


async def test_a_missing_file_to_place(
    jail_ids: tuple[int, int], netns: str, jail_base: Path, cgroup_parent: str
) -> None:
    spec = busybox_spec(
        jail_base,
        jail_ids,
        script="true",
        netns=netns,
        tap="tap-m",
        cgroup_parent=cgroup_parent,
        files=(PlacedFile(str(jail_base / "no-such-kernel"), "/vmlinux"),),
    )
    with pytest.raises(JailerError) as caught:
        await launch_jailed(spec, stderr_path=jail_base / "err")
    assert caught.value.step == "mount"
    assert "no-such-kernel" in caught.value.reason
    assert_no_leftovers(spec)  # the TAP made before is gone too


@pytest.mark.parametrize("where", ["last", "directory"])
async def test_a_file_to_place_through_a_symlink_is_refused(
    jail_ids: tuple[int, int], jail_base: Path, where: str
) -> None:
    """The helper opens what it places with no symlink on the path: a symlink in the spec's
    source, at its end or higher up, fails the mount step (nothing is followed)."""
    real = jail_base / "real"
    real.mkdir()
    (real / "kernel").write_bytes(b"kernel")
    if where == "last":
        (real / "link").symlink_to("kernel")
        source = real / "link"
    else:
        (jail_base / "dir-link").symlink_to(real)
        source = jail_base / "dir-link" / "kernel"
    spec = busybox_spec(
        jail_base, jail_ids, script="true", files=(PlacedFile(str(source), "/vmlinux"),)
    )
    with pytest.raises(JailerError) as caught:
        await launch_jailed(spec, stderr_path=jail_base / "err")
    assert caught.value.step == "mount"
    assert "symbolic link" in caught.value.reason
    assert_no_leftovers(spec)


async def test_an_existing_jail_root_is_refused_and_kept(
    jail_ids: tuple[int, int], jail_base: Path
) -> None:
    spec = busybox_spec(jail_base, jail_ids, script="true")
    spec.jail_root.mkdir(parents=True)
    (spec.jail_root / "someone-elses").write_text("x")
    with pytest.raises(JailerError) as caught:
        await launch_jailed(spec, stderr_path=jail_base / "err")
    assert caught.value.step == "mount"
    assert "exists already" in caught.value.reason
    assert (spec.jail_root / "someone-elses").exists()
    assert our_children() == []


async def test_metald_may_keep_files_in_the_jail_directory(
    hooks: None, jail_ids: tuple[int, int], jail_base: Path, jails: Jails
) -> None:
    """stderr beside the root: a failed launch removes the root only, remove_jail all."""
    spec = busybox_spec(jail_base, jail_ids, script="echo to-stderr >&2", fail_at="privileges")
    spec.jail_dir.mkdir(parents=True)
    stderr = spec.jail_dir / "vmm.stderr"
    with pytest.raises(JailerError) as caught:
        await launch_jailed(spec, stderr_path=stderr)
    assert caught.value.step == "privileges"
    assert stderr.exists() and not spec.jail_root.exists()

    spec = busybox_spec(jail_base, jail_ids, script="echo to-stderr >&2", vm_id=spec.vm_id)
    jailed = await launch_jailed(spec, stderr_path=stderr)
    watch = ProcessWatch.open(jailed.identity)
    assert watch is not None
    try:
        await wait_for_file(stderr, "to-stderr", 10)
        await watch.kill_and_wait()
    finally:
        watch.close()
    await remove_jail(spec)
    assert_no_leftovers(spec)


async def test_a_required_cgroup_the_host_cannot_give(
    jail_ids: tuple[int, int], jail_base: Path, cgroup_parent: str
) -> None:
    limits = CgroupSpec.for_vm(
        memory_bytes=64 << 20, vcpu_count=1, parent=cgroup_parent, required=True
    )
    mount = cgroup_mount(limits)
    if mount is not None and "memory" in slurp(Path(mount, "cgroup.controllers")).split():
        pytest.skip("this host's cgroup v2 has the memory controller: the limits would apply")
    spec = busybox_spec(jail_base, jail_ids, script="true", cgroup=limits)
    with pytest.raises(JailerError) as caught:
        await launch_jailed(spec, stderr_path=jail_base / "err")
    assert caught.value.step == "cgroup"
    assert "memory" in caught.value.reason
    assert_no_leftovers(spec)


async def test_no_cgroup_v2_mount_skips_or_fails_as_asked(
    jail_ids: tuple[int, int], jail_base: Path, jails: Jails
) -> None:
    nowhere = CgroupSpec(mount=str(jail_base / "no-cgroup-here"), memory_max=1 << 30)
    spec = busybox_spec(jail_base, jail_ids, script="true", cgroup=nowhere)
    jailed = await jails.launch(spec)
    assert jailed.step("cgroup").status == "skipped"  # type: ignore[union-attr]
    assert jailed.cgroup_path is None and "cgroup v2 mount" in (jailed.cgroup_note or "")
    await jails.stop(jailed)

    required = CgroupSpec(mount=str(jail_base / "no-cgroup-here"), required=True)
    spec = busybox_spec(jail_base, jail_ids, script="true", cgroup=required)
    with pytest.raises(JailerError) as caught:
        await launch_jailed(spec, stderr_path=jail_base / "err")
    assert caught.value.step == "cgroup"
    assert_no_leftovers(spec)


async def test_an_rlimit_the_kernel_refuses(jail_ids: tuple[int, int], jail_base: Path) -> None:
    nr_open = int(slurp("/proc/sys/fs/nr_open"))
    spec = busybox_spec(
        jail_base, jail_ids, script="true", rlimits=(Rlimit("NOFILE", nr_open + 1, nr_open + 1),)
    )
    with pytest.raises(JailerError) as caught:
        await launch_jailed(spec, stderr_path=jail_base / "err")
    assert caught.value.step == "rlimits"
    assert_no_leftovers(spec)


async def test_a_vmm_missing_from_the_jail(jail_ids: tuple[int, int], jail_base: Path) -> None:
    spec = busybox_spec(jail_base, jail_ids, script="true", argv=("/usr/bin/qemu-nothing",))
    with pytest.raises(JailerError) as caught:
        await launch_jailed(spec, stderr_path=jail_base / "err")
    assert caught.value.step == "exec"
    assert "/usr/bin/qemu-nothing" in caught.value.reason
    assert_no_leftovers(spec)


@pytest.mark.parametrize("uid", [0, 2**32 - 1, -5])
async def test_ids_that_cannot_be_a_jail_user(
    uid: int, jail_ids: tuple[int, int], jail_base: Path
) -> None:
    spec = busybox_spec(jail_base, (uid, jail_ids[1]), script="true")
    with pytest.raises(JailerError) as caught:
        await launch_jailed(spec, stderr_path=jail_base / "err")
    assert caught.value.step == "spec"
    assert "uid" in caught.value.reason
    assert_no_leftovers(spec)


def test_the_helper_itself_refuses_a_bad_spec(jail_base: Path) -> None:
    """Run by hand (or by anything but launch_jailed) the helper checks the spec too."""
    bad = {"vm_id": "x", "uid": 0, "gid": 0, "argv": ["/bin/true"], "jail_base": str(jail_base)}
    read_end, write_end = os.pipe()
    try:
        result = subprocess.run(
            [
                *_python(),
                "-m",
                "metald.jailer",
                "--spec",
                "-",
                "--error-fd",
                str(write_end),
            ],
            input=json.dumps(bad).encode(),
            pass_fds=(write_end,),
            capture_output=True,
            check=False,
        )
        os.close(write_end)
        write_end = -1
        with os.fdopen(read_end, "rb") as f:
            read_end = -1
            report = json.loads(f.readline())
    finally:
        for fd in (read_end, write_end):
            if fd >= 0:
                os.close(fd)
    assert result.returncode == EXIT_CODES["spec"]
    assert report["step"] == "spec" and report["status"] == "error"
    assert "uid" in report["error"]
    assert not (jail_base / "qemu").exists()


def _python() -> list[str]:
    import sys

    return [sys.executable, "-I"]


# -- the helper process itself misbehaving --


def _fake_python(path: Path, body: str) -> str:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return str(path)


async def test_a_helper_that_dies_without_a_word(
    jail_ids: tuple[int, int], jail_base: Path
) -> None:
    spec = busybox_spec(jail_base, jail_ids, script="true")
    fake = _fake_python(jail_base / "py", "echo 'cannot import metald' >&2; exit 3")
    with pytest.raises(JailerError) as caught:
        await launch_jailed(spec, stderr_path=jail_base / "err", python=fake)
    assert caught.value.step == "start"
    assert "exit status 3" in caught.value.reason
    assert "cannot import metald" in caught.value.reason
    assert our_children() == []


async def test_a_helper_that_hangs_is_killed(jail_ids: tuple[int, int], jail_base: Path) -> None:
    spec = busybox_spec(jail_base, jail_ids, script="true")
    fake = _fake_python(jail_base / "py", "exec sleep 600")
    with pytest.raises(JailerError) as caught:
        await launch_jailed(spec, stderr_path=jail_base / "err", python=fake, timeout=0.5)
    assert caught.value.step == "start"
    assert "no answer" in caught.value.reason
    assert our_children() == []


async def test_a_cancelled_launch_kills_the_helper(
    jail_ids: tuple[int, int], jail_base: Path
) -> None:
    spec = busybox_spec(jail_base, jail_ids, script="true")
    fake = _fake_python(jail_base / "py", "exec sleep 600")
    task = asyncio.create_task(
        launch_jailed(spec, stderr_path=jail_base / "err", python=fake, timeout=60)
    )
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert our_children() == []


async def test_remove_jail_is_idempotent_and_reports_a_busy_cgroup(
    jail_ids: tuple[int, int], jail_base: Path, cgroup_parent: str, jails: Jails
) -> None:
    spec = busybox_spec(jail_base, jail_ids, script="true", cgroup_parent=cgroup_parent)
    await remove_jail(spec)  # nothing there yet: fine
    jailed = await jails.launch(spec)
    assert jailed.cgroup_path is not None
    with pytest.raises(JailerError) as caught:
        await remove_jail(spec)  # the VMM still runs in its cgroup
    assert caught.value.step == "cleanup"
    assert any("cgroup" in item for item in caught.value.leftovers)
    await jails.stop(jailed)
    await remove_jail(spec)
    assert_no_leftovers(spec)


def test_devices_are_only_under_dev() -> None:
    spec = JailSpec(vm_id="d", uid=1000, gid=1000, argv=("/x",), devices=(DeviceNode("/etc/x"),))
    with pytest.raises(ValueError, match="not under /dev"):
        spec.validate()


# -- spare helpers (jailer/spares.py): started ahead of need, the same jail --


def sched_policy(pid: int) -> int:
    return os.sched_getscheduler(pid)


async def test_a_spare_becomes_the_vmm_with_the_same_jail_and_is_replaced(
    jail_ids: tuple[int, int],
    netns: str,
    jail_base: Path,
    cgroup_parent: str,
    jails: Jails,
    spares: Spares,
) -> None:
    spares.count = 1
    spares.fill()
    (spare,) = spares.pids
    assert sched_policy(spare) == os.SCHED_IDLE  # its start-up takes no one's CPU
    spec = busybox_spec(
        jail_base, jail_ids, script="true", netns=netns, tap="tap-s",
        cgroup_parent=cgroup_parent, pid_namespace=False,
    )  # fmt: skip
    jailed = await jails.launch(spec, spares)
    # Without a PID namespace the helper becomes the VMM: the very spare.
    assert jailed.pid == spare
    assert [s.step for s in jailed.steps] == list(STEPS[:-1])
    status = status_fields(jailed.pid)
    assert status["Uid"].split() == [str(jail_ids[0])] * 4
    assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"
    assert int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0
    assert sched_policy(jailed.pid) == os.SCHED_OTHER  # raised when taken
    # Nothing of the job's socket: stdin and stdout are /dev/null, stderr the file.
    fds = {int(n): os.readlink(f"/proc/{spare}/fd/{n}") for n in fd_names(spare)}
    assert fds == {0: "/dev/null", 1: "/dev/null", 2: f"{jail_base}/{spec.vm_id}.err"}, fds
    assert os.stat(f"/proc/{spare}/ns/net").st_ino == os.stat(f"/run/netns/{netns}").st_ino
    assert jailed.cgroup_path is not None
    assert (jailed.cgroup_path / "cgroup.procs").read_text().split() == [str(spare)]
    assert tap_owner(netns, "tap-s") in ("metald-vm", str(jail_ids[0]))
    # A new spare for the next VM once asked for (the runtime asks once the VMM started).
    assert spares.pids == []
    spares.fill()
    assert len(spares.pids) == 1 and spares.pids != [spare]
    await jails.stop(jailed)
    spares.close()
    assert_no_leftovers(spec)


def fd_names(pid: int) -> list[str]:
    return os.listdir(f"/proc/{pid}/fd")


def tap_owner(netns: str, name: str) -> object:
    return links(netns)[name]["linkinfo"]["info_data"]["user"]  # type: ignore[index]


@pytest.fixture
def spares() -> Iterator[Spares]:
    """Spare helpers made with this test's environment (after `hooks`, if it is asked
    for first); every one ended at teardown."""
    made = Spares(2)
    try:
        yield made
    finally:
        made.close()


async def test_a_spare_forks_the_vmm_as_our_child_in_its_pid_namespace(
    jail_ids: tuple[int, int], jail_base: Path, jails: Jails, spares: Spares
) -> None:
    spares.fill()
    waiting = set(spares.pids)
    spec = busybox_spec(jail_base, jail_ids, script="true")
    jailed = await jails.launch(spec, spares)
    status = status_fields(jailed.pid)
    assert int(status["PPid"]) == os.getpid()  # our child: we reap it
    assert status["NSpid"].split()[-1] == "1"
    assert jailed.pid not in waiting  # the helper forked it and exited (reaped)
    assert len(waiting - set(spares.pids)) == 1  # one spare was used
    assert len(spares.pids) == 1
    await jails.stop(jailed)
    spares.close()
    assert_no_leftovers(spec)


@pytest.mark.parametrize("step", ["netns", "mount", "cgroup", "exec"])
async def test_a_spare_failing_at_a_step_leaves_nothing(
    step: str,
    hooks: None,
    spares: Spares,
    jail_ids: tuple[int, int],
    netns: str,
    jail_base: Path,
    cgroup_parent: str,
) -> None:
    spares.fill()  # made with the hooks in its environment
    spec = busybox_spec(
        jail_base, jail_ids, script="true", netns=netns, tap="tap-f",
        cgroup_parent=cgroup_parent, fail_at=step,
    )  # fmt: skip
    with pytest.raises(JailerError) as caught:
        await launch_jailed(spec, stderr_path=jail_base / "err", spares=spares)
    assert caught.value.step == step and "test hook" in caught.value.reason
    assert caught.value.leftovers == ()
    spares.close()
    assert_no_leftovers(spec)


async def test_a_dead_spare_is_passed_over_and_closing_ends_every_spare(
    jail_ids: tuple[int, int],
    jail_base: Path,
    jails: Jails,
    spares: Spares,
    caplog: pytest.LogCaptureFixture,
) -> None:
    spares.count = 1
    spares.fill()
    (dead,) = spares.pids
    os.kill(dead, signal.SIGKILL)
    await wait_until(lambda: is_zombie(dead), 10)
    spec = busybox_spec(jail_base, jail_ids, script="true")
    jailed = await jails.launch(spec, spares)
    await jails.stop(jailed)
    assert "ended while waiting" in caplog.text
    assert identity_of(dead) is None  # reaped
    spares.close()
    assert spares.pids == [] and our_children() == []
    spares.fill()  # a closed pool starts nothing
    assert spares.pids == []
    assert_no_leftovers(spec)


async def test_a_cancelled_launch_with_a_spare_leaves_nothing(
    jail_ids: tuple[int, int], jail_base: Path, spares: Spares
) -> None:
    spares.fill()
    spec = busybox_spec(jail_base, jail_ids, script="true", argv=(BUSYBOX, "sleep", "600"))
    task = asyncio.create_task(launch_jailed(spec, stderr_path=jail_base / "err", spares=spares))
    await asyncio.sleep(0)  # the job is handed over; the helper is at work
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    spares.close()
    assert_no_leftovers(spec)

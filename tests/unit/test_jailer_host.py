"""Jailer pieces that need no root: mountinfo and ldd parsing, firmware discovery, the helper's
report protocol as metald reads it, and the cgroup step against a cgroup-like tree (this
machine's cgroup v2 has no memory/cpu/pids controllers, so writing limits is exercised on
plain files laid out as cgroupfs would lay them out)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from metald.backends.qemu.host_paths import firmware_dirs
from metald.host.mounts import mounts_under, parse_mountinfo
from metald.jailer import CgroupSpec, JailSpec
from metald.jailer.cgroups import cgroup_dir, find_cgroup2_mount, relative_cgroup
from metald.jailer.helper import EXIT_CODES, Jail, Reporter, StepFailed
from metald.jailer.host import parse_ldd, vmm_devices
from metald.jailer.launch import _Reports
from metald.jailer.spec import ALL_STEPS, STEPS

HYBRID = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
30 23 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 30 0:38 / /sys/fs/cgroup/unified rw,relatime master:3 - cgroup2 cgroup2 rw
50 27 254:0 /srv/a\\040b /mnt/with\\040space rw - ext4 /dev/vda rw
"""
UNIFIED = "35 24 0:30 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate\n"
NESTED_ONLY = "35 24 0:30 /system.slice /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"


def test_mountinfo() -> None:
    entries = parse_mountinfo(HYBRID)
    assert [e.mount_point for e in entries][-1] == "/mnt/with space"
    assert entries[-1].root == "/srv/a b"
    assert find_cgroup2_mount(entries) == "/sys/fs/cgroup/unified"
    assert find_cgroup2_mount(parse_mountinfo(UNIFIED)) == "/sys/fs/cgroup"
    assert find_cgroup2_mount(parse_mountinfo(NESTED_ONLY)) is None
    assert find_cgroup2_mount(parse_mountinfo("garbage\n")) is None
    assert mounts_under(Path("/sys/fs/cgroup"), entries) == [
        "/sys/fs/cgroup",
        "/sys/fs/cgroup/memory",
        "/sys/fs/cgroup/unified",
    ]
    assert mounts_under(Path("/sys/fs/cgroup/mem"), entries) == []


def test_cgroup_paths() -> None:
    cg = CgroupSpec(parent="/a/b/", mount="/cg")
    assert relative_cgroup(cg, "vm1") == "a/b/vm1"
    assert cgroup_dir(cg, "vm1") == Path("/cg/a/b/vm1")


def test_ldd_output() -> None:
    output = """\
\tlinux-vdso.so.1 (0x00007ffd)
\tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x00007f00)
\tlibfoo.so => not found
\t/lib64/ld-linux-x86-64.so.2 (0x00007f01)
"""
    assert parse_ldd(output) == (
        ["/lib/x86_64-linux-gnu/libz.so.1"],
        ["/lib64/ld-linux-x86-64.so.2"],
    )


def test_firmware_dirs_follow_symlinks_out(tmp_path: Path) -> None:
    data = tmp_path / "qemu"
    (tmp_path / "seabios").mkdir()
    (tmp_path / "seabios" / "bios.bin").write_bytes(b"x")
    data.mkdir()
    (data / "bios.bin").symlink_to("../seabios/bios.bin")
    (data / "local.bin").symlink_to("qboot.rom")
    (data / "qboot.rom").write_bytes(b"y")
    (data / "dangling.fd").symlink_to("../ovmf/OVMF.fd")
    assert firmware_dirs(str(data)) == sorted([str(data), str(tmp_path / "seabios")])
    assert firmware_dirs(str(tmp_path / "none")) == []


def test_devices() -> None:
    assert [d.path for d in vmm_devices(kvm=False, tap=False)] == ["/dev/null", "/dev/urandom"]
    assert [d.path for d in vmm_devices(kvm=True, tap=True)][-2:] == ["/dev/kvm", "/dev/net/tun"]


def test_exit_codes_are_distinct() -> None:
    assert sorted(EXIT_CODES) == sorted(ALL_STEPS)
    assert len(set(EXIT_CODES.values())) == len(EXIT_CODES)


# -- the report protocol --


def test_reports_success() -> None:
    r = _Reports()
    r.feed(b'{"step":"netns","status":"skipped","ms":0.1,"detail":{}}\n{"created":{"kind":')
    r.feed(b'"tap","netns":"/run/netns/x","name":"t"}}\n')
    r.feed(b'{"step":"tap","status":"ok","ms":1.5,"detail":{"tap":"t"}}\n')
    r.feed(b'{"step":"exec","status":"starting","ms":20.5}\n')
    assert r.error is None and r.exec_started and r.helper_ms == 20.5
    assert [(s.step, s.status) for s in r.steps] == [("netns", "skipped"), ("tap", "ok")]
    assert r.created == [{"kind": "tap", "netns": "/run/netns/x", "name": "t"}]


def test_reports_failure_and_silence() -> None:
    r = _Reports()
    assert r.next_step() == "start"
    r.feed(b'{"step":"netns","status":"ok","ms":0.1,"detail":{}}\n')
    assert r.next_step() == "tap"
    r.feed(b'{"step":"tap","status":"error","error":"boom"}\n')
    assert r.error == ("tap", "boom")
    for name in STEPS[:-1]:
        done = _Reports()
        done.feed(f'{{"step":"{name}","status":"ok","ms":0}}\n'.encode())
        assert done.next_step() == STEPS[STEPS.index(name) + 1]
    garbled = _Reports()
    garbled.feed(b"Traceback (most recent call last):\n")
    assert garbled.error is not None and garbled.error[0] == "start"


# -- the cgroup step on a cgroupfs-shaped tree --


def _cgroup_tree(root: Path, *, controllers: str, vm: str | None) -> None:
    root.mkdir()
    (root / "cgroup.controllers").write_text(controllers + "\n")
    (root / "cgroup.subtree_control").write_text("")
    parent = root / "metald"
    parent.mkdir()
    (parent / "cgroup.controllers").write_text(controllers + "\n")
    (parent / "cgroup.subtree_control").write_text("")
    if vm is not None:
        d = parent / vm
        d.mkdir()
        for name in ("cgroup.procs", "memory.max", "cpu.max", "pids.max"):
            (d / name).write_text("")


def _jail(cg: CgroupSpec, pid_namespace: bool = False) -> Jail:
    spec = JailSpec(
        vm_id="vm1", uid=999, gid=995, argv=("/vmm",), cgroup=cg, pid_namespace=pid_namespace
    )
    jail = Jail(spec, Reporter(None))
    jail.prepare()
    return jail


def test_cgroup_step_writes_the_limits(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    _cgroup_tree(root, controllers="cpu memory pids", vm="vm1")
    cg = CgroupSpec.for_vm(memory_bytes=256 << 20, vcpu_count=2, memory_allowance=0)
    jail = _jail(CgroupSpec(**{**cg.__dict__, "mount": str(root)}))
    detail = jail.step_cgroup()
    assert detail is not None
    assert detail["path"] == f"{root}/metald/vm1"
    assert "limits_skipped" not in detail
    vm = root / "metald" / "vm1"
    assert (vm / "memory.max").read_text() == str(256 << 20)
    assert (vm / "cpu.max").read_text() == "200000 100000"
    assert (vm / "pids.max").read_text() == "512"
    assert (vm / "cgroup.procs").read_text() == str(os.getpid())
    # Controllers were enabled on the way down (the last write wins in a plain file).
    assert (root / "cgroup.subtree_control").read_text() == "+pids"


def test_with_a_pid_namespace_the_cgroup_is_kept_open_for_the_vmm_fork(tmp_path: Path) -> None:
    """The helper does not move itself: the VMM's process is born in the cgroup (fork_vmm,
    with the directory's fd; tests/integration/test_jailer.py checks the real fork)."""
    root = tmp_path / "cg"
    _cgroup_tree(root, controllers="cpu memory pids", vm="vm1")
    cg = CgroupSpec.for_vm(memory_bytes=256 << 20, vcpu_count=2, memory_allowance=0)
    jail = _jail(CgroupSpec(**{**cg.__dict__, "mount": str(root)}), pid_namespace=True)
    detail = jail.step_cgroup()
    assert detail is not None and detail["joined"] == "at the VMM's fork"
    vm = root / "metald" / "vm1"
    assert (vm / "memory.max").read_text() == str(256 << 20)
    assert not (vm / "cgroup.procs").read_text()  # nobody moved in
    assert jail.vm_cgroup == "metald/vm1" and jail.vm_cgroup_fd is not None
    assert os.path.samefile(f"/proc/self/fd/{jail.vm_cgroup_fd}", vm)
    os.close(jail.vm_cgroup_fd)


def test_cgroup_step_skips_limits_the_host_lacks(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    _cgroup_tree(root, controllers="hugetlb", vm="vm1")
    cg = CgroupSpec(memory_max=1 << 30, mount=str(root))
    detail = _jail(cg).step_cgroup()
    assert detail is not None
    assert detail["applied"] == {}
    assert (
        "memory: not available in cgroup v2 at / (available there: hugetlb)"
        in (detail["limits_skipped"])
    )
    again = tmp_path / "cg2"
    _cgroup_tree(again, controllers="hugetlb", vm="vm1")
    with pytest.raises(StepFailed, match="memory"):
        _jail(CgroupSpec(memory_max=1 << 30, mount=str(again), required=True)).step_cgroup()


def test_cgroup_step_without_cgroup_v2(tmp_path: Path) -> None:
    cg = CgroupSpec(memory_max=1 << 30, mount=str(tmp_path / "none"))
    detail = _jail(cg).step_cgroup()
    assert detail is not None and "cannot open the cgroup v2 mount" in detail["skipped"]
    with pytest.raises(StepFailed, match="cgroup v2 mount"):
        _jail(CgroupSpec(mount=str(tmp_path / "none"), required=True)).step_cgroup()


def test_cgroup_step_refuses_a_busy_cgroup(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    _cgroup_tree(root, controllers="memory", vm="vm1")
    (root / "metald" / "vm1" / "cgroup.procs").write_text("4242\n")
    with pytest.raises(StepFailed, match="has processes"):
        _jail(CgroupSpec(memory_max=1 << 30, mount=str(root))).step_cgroup()

"""The QEMU command line, /proc parsing and the backends' jail helpers: nothing started."""

from __future__ import annotations

import dataclasses
import os
import socket
from pathlib import Path

import pytest

from metald.backends.qemu.command import build_argv, check_nic, escape_option, memory_mib
from metald.backends.vmm.cmdline import (
    MAX_KERNEL_CMDLINE,
    GuestBoot,
    kernel_cmdline_and_dropped,
)
from metald.backends.vmm.driver import LaunchContext
from metald.backends.vmm.jail import JailSettings, load_jail_spec, save_jail_spec
from metald.backends.vmm.layout import (
    VmLayout,
    check_socket_path,
    check_vm_id,
    jailed_drives,
    max_vm_id_length,
    plan_drives,
    vmm_files,
)
from metald.backends.vmm.records import load_spec, save_spec
from metald.core.errors import BackendError
from metald.core.models import LaunchSpec, NicSpec, RateLimit, ResolvedDisk
from metald.host.process import ExitStatus, parse_stat
from metald.host.sockets import UnsafeSocket, open_socket_path
from metald.jailer import JailSpec

LAYOUT = VmLayout(Path("/srv/vms/vm-1"))
NIC = NicSpec(
    netns="vm-1-ns",
    tap="tap-vm1",
    mac="02:00:0A:7B:00:02",
    guest_args="metald.ip4=10.123.0.2/24 metald.gw4=10.123.0.1",
)


def spec(**overrides: object) -> LaunchSpec:
    values: dict[str, object] = {
        "vm_id": "vm-1",
        "vcpu_count": 2,
        "memory_bytes": 512 * 1024 * 1024,
        "kernel": Path("/assets/vmlinux"),
        "initrd": Path("/assets/initrd.gz"),
        "kernel_args": "foo=10.0.0.2/24",
        "disks": (),
    }
    values.update(overrides)
    return LaunchSpec(**values)  # type: ignore[arg-type]


def launch_for(
    s: LaunchSpec,
    *,
    jailed: bool = False,
    accelerator: str = "tcg",
    tsc_khz: int | None = None,
    layout: VmLayout = LAYOUT,
) -> LaunchContext:
    files = vmm_files(s, layout, "qmp.sock", jailed=jailed)
    boot = GuestBoot(accelerator=accelerator, tsc_khz=tsc_khz)
    return LaunchContext(s, files, layout.dir, 0, 0, kernel_cmdline_and_dropped(s, boot)[0])


def argv_for(s: LaunchSpec, accelerator: str = "tcg", tsc_khz: int | None = None) -> list[str]:
    launch = launch_for(s, accelerator=accelerator, tsc_khz=tsc_khz)
    return build_argv(launch, accelerator=accelerator)


def jailed_argv_for(s: LaunchSpec) -> list[str]:
    launch = launch_for(s, jailed=True)
    return build_argv(launch, accelerator="tcg", binary="/usr/bin/qemu-system-x86_64")


def cmdline(s: LaunchSpec, **boot: object) -> str:
    return kernel_cmdline_and_dropped(s, GuestBoot(**boot))[0]  # type: ignore[arg-type]


def cmdline_and_dropped(s: LaunchSpec, **boot: object) -> tuple[str, list[str]]:
    return kernel_cmdline_and_dropped(s, GuestBoot(**boot))  # type: ignore[arg-type]


def option(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_the_machine_and_its_stopped_vcpus() -> None:
    argv = argv_for(spec())
    assert argv[0] == "qemu-system-x86_64"
    assert option(argv, "-M") == ["microvm,x-option-roms=off,rtc=off"]
    assert option(argv, "-accel") == ["tcg"]
    assert option(argv, "-cpu") == ["max"]
    assert option(argv, "-m") == ["512"]
    assert option(argv, "-smp") == ["2"]
    assert option(argv, "-device")[0] == "i8042"  # Ctrl-Alt-Del reaches the guest
    for flag in ("-S", "-nodefaults", "-no-user-config", "-nographic"):
        assert flag in argv
    assert option(argv, "-display") == ["none"]
    # QEMU's seccomp sandbox, with every optional class of system calls denied.
    assert option(argv, "-sandbox") == [
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
    ]
    assert "-no-reboot" not in argv  # system_reset must reboot in place
    assert option(argv, "-kernel") == ["/assets/vmlinux"]
    assert option(argv, "-initrd") == ["/assets/initrd.gz"]


def test_kvm_uses_the_host_cpu() -> None:
    argv = argv_for(spec(), accelerator="kvm", tsc_khz=2_500_000)
    assert option(argv, "-accel") == ["kvm"]
    assert option(argv, "-cpu") == ["host"]
    assert "tsc_early_khz" not in option(argv, "-append")[0]


def test_qmp_and_console_live_in_the_vm_directory() -> None:
    argv = argv_for(spec())
    chardevs = option(argv, "-chardev")
    assert "socket,id=qmp,path=/srv/vms/vm-1/run/qmp.sock,server=on,wait=off" in chardevs
    assert "file,id=con0,path=/srv/vms/vm-1/console.log,append=on" in chardevs
    assert option(argv, "-mon") == ["chardev=qmp,mode=control"]
    assert option(argv, "-serial") == ["chardev:con0"]


def test_no_initrd() -> None:
    assert "-initrd" not in argv_for(spec(initrd=None))


def test_kernel_command_line() -> None:
    (append,) = option(argv_for(spec()), "-append")
    assert append == (
        "console=ttyS0 panic=-1 quiet sysctl.kernel.ctrl-alt-del=0 reboot=t metald.vm_id=vm-1 "
        "foo=10.0.0.2/24"
    )
    with_tsc = cmdline(spec(kernel_args=""), accelerator="tcg", tsc_khz=2596138)
    assert with_tsc.endswith("tsc_early_khz=2596138 tsc=reliable metald.vm_id=vm-1")
    assert "tsc" not in cmdline(spec(), accelerator="tcg", tsc_khz=None)
    # Firecracker's guests: reboot=k, and the init reboots (Firecracker exits) at the end.
    fc = cmdline(spec(kernel_args=""), reboot="k", on_shutdown="reboot", accelerator="kvm")
    assert fc == (
        "console=ttyS0 panic=-1 quiet sysctl.kernel.ctrl-alt-del=0 reboot=k metald.vm_id=vm-1 "
        "metald.on_shutdown=reboot"
    )


def test_kernel_command_line_stays_within_the_kernels_limit() -> None:
    # A line of 2048 bytes or more kills a microvm guest before its first console line.
    long_args = "quiet a=1 " + "x" * 2048 + " b=2"
    line, dropped = cmdline_and_dropped(spec(kernel_args=long_args), tsc_khz=2596138)
    assert len(line.encode()) <= MAX_KERNEL_CMDLINE == 2047
    assert line.endswith("metald.vm_id=vm-1 quiet a=1")  # metald's own arguments always stay
    assert dropped == ["x" * 2048, "b=2"]  # whole words, and nothing after a dropped one
    fill = "y" * (MAX_KERNEL_CMDLINE - len(cmdline(spec(kernel_args=""))) - 1)
    exact, dropped = cmdline_and_dropped(spec(kernel_args=fill))
    assert len(exact) == MAX_KERNEL_CMDLINE and dropped == []
    _, dropped = cmdline_and_dropped(spec(kernel_args=fill + "y"))
    assert dropped == [fill + "y"]


def test_writable_disks_are_copied_read_only_ones_shared() -> None:
    disks = (
        ResolvedDisk("data", Path("/assets/data.img"), read_only=False, is_root_device=False),
        ResolvedDisk("root", Path("/assets/root,1.img"), read_only=True, is_root_device=True),
    )
    s = spec(disks=disks)
    drives = plan_drives(s, LAYOUT)
    # The root device comes first: it is /dev/vda in the guest.
    assert [d.node_id for d in drives] == ["disk0", "disk1"]
    assert drives[0].source == Path("/assets/root,1.img") and drives[0].read_only
    assert [d.drive_id for d in drives] == ["root", "data"]
    assert drives[0].path == Path("/assets/root,1.img")
    assert drives[1].path == LAYOUT.dir / "disk1.img" and not drives[1].read_only
    argv = argv_for(s)
    assert option(argv, "-drive") == [
        "id=disk0,file=/assets/root,,1.img,format=raw,if=none,readonly=on",
        "id=disk1,file=/srv/vms/vm-1/disk1.img,format=raw,if=none,readonly=off,discard=unmap",
    ]
    assert option(argv, "-device")[1:] == [
        "virtio-blk-device,drive=disk0",
        "virtio-blk-device,drive=disk1",
    ]


def test_memory_rounds_up_to_whole_mib() -> None:
    assert memory_mib(256 * 1024 * 1024) == 256
    assert memory_mib(256 * 1024 * 1024 + 1) == 257
    with pytest.raises(ValueError):
        memory_mib(0)


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="accelerator"):
        argv_for(spec(), accelerator="hvf")
    with pytest.raises(ValueError, match="vcpu"):
        argv_for(spec(vcpu_count=0))
    for bad in ("", ".", "..", "../x", ".hidden", "a/b", "a b", "x" * 65, "a,b", "a\nb", "A_b.c"):
        with pytest.raises(ValueError):
            check_vm_id(bad)
    for good in ("vm-0123456789abcdef", "-x", "x" * 64):
        check_vm_id(good)


def test_socket_path_limit() -> None:
    check_socket_path(Path("/" + "x" * 106))
    with pytest.raises(ValueError, match="Unix socket"):
        check_socket_path(Path("/" + "x" * 107))
    deep = VmLayout(Path("/" + "d" * 100) / "vm-1")
    with pytest.raises(ValueError, match="shorter data directory"):
        check_socket_path(launch_for(spec(), layout=deep).files.control_socket)


def test_longest_vm_id_that_fits() -> None:
    assert max_vm_id_length(Path("/opt/metald/data/vms"), "/qmp.sock") == 64
    # 107 = len(root) + 1 + id + len("/qmp.sock")
    assert max_vm_id_length(Path("/" + "r" * 59), "/qmp.sock") == 107 - 60 - 1 - 9
    assert max_vm_id_length(Path("/" + "r" * 200), "/qmp.sock") == 0
    # Jailed: <base>/qemu/<id>/root/run/qmp.sock
    jailed = "/root/run/qmp.sock"
    assert max_vm_id_length(Path("/srv/jailer/qemu"), jailed) == 64
    base = Path("/" + "j" * 49)
    assert max_vm_id_length(base, jailed) == 107 - 50 - 1 - len(jailed)
    socket = f"{base}/{'v' * max_vm_id_length(base, jailed)}{jailed}"
    assert len(socket) == 107


def test_escape_option() -> None:
    assert escape_option("a,b,,c") == "a,,b,,,,c"


def test_spec_round_trips_through_json(tmp_path: Path) -> None:
    layout = VmLayout(tmp_path)

    def round_trip(s: LaunchSpec) -> LaunchSpec:
        save_spec(layout, s)
        return load_spec(layout)

    s = spec(
        disks=(ResolvedDisk("d", Path("/assets/d.img"), read_only=True, is_root_device=False),)
    )
    assert round_trip(s) == s
    assert round_trip(spec(initrd=None)).initrd is None
    assert round_trip(spec(nic=NIC)) == spec(nic=NIC)
    assert round_trip(s).nic is None
    limited = dataclasses.replace(NIC, rx_rate_limit=RateLimit(1000, 100, 50))
    assert round_trip(spec(nic=limited)) == spec(nic=limited)


def test_a_jailed_qemu_sees_only_its_jail() -> None:
    disks = (
        ResolvedDisk("root", Path("/assets/root.img"), read_only=True, is_root_device=True),
        ResolvedDisk("data", Path("/assets/data.img"), read_only=False, is_root_device=False),
    )
    s = spec(disks=disks)
    argv = jailed_argv_for(s)
    assert argv[0] == "/usr/bin/qemu-system-x86_64"
    assert option(argv, "-kernel") == ["/vmlinux"]
    assert option(argv, "-initrd") == ["/initrd"]
    chardevs = option(argv, "-chardev")
    assert "socket,id=qmp,path=/run/qmp.sock,server=on,wait=off" in chardevs
    assert "file,id=con0,path=/run/console.log,append=on" in chardevs
    assert option(argv, "-drive") == [
        "id=disk0,file=/disk0.img,format=raw,if=none,readonly=on",
        "id=disk1,file=/disk1.img,format=raw,if=none,readonly=off,discard=unmap",
    ]
    # No host path anywhere on its command line.
    assert not any("/assets" in a or "/srv" in a for a in argv)
    assert "-initrd" not in jailed_argv_for(spec(initrd=None))
    # The host files to place stay the originals / the VM directory's copies.
    host = plan_drives(s, LAYOUT)
    assert [d.path for d in host] == [Path("/assets/root.img"), LAYOUT.dir / "disk1.img"]
    assert [d.path for d in jailed_drives(host)] == [Path("/disk0.img"), Path("/disk1.img")]


def test_a_nic_is_a_virtio_net_device_on_its_tap() -> None:
    for argv in (argv_for(spec(nic=NIC)), jailed_argv_for(spec(nic=NIC))):
        assert option(argv, "-netdev") == ["tap,id=net0,ifname=tap-vm1,script=no,downscript=no"]
        assert option(argv, "-device")[-1] == "virtio-net-device,netdev=net0,mac=02:00:0a:7b:00:02"
    assert "-netdev" not in argv_for(spec())


def test_the_nics_guest_arguments_come_between_metalds_and_the_callers() -> None:
    (append,) = option(argv_for(spec(nic=NIC, kernel_args="quiet foo=1")), "-append")
    assert append == (
        "console=ttyS0 panic=-1 quiet sysctl.kernel.ctrl-alt-del=0 reboot=t metald.vm_id=vm-1 "
        "metald.ip4=10.123.0.2/24 metald.gw4=10.123.0.1 quiet foo=1"
    )
    # They are metald's own: never dropped; the caller's arguments make way.
    fill = "y" * (MAX_KERNEL_CMDLINE - len(cmdline(spec(kernel_args=""))) - 1)
    line, dropped = cmdline_and_dropped(spec(nic=NIC, kernel_args=fill))
    assert NIC.guest_args in line and dropped == [fill]
    huge = NicSpec("ns", "tap0", "02:00:00:00:00:01", "metald.x=" + "z" * 2048)
    with pytest.raises(ValueError, match="metald's own kernel arguments"):
        cmdline_and_dropped(spec(nic=huge))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tap", ""),
        ("tap", "x" * 16),
        ("tap", "tap,x"),
        ("tap", "tap x"),
        ("tap", "tap/x"),
        ("mac", "02:00:00:00:00"),
        ("mac", "02-00-00-00-00-01"),
        ("mac", "01:00:5e:00:00:01"),  # multicast
        ("mac", "02:00:00:00:00:01,x=1"),
        ("guest_args", "metald.ip4='10.0.0.1'"),
        ("netns", ""),
        ("netns", "a/b"),
    ],
)
def test_bad_nics_are_refused(field: str, value: str) -> None:
    bad = dataclasses.replace(NIC, **{field: value})
    with pytest.raises(ValueError, match=f"nic.{field}"):
        check_nic(bad)
    with pytest.raises(ValueError, match=f"nic.{field}"):
        build_argv(launch_for(spec(nic=bad)), accelerator="tcg")
    check_nic(NIC)
    check_nic(dataclasses.replace(NIC, netns="/run/netns/vm-1-ns"))


def test_parse_stat_copes_with_odd_command_names() -> None:
    fields = ["S"] + [str(i) for i in range(4, 53)]  # field n holds the number n
    text = f"1234 (qemu) (x y)) {' '.join(fields)}\n"
    stat = parse_stat(text)
    assert stat.state == "S"
    assert (stat.utime_ticks, stat.stime_ticks, stat.start_time) == (14, 15, 22)


def test_exit_status_descriptions() -> None:
    assert ExitStatus(signal=9).describe() == "signal 9 (SIGKILL)"
    assert ExitStatus(exit_code=1).describe() == "exit status 1"
    assert ExitStatus().describe() == "exit status unknown"


# -- jail settings and the control socket check (metald.backends.vmm.jail) --


def test_jail_settings_refuse_what_cannot_be_a_jail() -> None:
    JailSettings(uid=999, gid=995)  # the defaults: /srv/jailer, cgroup parent "metald"
    for bad in (
        {"uid": 0, "gid": 995},
        {"uid": 999, "gid": 0},
        {"uid": 2**32 - 1, "gid": 995},
        {"uid": 999, "gid": 995, "chroot_base": Path("srv/jailer")},
        {"uid": 999, "gid": 995, "chroot_base": Path("/")},
        {"uid": 999, "gid": 995, "chroot_base": Path("/srv/../etc")},
        {"uid": 999, "gid": 995, "cgroup_parent": "../x"},
        {"uid": 999, "gid": 995, "cgroup_parent": "/"},
        {"uid": 999, "gid": 995, "pids_max": 0},
    ):
        with pytest.raises(ValueError):
            JailSettings(**bad)
    limits = JailSettings(uid=999, gid=995, vmm_memory_allowance=64 << 20, required_cgroup=True)
    cg = limits.cgroup(memory_bytes=256 << 20, vcpu_count=2)
    assert cg.memory_max == 320 << 20 and cg.cpu_quota_us == 200_000 and cg.required
    assert cg.parent == "metald" and cg.pids_max == 512


def test_a_jail_base_others_could_write_is_refused(tmp_path: Path) -> None:
    base = tmp_path / "jails"
    settings = JailSettings(uid=999, gid=995, chroot_base=base)
    settings.check_base("qemu")  # missing: the jailer makes it
    base.mkdir(mode=0o755)
    settings.check_base("qemu")  # root's, or metald's own user's (a unit's user)
    base.chmod(0o777)
    with pytest.raises(BackendError, match="writable by its owner only"):
        settings.check_base("qemu")
    if os.geteuid() == 0:  # someone else's
        base.chmod(0o755)
        os.chown(base, 65534, 65534)
        with pytest.raises(BackendError, match=r"owned by root \(or metald's user\)"):
            settings.check_base("qemu")


def test_the_control_socket_is_never_reached_through_a_symlink(tmp_path: Path) -> None:
    path = tmp_path / "qmp.sock"
    with pytest.raises(FileNotFoundError):
        open_socket_path(path, os.geteuid())
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen()
    try:
        fd = open_socket_path(path, os.geteuid())
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                client.connect(f"/proc/self/fd/{fd}")  # that inode, by a short path
        finally:
            os.close(fd)
        with pytest.raises(UnsafeSocket, match="owned by uid"):
            open_socket_path(path, os.geteuid() + 1)
        link = tmp_path / "link.sock"
        link.symlink_to(path)
        with pytest.raises(UnsafeSocket, match="symbolic link"):
            open_socket_path(link, os.geteuid())
        plain = tmp_path / "plain"
        plain.write_text("")
        with pytest.raises(UnsafeSocket, match="not a socket"):
            open_socket_path(plain, os.geteuid())
    finally:
        server.close()


def test_a_saved_jail_spec_must_be_this_vms(tmp_path: Path) -> None:
    spec = JailSpec(vm_id="vm-1", uid=999, gid=995, argv=("/usr/bin/qemu-system-x86_64",))
    path = tmp_path / "jail.json"
    assert load_jail_spec(path, "vm-1", "qemu") is None
    save_jail_spec(path, spec)
    assert load_jail_spec(path, "vm-1", "qemu") == spec
    assert load_jail_spec(path, "vm-2", "qemu") is None
    assert load_jail_spec(path, "vm-1", "firecracker") is None
    path.write_text('{"vm_id": "vm-1"}')
    assert load_jail_spec(path, "vm-1", "qemu") is None

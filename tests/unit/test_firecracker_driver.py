"""The Firecracker driver without a VMM: its description, command line, probe, the KVM check,
the run-directory files it makes and how it explains an exit."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest

from metald.backends.firecracker.driver import (
    SKIP_KVM_CHECK_ENV,
    FirecrackerDriver,
    make_run_files,
)
from metald.backends.vmm.driver import LaunchContext, VmmDriver, VmmFiles, VmmHost
from metald.core.errors import BackendError
from metald.core.models import LaunchSpec
from metald.host.kvm import probe_image, probe_kvm_directly
from metald.host.process import ExitStatus


def launch(host_run_dir: Path, vm_id: str = "vm-0123456789abcdef") -> LaunchContext:
    run = Path("/run")
    return LaunchContext(
        spec=LaunchSpec(
            vm_id=vm_id,
            vcpu_count=1,
            memory_bytes=128 * 1024 * 1024,
            kernel=Path("/srv/vmlinux"),
            initrd=None,
            kernel_args="",
            disks=(),
        ),
        files=VmmFiles(
            run_dir=run,
            control_socket=run / "firecracker.sock",
            console_log=run / "console.log",
            kernel=Path("/vmlinux"),
            initrd=None,
            drives=(),
        ),
        host_run_dir=host_run_dir,
        uid=os.getuid(),
        gid=os.getgid(),
        kernel_cmdline="console=ttyS0 reboot=k",
    )


def fake_binary(tmp_path: Path, output: str = "Firecracker v1.16.1\n") -> Path:
    """An executable that answers --version as Firecracker does (the probe runs nothing
    else)."""
    path = tmp_path / "firecracker"
    path.write_text(f"#!/bin/sh\nprintf '%s' '{output}'\n")
    path.chmod(0o755)
    return path


def test_it_describes_firecracker_to_the_runtime() -> None:
    driver: VmmDriver = FirecrackerDriver()  # mypy: it satisfies the protocol
    assert driver.name == "firecracker"
    assert driver.control_socket_name == "firecracker.sock"
    assert driver.info_socket_key == "api_socket"
    assert driver.reboot_needs_new_process is True
    assert driver.guest_reboot_arg == "k"
    assert driver.guest_on_shutdown == "reboot"
    assert driver.supports_guest_agent is False


def test_argv_keeps_seccomp_and_names_the_instance(tmp_path: Path) -> None:
    host = VmmHost(
        binary="/opt/fc/firecracker", version="1.16.1", accelerator="kvm", accelerator_reason=""
    )
    argv = FirecrackerDriver().argv(host, launch(tmp_path, vm_id="vm-abc"))
    assert argv == [
        "/opt/fc/firecracker",
        "--api-sock", "/run/firecracker.sock",
        "--id", "vm-abc",
        "--level", "Warning",
    ]  # fmt: skip
    assert not any("seccomp" in a for a in argv)


async def test_probe_without_the_binary_says_what_to_install(tmp_path: Path) -> None:
    driver = FirecrackerDriver(str(tmp_path / "no-such-firecracker"))
    with pytest.raises(BackendError) as e:
        await driver.probe()
    assert str(e.value) == (
        f"Firecracker binary {str(tmp_path / 'no-such-firecracker')!r} not found: install it "
        "from https://github.com/firecracker-microvm/firecracker/releases and set "
        "UNKEY_METALD_FIRECRACKER_BINARY"
    )
    with pytest.raises(BackendError, match="not found: install it"):
        await FirecrackerDriver("no-such-firecracker-on-path").probe()


async def test_probe_with_the_kvm_check_skipped_warns_every_time(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    binary = fake_binary(tmp_path)
    driver = FirecrackerDriver(str(binary), skip_kvm_check=True, extra_jail_paths=["/opt/extra"])
    caplog.set_level(logging.WARNING)
    for _ in range(2):
        host = await driver.probe()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"KVM check skipped ({SKIP_KVM_CHECK_ENV}): development only"] * 2
    assert host.binary == str(binary)
    assert host.version == "1.16.1"
    assert (host.accelerator, host.needs_kvm) == ("kvm", True)
    assert host.jail_paths[0] == str(binary)  # a script: no libraries of its own
    assert host.jail_paths[-1] == "/opt/extra"


async def test_probe_reads_an_unknown_version_as_empty(tmp_path: Path) -> None:
    host = await FirecrackerDriver(
        str(fake_binary(tmp_path, "something else")), skip_kvm_check=True
    ).probe()
    assert host.version == ""


async def test_probe_stops_when_kvm_cannot_run_a_guest(tmp_path: Path) -> None:
    # The real check: a tiny firmware through the KVM API (host/kvm.py). On these machines
    # /dev/kvm answers but nested KVM cannot run a long-mode guest.
    result = probe_kvm_directly(probe_image())
    if result.works:
        pytest.skip("KVM works on this host: nothing to refuse")
    with pytest.raises(BackendError) as e:
        await FirecrackerDriver(str(fake_binary(tmp_path))).probe()
    assert "Firecracker needs working KVM" in str(e.value)
    assert result.detail in str(e.value)
    assert SKIP_KVM_CHECK_ENV in str(e.value)


def test_run_files_are_a_fifo_and_an_empty_log_owned_by_the_vmm(tmp_path: Path) -> None:
    fifo = make_run_files(launch(tmp_path))
    assert fifo == tmp_path / "metrics.fifo"
    st = os.lstat(fifo)
    assert stat.S_ISFIFO(st.st_mode) and st.st_uid == os.getuid()
    log = os.lstat(tmp_path / "firecracker.log")
    assert stat.S_ISREG(log.st_mode) and log.st_size == 0 and log.st_uid == os.getuid()


@pytest.mark.parametrize("planted", ["metrics.fifo", "firecracker.log"])
def test_run_files_refuse_what_is_already_there(tmp_path: Path, planted: str) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("")
    (tmp_path / planted).symlink_to(target)
    with pytest.raises(BackendError, match="already exists"):
        make_run_files(launch(tmp_path))
    assert target.read_text() == ""


@pytest.mark.parametrize(
    ("status", "stderr_line", "reason", "by_guest"),
    [
        (ExitStatus(exit_code=0), "", "guest reset or shut down (firecracker exited)", True),
        (ExitStatus(signal=9), "", "vmm exited unexpectedly (signal 9)", False),
        (
            ExitStatus(exit_code=1),
            "Error: RunWithApi(...)",
            "vmm exited unexpectedly (exit status 1): Error: RunWithApi(...)",
            False,
        ),
        (ExitStatus(exit_code=148), "", "vmm exited unexpectedly (exit status 148)", False),
        (None, "", "vmm exited unexpectedly", False),
    ],
)
def test_describe_exit(
    status: ExitStatus | None, stderr_line: str, reason: str, by_guest: bool
) -> None:
    report = FirecrackerDriver().describe_exit(None, status, stderr_line)
    assert (report.reason, report.by_guest) == (reason, by_guest)

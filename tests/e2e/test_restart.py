"""VMs outlive the daemon: kill -9 metald, start it again on the same data dir, and it adopts
them. And a VMM that dies on its own is noticed at once."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import pytest

from ._support import (
    MIB,
    Caller,
    Daemon,
    pid_alive,
    proc_stat,
    state_name,
    wait_pid_gone,
    wait_until,
)

pytestmark = pytest.mark.guest

SMALL = {"memory": {"size_bytes": 128 * MIB}}


def _create_running(call: Caller, vm_id: str) -> int:
    call.must("CreateVm", {"vm_id": vm_id, "config": SMALL})
    booted = call.must("BootVm", {"vm_id": vm_id})
    assert state_name(booted.body["state"]) == "RUNNING"
    pid = int(call.info(vm_id).body["backend_info"]["pid"])
    assert pid_alive(pid)
    return pid


def test_running_vms_survive_a_daemon_kill9(daemon: Daemon, callers: Callable[..., Caller]) -> None:
    call = callers("curl-connect-json", daemon.url)
    pids = {vm_id: _create_running(call, vm_id) for vm_id in ("keep-a", "keep-b", "lost-c")}
    starts = {vm_id: proc_stat(pid)[1] for vm_id, pid in pids.items()}  # type: ignore[index]

    daemon.kill9()
    for vm_id, pid in pids.items():
        assert pid_alive(pid, starts[vm_id]), f"{vm_id}: QEMU died with the daemon"
    # While metald is down, one guest's VMM dies: the restarted daemon must notice.
    os.kill(pids["lost-c"], signal.SIGKILL)
    wait_pid_gone(pids["lost-c"])

    daemon.start_again()
    call = callers("grpcio", daemon.url)
    for vm_id in ("keep-a", "keep-b"):
        info = call.info(vm_id)
        assert state_name(info.body["state"]) == "RUNNING", info
        assert int(info.body["backend_info"]["pid"]) == pids[vm_id], "not the same QEMU"
        assert pid_alive(pids[vm_id], starts[vm_id])
        assert daemon.db_rows()[vm_id]["state"] == "RUNNING"
    lost = call.info("lost-c")
    assert state_name(lost.body["state"]) == "SHUTDOWN", lost
    assert lost.body["backend_info"].get("exit_reason"), lost

    # The adopted VMs are fully controllable.
    for vm_id in ("keep-a", "keep-b"):
        paused = call.must("PauseVm", {"vm_id": vm_id})
        assert state_name(paused.body["state"]) == "PAUSED"
        assert state_name(call.info(vm_id).body["state"]) == "PAUSED"
        assert pid_alive(pids[vm_id], starts[vm_id])
    call.must("ResumeVm", {"vm_id": "keep-a"})
    assert state_name(call.info("keep-a").body["state"]) == "RUNNING"

    for vm_id in ("keep-a", "keep-b", "lost-c"):
        call.must("DeleteVm", {"vm_id": vm_id, "force": True})
    for vm_id, pid in pids.items():
        wait_pid_gone(pid)
        assert not daemon.vm_dir(vm_id).exists()
        assert daemon.db_rows()[vm_id]["deleted_at"] is not None
    assert not daemon.qemu_pids()


def test_vmm_killed_behind_metalds_back_becomes_shutdown(
    daemon: Daemon, callers: Callable[..., Caller]
) -> None:
    call = callers("grpcio", daemon.url)
    pid = _create_running(call, "doomed")

    os.kill(pid, signal.SIGKILL)  # the pid came from GetVmInfo: this VM's QEMU
    killed_at = time.monotonic()
    info = wait_until(
        lambda: (r := call.info("doomed")) and state_name(r.body["state"]) == "SHUTDOWN" and r,
        2.0,
        "GetVmInfo to report SHUTDOWN after the QEMU process was killed",
        interval=0.05,
    )
    elapsed = time.monotonic() - killed_at
    reason = info.body["backend_info"].get("exit_reason", "")
    assert reason, f"no exit_reason in backend_info: {info.body['backend_info']}"
    assert not pid_alive(pid)
    assert daemon.db_rows()["doomed"]["state"] == "SHUTDOWN"
    print(f"SHUTDOWN seen {elapsed:.2f}s after the kill; exit_reason: {reason}")

    # SHUTDOWN -> RUNNING: a new QEMU process.
    booted = call.must("BootVm", {"vm_id": "doomed"})
    assert state_name(booted.body["state"]) == "RUNNING"
    new_pid = int(call.info("doomed").body["backend_info"]["pid"])
    assert new_pid != pid and pid_alive(new_pid)
    assert "exit_reason" not in call.info("doomed").body["backend_info"]
    call.must("DeleteVm", {"vm_id": "doomed", "force": True})
    wait_pid_gone(new_pid)

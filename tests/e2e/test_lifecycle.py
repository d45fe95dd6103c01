"""One full life of a VM, the same scenario through each client and protocol:
curl (Connect JSON over HTTP/1.1), grpcio (gRPC over h2c) and `buf curl` in the Connect
(binary proto), gRPC and gRPC-Web protocols over h2c.

Every step is checked on the host too (console log, /proc, the SQLite file, the per-VM dir),
not only through what the API says."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ._support import (
    CALLER_NAMES,
    MIB,
    ApiConsole,
    Caller,
    Daemon,
    pid_alive,
    proc_state,
    state_name,
    stays,
    wait_pid_gone,
    wait_until,
)

pytestmark = pytest.mark.guest

BOOT_TIMEOUT = 90.0  # TCG on 2 shared cores; a boot is usually 2-5 s


@pytest.mark.parametrize("caller_name", CALLER_NAMES)
def test_full_life(daemon: Daemon, callers: Callable[..., Caller], caller_name: str) -> None:
    call = callers(caller_name, daemon.url)

    # -- create ----------------------------------------------------------------------------
    created = call.must(
        "CreateVm",
        {
            "config": {
                "cpu": {"vcpu_count": 1},
                "memory": {"size_bytes": 256 * MIB},
                "metadata": {"client": caller_name},
            }
        },
    )
    vm_id = created.body["vm_id"]
    assert vm_id, created
    assert state_name(created.body["state"]) == "CREATED"

    info = call.info(vm_id)
    assert state_name(info.body["state"]) == "CREATED"
    assert info.body["config"]["metadata"] == {"client": caller_name}
    assert int(info.body["config"]["cpu"]["vcpu_count"]) == 1
    assert int(info.body["config"]["memory"]["size_bytes"]) == 256 * MIB
    backend = info.body["backend_info"]
    pid = int(backend["pid"])
    console_path = Path(backend["console_log"])
    assert console_path.is_absolute(), backend
    assert pid_alive(pid), f"QEMU pid {pid} of a CREATED VM is not running"
    console = ApiConsole(call, vm_id)  # as the tenant reads it
    assert console.ready_count() == 0, "a CREATED VM must not have started its vCPUs"

    listed = call.must("ListVms", {})
    assert vm_id in [v["vm_id"] for v in listed.body["vms"]]
    row = daemon.db_rows()[vm_id]
    assert row["customer_id"] == "acme" and row["state"] == "CREATED" and row["deleted_at"] is None

    # -- boot: the guest's init reports readiness on the console ----------------------------
    booted = call.must("BootVm", {"vm_id": vm_id})
    assert state_name(booted.body["state"]) == "RUNNING"
    assert call.state(vm_id) == "RUNNING"
    wait_until(lambda: console.ready_count() >= 1, BOOT_TIMEOUT, f"READY on {console_path}")
    first_hb = wait_until(console.heartbeats, 15, "a first heartbeat after READY")

    # -- pause: heartbeats stop ---------------------------------------------------------------
    paused = call.must("PauseVm", {"vm_id": vm_id})
    assert state_name(paused.body["state"]) == "PAUSED"
    assert call.state(vm_id) == "PAUSED"
    assert pid_alive(pid), "pausing must not end the QEMU process"
    frozen = console.heartbeats()  # a line already in flight has been written by now
    assert frozen >= first_hb
    stays(lambda: console.heartbeats() == frozen, 2.5, "no heartbeat while PAUSED")

    # -- resume: they advance again -------------------------------------------------------------
    resumed = call.must("ResumeVm", {"vm_id": vm_id})
    assert state_name(resumed.body["state"]) == "RUNNING"
    wait_until(lambda: console.heartbeats() > frozen, 15, "a heartbeat after ResumeVm")

    # -- reboot: a guest-visible reset, so a second READY line ----------------------------------
    rebooted = call.must("RebootVm", {"vm_id": vm_id})
    assert state_name(rebooted.body["state"]) == "RUNNING"
    wait_until(lambda: console.ready_count() >= 2, BOOT_TIMEOUT, "a second READY after RebootVm")
    assert call.state(vm_id) == "RUNNING"
    pid_after_reboot = int(call.info(vm_id).body["backend_info"]["pid"])
    assert pid_alive(pid_after_reboot)

    # -- graceful shutdown: the guest runs its shutdown path, QEMU exits -----------------------
    down = call.must("ShutdownVm", {"vm_id": vm_id, "timeout_seconds": 60})
    assert state_name(down.body["state"]) == "SHUTDOWN"
    assert console.shutdown_seen(), (
        "ShutdownVm without force must let the guest run its shutdown path; console:\n"
        + console.tail()
    )
    wait_pid_gone(pid_after_reboot, timeout=10)
    info = call.info(vm_id)
    assert state_name(info.body["state"]) == "SHUTDOWN"
    assert daemon.db_rows()[vm_id]["state"] == "SHUTDOWN"

    # -- delete: no process, no per-VM dir, the row marked deleted ------------------------------
    deleted = call.must("DeleteVm", {"vm_id": vm_id})
    assert deleted.body["success"] is True
    gone = call("GetVmInfo", {"vm_id": vm_id})
    assert gone.code == "not_found", gone
    again = call("DeleteVm", {"vm_id": vm_id, "force": True})
    assert again.code == "not_found", again
    assert vm_id not in [v["vm_id"] for v in call.must("ListVms", {}).body["vms"]]
    assert not pid_alive(pid) and not pid_alive(pid_after_reboot)
    assert proc_state(pid_after_reboot) in (None, "Z", "X")
    assert not daemon.vm_dir(vm_id).exists(), f"{daemon.vm_dir(vm_id)} left after DeleteVm"
    row = daemon.db_rows()[vm_id]
    assert row["deleted_at"] is not None, row
    assert not daemon.qemu_pids(), "no QEMU of this daemon may be left"


def test_graceful_shutdown_times_out_into_a_forced_one(
    daemon: Daemon, callers: Callable[..., Caller]
) -> None:
    """A guest that cannot run its shutdown path (here: paused, and not even booted yet) is
    stopped anyway once timeout_seconds has passed."""
    call = callers("grpcio", daemon.url)
    vm_id = call.must("CreateVm", {"config": {"memory": {"size_bytes": 128 * MIB}}}).body["vm_id"]
    call.must("BootVm", {"vm_id": vm_id})
    call.must("PauseVm", {"vm_id": vm_id})
    pid = int(call.info(vm_id).body["backend_info"]["pid"])

    started = time.monotonic()
    down = call.must("ShutdownVm", {"vm_id": vm_id, "timeout_seconds": 2})
    took = time.monotonic() - started
    assert state_name(down.body["state"]) == "SHUTDOWN"
    assert took < 2 + 10, f"ShutdownVm with timeout_seconds=2 took {took:.1f}s"
    wait_pid_gone(pid, timeout=5)
    info = call.info(vm_id)
    assert state_name(info.body["state"]) == "SHUTDOWN"
    assert info.body["backend_info"].get("exit_reason"), info.body["backend_info"]
    call.must("DeleteVm", {"vm_id": vm_id})
    assert not daemon.vm_dir(vm_id).exists()

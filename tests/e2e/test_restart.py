"""VMs outlive the daemon: kill -9 metald, start it again on the same data dir, and it adopts
them. And a VMM that dies on its own is noticed at once."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ._support import (
    MIB,
    ApiConsole,
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


# -- a daemon in a mount namespace of its own -------------------------------------------------

NIC = {"id": "eth0", "mode": "NETWORK_MODE_DUAL_STACK"}
NETNS_DIR = Path("/run/netns")


def _ping(daemon: Daemon, address: str) -> subprocess.CompletedProcess[str]:
    """Ping from the daemon's host namespace (made by the test): traffic stays in it."""
    return subprocess.run(
        ["ip", "netns", "exec", daemon.host_netns, "ping", "-c", "2", "-W", "3", address],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


def _reachable(daemon: Daemon, address: str) -> bool:
    return _ping(daemon, address).returncode == 0


def _is_namespace(path: Path) -> bool:
    """A name that stands for a namespace here (a mount of nsfs), not a stale empty file."""
    return path.stat().st_dev == Path("/proc/self/ns/net").stat().st_dev


def _our_names(daemon: Daemon) -> dict[str, bool]:
    """Our names under /run/netns, as the test's (the host's) mount namespace sees them:
    name -> whether it stands for a namespace."""
    return {
        p.name: _is_namespace(p)
        for p in NETNS_DIR.iterdir()
        if p.name.startswith(daemon.vm_netns_prefix) or p.name == daemon.segments_netns
    }


def _boot_and_wait(call: Caller, vm_id: str) -> tuple[str, str]:
    """Boot; wait for READY; (IPv4, IPv6) from GetVmInfo."""
    call.must("BootVm", {"vm_id": vm_id})
    info = call.info(vm_id).body
    # A jailed VM's console log covers its current QEMU only.
    console = ApiConsole(call, vm_id)
    wait_until(lambda: console.ready_count() >= 1, 120, f"READY on {vm_id}'s console")
    net = info["network_info"]
    return net["ip_address"], net["ipv6_address"]


@pytest.mark.parametrize(
    "propagation",
    [
        # As under `ip netns exec` or a hardened systemd unit: the host's mounts reach the
        # daemon but not the other way round. metald mounts its names where they reach the
        # host: after the kill -9 nothing was lost.
        "slave",
        # A private mount namespace: no name can outlive the daemon. After the kill -9 the
        # names are empty files; the restart repairs them (the VMs' namespaces are taken
        # back from their VMMs, the segments namespace and the links are made anew).
        "private",
    ],
)
def test_networked_vms_survive_a_kill9_of_a_daemon_in_its_own_mount_namespace(
    metald_factory: Callable[..., Daemon], callers: Callable[..., Caller], propagation: str
) -> None:
    prefix = ("unshare", "--mount", "--propagation", propagation)
    daemon = metald_factory(command_prefix=prefix)
    assert os.stat(f"/proc/{daemon.pid}/ns/mnt").st_ino != os.stat("/proc/self/ns/mnt").st_ino
    call = callers("curl-connect-json", daemon.url)
    config = {"memory": {"size_bytes": 128 * MIB}, "network": [NIC]}
    running = ("net-a", "net-b")
    addresses: dict[str, tuple[str, str]] = {}
    for vm_id in (*running, "net-off"):
        call.must("CreateVm", {"vm_id": vm_id, "config": config})
        addresses[vm_id] = _boot_and_wait(call, vm_id)
    for vm_id, (ip4, ip6) in addresses.items():
        assert ip4.startswith("10.100.") and ip6.startswith("fd00:"), addresses
        for address in (ip4, ip6):
            assert _reachable(daemon, address), f"{vm_id} {address} before the kill"
    # One VM is shut down before the kill: its namespace outlives its VMM only by its name.
    call.must("ShutdownVm", {"vm_id": "net-off", "force": True})
    pids = {vm_id: int(call.info(vm_id).body["backend_info"]["pid"]) for vm_id in running}
    starts = {vm_id: proc_stat(pid)[1] for vm_id, pid in pids.items()}  # type: ignore[index]

    daemon.kill9()
    for vm_id, pid in pids.items():
        assert pid_alive(pid, starts[vm_id]), f"{vm_id}: QEMU died with the daemon"
    names = _our_names(daemon)
    assert len(names) == 4, names  # three VMs and the segments namespace
    if propagation == "slave":
        assert all(names.values()), f"names lost with the daemon's mount namespace: {names}"
    else:
        assert not any(names.values()), f"a private mount namespace's names survived: {names}"

    daemon.start_again()  # in a new mount namespace of its own again
    call = callers("grpcio", daemon.url)
    assert all(_our_names(daemon).values()) or propagation == "private"
    for vm_id in running:
        info = call.info(vm_id).body
        assert state_name(info["state"]) == "RUNNING", info
        assert int(info["backend_info"]["pid"]) == pids[vm_id], "not the same QEMU"
        net = info["network_info"]
        assert (net["ip_address"], net["ipv6_address"]) == addresses[vm_id], net
        # Reachable again (in the private case the links were rebuilt at the restart).
        for address in addresses[vm_id]:
            assert _reachable(daemon, address), f"{vm_id} {address} after the restart"
        assert int(call.info(vm_id).body["metrics"]["network_stats"]["packets_received"]) > 0

    # Every VM is still controllable: shut down and boot again (a new VMM in the VM's
    # namespace), boot the one that was off when the daemon died, then delete them all.
    call.must("ShutdownVm", {"vm_id": "net-a", "force": True})
    for vm_id in ("net-a", "net-off"):
        assert _boot_and_wait(call, vm_id) == addresses[vm_id]
        for address in addresses[vm_id]:
            assert _reachable(daemon, address), f"{vm_id} {address} after booting again"
    all_pids = {int(call.info(v).body["backend_info"]["pid"]) for v in addresses}
    for vm_id in addresses:
        call.must("DeleteVm", {"vm_id": vm_id, "force": True})
    for pid in all_pids | set(pids.values()):
        wait_pid_gone(pid)
    assert not any(n.startswith(daemon.vm_netns_prefix) for n in _our_names(daemon)), _our_names(
        daemon
    )
    for vm_id in addresses:
        assert not daemon.vm_dir(vm_id).exists()
        assert not (daemon.jail_dir / "qemu" / vm_id).exists()
        assert daemon.db_rows()[vm_id]["deleted_at"] is not None
    assert not daemon.qemu_pids()
    # The daemon stops cleanly on SIGTERM (the fixture checks it, and that nothing leaked).

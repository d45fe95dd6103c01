"""The Firecracker backend end to end: metald run as a process with UNKEY_METALD_BACKEND=
firecracker, jailed as every e2e daemon is, driven through its API.

WHY a stand-in: Firecracker cannot be installed from this machine's registries and KVM cannot
run guests here. The daemon runs the API stand-in (tests/fakes/firecracker) as its
"firecracker binary": it validates every request body against Firecracker's spec, enforces
its ordering rules, answers 400 with a fault_message where Firecracker would, and runs the
guest under QEMU, so console, network, pause and Ctrl-Alt-Del are real. A request the stand-in
refuses makes the daemon's call fail, and so the test. When a real `firecracker` is on PATH
and KVM runs guests, the VM tests run against it too; otherwise that variant is skipped with
the reason. The last test needs a real `firecracker` on PATH only (no guest): it checks that
one takes everything the daemon configures, InstanceStart included.

Every step is also checked on the host (console log, /proc, the SQLite file, the jail base,
the VMM's own API socket), and the e2e teardown fails the test on any process, jail, cgroup
or namespace left behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fakes.firecracker.make_launcher import standin_host_paths, write_launcher
from fakes.firecracker.real import real_firecracker_binary

from metald.host.kvm import probe_image, probe_kvm_directly

from ._support import (
    ASSETS,
    METALD,
    MIB,
    ROOT,
    Caller,
    Console,
    Daemon,
    client_env,
    pid_alive,
    proc_stat,
    qemu_processes,
    state_name,
    stays,
    wait_pid_gone,
    wait_until,
)

pytestmark = pytest.mark.guest

BOOT_TIMEOUT = 120.0  # TCG under the stand-in on 2 shared cores; usually a few seconds
SMALL: dict[str, Any] = {"memory": {"size_bytes": 128 * MIB}}
NIC: dict[str, Any] = {"id": "eth0", "mode": "NETWORK_MODE_DUAL_STACK"}
_READY = re.compile(r"METALD-GUEST READY vm=(\S+) boot=(\S+)")
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"


# -- the Firecracker binaries ------------------------------------------------------------------


def _real_firecracker_reason() -> str | None:
    """None when a real Firecracker can run guests here, else why not."""
    if shutil.which("firecracker") is None:
        return "no real `firecracker` on PATH"
    probe = probe_kvm_directly(probe_image())
    if not probe.works:
        return f"KVM cannot run guests on this host: {probe.detail}"
    return None


@pytest.fixture(scope="module")
def standin(e2e_root: Path) -> Iterator[Path]:
    """The stand-in as an executable named `firecracker` (its comm, which the session leak
    check looks for), in a directory of this session's temp tree."""
    bin_dir = Path(tempfile.mkdtemp(prefix="fcbin", dir=e2e_root))
    bin_dir.chmod(0o755)
    yield write_launcher(bin_dir / "firecracker", VENV_PYTHON)
    shutil.rmtree(bin_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def standin_env(standin: Path) -> dict[str, str]:
    paths = [*standin_host_paths(VENV_PYTHON), "/proc/cpuinfo"]
    return {
        "UNKEY_METALD_BACKEND": "firecracker",
        "UNKEY_METALD_FIRECRACKER_BINARY": str(standin),
        "UNKEY_METALD_FIRECRACKER_SKIP_KVM_CHECK": "true",
        "UNKEY_METALD_FIRECRACKER_JAIL_PATHS": ",".join(paths),
    }


@pytest.fixture(params=["standin", "real"])
def fc_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """The daemon settings of a Firecracker backend: the stand-in, or a real Firecracker."""
    if request.param == "standin":
        env: dict[str, str] = request.getfixturevalue("standin_env")
        return env
    reason = _real_firecracker_reason()
    if reason is not None:
        pytest.skip(reason)
    return {"UNKEY_METALD_BACKEND": "firecracker", "UNKEY_METALD_FIRECRACKER_BINARY": "firecracker"}


@pytest.fixture
def fc_daemon(metald_factory: Callable[..., Daemon], fc_env: dict[str, str]) -> Daemon:
    return metald_factory(**fc_env)


# -- host-side probes --------------------------------------------------------------------------


def fc_api(backend_info: dict[str, str], path: str) -> Any:
    """GET `path` from the VMM's own API socket (the one metald reports), parsed."""
    sock = backend_info["api_socket"]
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "10", "--unix-socket", sock, f"http://localhost{path}"],
        capture_output=True, text=True, timeout=30, check=False, env=client_env(),
    )  # fmt: skip
    assert out.returncode == 0, f"GET {path} on {sock}: {out.stderr}"
    return json.loads(out.stdout)


def assert_no_refusals(call: Caller, vm_id: str) -> None:
    """Nothing this VM's VMM was asked was refused: Firecracker (and the stand-in) logs every
    400 it answers to its log, in its run directory beside the console log. (Refused calls
    metald does not report to a caller, such as FlushMetrics, show up only there.)"""
    run_dir = Path(call.info(vm_id).body["backend_info"]["console_log"]).parent
    text = (run_dir / "firecracker.log").read_text(errors="replace")
    refused = [line for line in text.splitlines() if "Status code: 400" in line]
    assert not refused, f"{vm_id}: the VMM refused requests:\n" + "\n".join(refused)


def boot_ids(console: Console) -> list[str]:
    return [m.group(2) for m in _READY.finditer(console.text())]


def console_of(call: Caller, vm_id: str) -> Console:
    """The VM's console, from GetVmInfo: a jailed VMM's log is in its jail's /run, and every
    new VMM process gets a new jail, so ask again after each new process."""
    return Console(Path(call.info(vm_id).body["backend_info"]["console_log"]))


def vmm_pid(call: Caller, vm_id: str) -> int:
    return int(call.info(vm_id).body["backend_info"]["pid"])


def fc_jails(daemon: Daemon) -> set[str]:
    d = daemon.jail_dir / "firecracker"
    return set(os.listdir(d)) if d.is_dir() else set()


def vm_cgroups(daemon: Daemon) -> set[str]:
    found: set[str] = set()
    for hierarchy in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup"):
        parent = Path(hierarchy) / daemon.cgroup_parent
        if parent.is_dir():
            found |= {p.name for p in parent.iterdir() if p.is_dir()}
    return found


def assert_nothing_left(daemon: Daemon, vm_id: str, pids: list[int]) -> None:
    """After DeleteVm: no process, per-VM directory, jail or cgroup of the VM."""
    for pid in pids:
        assert not pid_alive(pid), f"VMM pid {pid} of {vm_id} still alive"
    assert not daemon.vm_dir(vm_id).exists(), f"{daemon.vm_dir(vm_id)} left after DeleteVm"
    assert vm_id not in fc_jails(daemon), f"jail of {vm_id} left after DeleteVm"
    assert vm_id not in vm_cgroups(daemon), f"cgroup of {vm_id} left after DeleteVm"
    assert daemon.db_rows()[vm_id]["deleted_at"] is not None
    assert not qemu_processes(str(daemon.workdir)), "a guest QEMU of this daemon is left"


def boot_and_wait_ready(call: Caller, vm_id: str) -> Console:
    booted = call.must("BootVm", {"vm_id": vm_id})
    assert state_name(booted.body["state"]) == "RUNNING"
    console = console_of(call, vm_id)
    wait_until(lambda: console.ready_count() >= 1, BOOT_TIMEOUT, f"READY on {console.path}")
    return console


# -- 1. the whole life -------------------------------------------------------------------------


def test_full_life(fc_daemon: Daemon, callers: Callable[..., Caller]) -> None:
    daemon = fc_daemon
    call = callers("grpcio", daemon.url)

    # -- create: a configured VMM whose guest has not started --------------------------------
    created = call.must("CreateVm", {"config": {**SMALL, "metadata": {"via": "firecracker"}}})
    vm_id = created.body["vm_id"]
    assert state_name(created.body["state"]) == "CREATED"
    info = call.info(vm_id).body
    backend = info["backend_info"]
    assert state_name(info["state"]) == "CREATED"
    assert {"api_socket", "console_log", "pid"} <= set(backend), backend
    jail_root = daemon.jail_dir / "firecracker" / vm_id / "root"
    assert Path(backend["api_socket"]).parent == jail_root / "run", backend
    assert Path(backend["console_log"]).parent == jail_root / "run", backend
    pid = int(backend["pid"])
    assert pid_alive(pid)
    assert daemon.db_rows()[vm_id]["backend"] == "firecracker"
    described = fc_api(backend, "/")
    assert described["state"] == "Not started", described
    assert described["id"] == vm_id, described
    assert Console(Path(backend["console_log"])).ready_count() == 0
    assert not qemu_processes(str(daemon.workdir)), "a guest runs before BootVm"

    # -- boot: READY on the console ------------------------------------------------------------
    console = boot_and_wait_ready(call, vm_id)
    assert fc_api(call.info(vm_id).body["backend_info"], "/")["state"] == "Running"
    first_boot = boot_ids(console)
    assert len(first_boot) == 1, console.tail()
    first_hb = wait_until(console.heartbeats, 15, "a first heartbeat after READY")

    # -- pause: heartbeats stop; resume: they advance again --------------------------------------
    paused = call.must("PauseVm", {"vm_id": vm_id})
    assert state_name(paused.body["state"]) == "PAUSED"
    assert call.state(vm_id) == "PAUSED"
    assert fc_api(call.info(vm_id).body["backend_info"], "/")["state"] == "Paused"
    assert pid_alive(pid), "pausing must not end the VMM"
    frozen = console.heartbeats()
    assert frozen >= first_hb
    stays(lambda: console.heartbeats() == frozen, 2.5, "no heartbeat while PAUSED")
    resumed = call.must("ResumeVm", {"vm_id": vm_id})
    assert state_name(resumed.body["state"]) == "RUNNING"
    wait_until(lambda: console.heartbeats() > frozen, 15, "a heartbeat after ResumeVm")

    assert_no_refusals(call, vm_id)

    # -- reboot: Firecracker ends with a guest reset, so a new process and a new boot -------------
    rebooted = call.must("RebootVm", {"vm_id": vm_id})
    assert state_name(rebooted.body["state"]) == "RUNNING"
    wait_pid_gone(pid)
    pid2 = vmm_pid(call, vm_id)
    assert pid2 != pid and pid_alive(pid2)
    console = console_of(call, vm_id)
    wait_until(lambda: boot_ids(console), BOOT_TIMEOUT, f"READY after RebootVm on {console.path}")
    assert not set(boot_ids(console)) & set(first_boot), "the reboot's READY is the old boot's"
    assert call.state(vm_id) == "RUNNING"
    assert_no_refusals(call, vm_id)

    # -- graceful shutdown: the guest runs its shutdown path, Firecracker exits -------------------
    down = call.must("ShutdownVm", {"vm_id": vm_id, "timeout_seconds": 90})
    assert state_name(down.body["state"]) == "SHUTDOWN"
    assert console.shutdown_seen(), "no SHUTDOWN line on the console:\n" + console.tail()
    wait_pid_gone(pid2)
    info = call.info(vm_id).body
    assert state_name(info["state"]) == "SHUTDOWN"
    assert "graceful" in info["backend_info"].get("exit_reason", ""), info["backend_info"]
    assert daemon.db_rows()[vm_id]["state"] == "SHUTDOWN"

    # -- boot again from SHUTDOWN: a new process from the saved configuration ---------------------
    console = boot_and_wait_ready(call, vm_id)
    pid3 = vmm_pid(call, vm_id)
    assert pid3 not in (pid, pid2) and pid_alive(pid3)
    assert_no_refusals(call, vm_id)

    # -- forced shutdown ------------------------------------------------------------------------
    forced = call.must("ShutdownVm", {"vm_id": vm_id, "force": True})
    assert state_name(forced.body["state"]) == "SHUTDOWN"
    wait_pid_gone(pid3)
    assert "forced" in call.info(vm_id).body["backend_info"].get("exit_reason", "")

    # -- delete: nothing left --------------------------------------------------------------------
    deleted = call.must("DeleteVm", {"vm_id": vm_id})
    assert deleted.body["success"] is True
    assert call("GetVmInfo", {"vm_id": vm_id}).code == "not_found"
    assert_nothing_left(daemon, vm_id, [pid, pid2, pid3])


# -- 2. a VMM that dies behind metald's back -----------------------------------------------------


def test_vmm_killed_becomes_shutdown(fc_daemon: Daemon, callers: Callable[..., Caller]) -> None:
    call = callers("curl-connect-json", fc_daemon.url)
    call.must("CreateVm", {"vm_id": "fc-doomed", "config": SMALL})
    boot_and_wait_ready(call, "fc-doomed")
    pid = vmm_pid(call, "fc-doomed")

    os.kill(pid, signal.SIGKILL)  # the pid came from GetVmInfo: this VM's Firecracker
    info = wait_until(
        lambda: (r := call.info("fc-doomed")) and state_name(r.body["state"]) == "SHUTDOWN" and r,
        10.0,
        "GetVmInfo to report SHUTDOWN after the VMM was killed",
        interval=0.05,
    )
    reason = info.body["backend_info"].get("exit_reason", "")
    assert "signal 9" in reason, info.body["backend_info"]
    assert fc_daemon.db_rows()["fc-doomed"]["state"] == "SHUTDOWN"
    wait_until(lambda: not qemu_processes(str(fc_daemon.workdir)), 10, "the guest to go too")

    call.must("DeleteVm", {"vm_id": "fc-doomed"})
    assert_nothing_left(fc_daemon, "fc-doomed", [pid])


# -- 3. adoption after a kill -9 of the daemon ----------------------------------------------------


def test_restart_adopts_running_and_paused(
    fc_daemon: Daemon, callers: Callable[..., Caller]
) -> None:
    daemon = fc_daemon
    call = callers("curl-connect-json", daemon.url)
    for vm_id in ("fc-run", "fc-paused"):
        call.must("CreateVm", {"vm_id": vm_id, "config": SMALL})
        boot_and_wait_ready(call, vm_id)
    call.must("PauseVm", {"vm_id": "fc-paused"})
    pids = {vm_id: vmm_pid(call, vm_id) for vm_id in ("fc-run", "fc-paused")}
    starts = {vm_id: proc_stat(pid)[1] for vm_id, pid in pids.items()}  # type: ignore[index]

    daemon.kill9()
    for vm_id, pid in pids.items():
        assert pid_alive(pid, starts[vm_id]), f"{vm_id}: Firecracker died with the daemon"
    daemon.start_again()

    call = callers("grpcio", daemon.url)
    for vm_id, expected in (("fc-run", "RUNNING"), ("fc-paused", "PAUSED")):
        info = call.info(vm_id).body
        assert state_name(info["state"]) == expected, info
        assert int(info["backend_info"]["pid"]) == pids[vm_id], "not the same Firecracker"
        assert pid_alive(pids[vm_id], starts[vm_id])
    console = console_of(call, "fc-paused")
    frozen = console.heartbeats()
    stays(lambda: console.heartbeats() == frozen, 2.0, "still paused after adoption")

    # Still controllable.
    call.must("ResumeVm", {"vm_id": "fc-paused"})
    wait_until(lambda: console.heartbeats() > frozen, 15, "a heartbeat after ResumeVm")
    call.must("PauseVm", {"vm_id": "fc-run"})
    assert call.state("fc-run") == "PAUSED"
    call.must("ResumeVm", {"vm_id": "fc-run"})
    for vm_id in pids:
        assert_no_refusals(call, vm_id)
    down = call.must("ShutdownVm", {"vm_id": "fc-paused", "timeout_seconds": 90})
    assert state_name(down.body["state"]) == "SHUTDOWN"
    assert console.shutdown_seen(), console.tail()
    assert "graceful" in call.info("fc-paused").body["backend_info"].get("exit_reason", "")
    call.must("ShutdownVm", {"vm_id": "fc-run", "force": True})
    for vm_id, pid in pids.items():
        wait_pid_gone(pid)
        call.must("DeleteVm", {"vm_id": vm_id})
        assert_nothing_left(daemon, vm_id, [pid])


# -- 4. a networked VM with rate limits -----------------------------------------------------------


def _bucket(iface: dict[str, Any], direction: str) -> dict[str, Any]:
    """The bandwidth bucket of an interface's rx or tx limiter, unset fields left out (a real
    Firecracker reports them as null)."""
    limiter = iface.get(f"{direction}_rate_limiter") or {}
    return {k: v for k, v in (limiter.get("bandwidth") or {}).items() if v is not None}


def test_networked_vm_with_rate_limits(fc_daemon: Daemon, callers: Callable[..., Caller]) -> None:
    daemon = fc_daemon
    call = callers("grpcio", daemon.url)
    nic = {
        **NIC,
        "rx_rate_limit": {"bandwidth": 2 * MIB},
        "tx_rate_limit": {"bandwidth": MIB, "burst": 64 * 1024},
    }
    call.must("CreateVm", {"vm_id": "fc-net", "config": {**SMALL, "network": [nic]}})
    info = call.info("fc-net").body
    ip4 = info["network_info"]["ip_address"]
    tap = info["network_info"]["tap_device"]
    assert ip4 and tap, info["network_info"]

    # What Firecracker itself was told (its configuration, read back over its API socket).
    config = fc_api(info["backend_info"], "/vm/config")
    ifaces = config["network-interfaces"]
    assert len(ifaces) == 1, config
    iface = ifaces[0]
    assert iface["host_dev_name"] == tap, iface
    assert _bucket(iface, "rx") == {"size": 2 * MIB, "refill_time": 1000}, iface
    assert _bucket(iface, "tx") == {
        "size": MIB,
        "refill_time": 1000,
        "one_time_burst": 64 * 1024,
    }, iface

    console = boot_and_wait_ready(call, "fc-net")
    assert any(
        line.startswith("METALD-GUEST NET eth0") and f"ip4={ip4}/" in line
        for line in console.text().splitlines()
    ), console.tail()
    ping = subprocess.run(
        ["ip", "netns", "exec", daemon.host_netns, "ping", "-c", "2", "-W", "5", ip4],
        capture_output=True, text=True, timeout=60, check=False, env=client_env(),
    )  # fmt: skip
    assert ping.returncode == 0, f"host -> {ip4}: {ping.stdout}{ping.stderr}"
    assert_no_refusals(call, "fc-net")

    pid = vmm_pid(call, "fc-net")
    call.must("DeleteVm", {"vm_id": "fc-net", "force": True})
    assert_nothing_left(daemon, "fc-net", [pid])


# -- 5. metrics from Firecracker's metrics FIFO ---------------------------------------------------


def test_disk_metrics_after_boot(
    metald_factory: Callable[..., Daemon],
    fc_env: dict[str, str],
    private_store: Path,
    callers: Callable[..., Caller],
) -> None:
    # A data disk the guest's kernel reads when it probes it (partition table), in a private
    # copy of the asset store (the shared one is never written to); files an operator placed
    # in a sub-directory may be attached by path.
    (private_store / "disks").mkdir()
    with open(private_store / "disks" / "data.img", "wb") as f:
        f.truncate(8 * MIB)
    daemon = metald_factory(**fc_env, UNKEY_METALD_ASSETMANAGER_CACHE_DIR=str(private_store))
    call = callers("grpcio", daemon.url)
    disk = {"id": "data", "path": "disks/data.img", "read_only": True, "is_root_device": False}
    call.must("CreateVm", {"vm_id": "fc-disk", "config": {**SMALL, "storage": [disk]}})
    config = fc_api(call.info("fc-disk").body["backend_info"], "/vm/config")
    assert [d["is_read_only"] for d in config["drives"]] == [True], config["drives"]
    boot_and_wait_ready(call, "fc-disk")

    def read_bytes() -> int:
        metrics = call.info("fc-disk").body["metrics"]
        return int(metrics["storage_stats"]["bytes_read"])

    got = wait_until(read_bytes, 30, "disk bytes_read > 0 in GetVmInfo")
    metrics = call.info("fc-disk").body["metrics"]
    assert int(metrics["storage_stats"]["read_operations"]) > 0, metrics
    assert int(metrics["storage_stats"]["bytes_read"]) >= got, "a running total never shrinks"
    assert int(metrics["memory_usage_bytes"]) > 0, metrics
    print(f"\nfc-disk after boot: {metrics}")
    assert_no_refusals(call, "fc-disk")
    pid = vmm_pid(call, "fc-disk")
    call.must("DeleteVm", {"vm_id": "fc-disk", "force": True})
    assert_nothing_left(daemon, "fc-disk", [pid])


# -- 6. both backends on one host -----------------------------------------------------------------


def test_qemu_daemon_adopts_a_firecracker_vm(
    metald_factory: Callable[..., Daemon],
    standin_env: dict[str, str],
    callers: Callable[..., Caller],
) -> None:
    daemon = metald_factory(**standin_env)
    call = callers("curl-connect-json", daemon.url)
    call.must("CreateVm", {"vm_id": "fc-old", "config": SMALL})
    console = boot_and_wait_ready(call, "fc-old")
    pid = vmm_pid(call, "fc-old")
    start = proc_stat(pid)[1]  # type: ignore[index]

    assert daemon.stop() == 0  # VMs live on
    daemon.env["UNKEY_METALD_BACKEND"] = "qemu"
    daemon.start_again()
    call = callers("grpcio", daemon.url)

    info = call.info("fc-old").body
    assert state_name(info["state"]) == "RUNNING", info
    assert int(info["backend_info"]["pid"]) == pid and pid_alive(pid, start)
    assert "api_socket" in info["backend_info"], info["backend_info"]
    call.must("PauseVm", {"vm_id": "fc-old"})
    frozen = console.heartbeats()
    stays(lambda: console.heartbeats() == frozen, 2.0, "no heartbeat while PAUSED")
    call.must("ResumeVm", {"vm_id": "fc-old"})
    wait_until(lambda: console.heartbeats() > frozen, 15, "a heartbeat after ResumeVm")

    # New VMs use the configured backend: QEMU.
    call.must("CreateVm", {"vm_id": "qm-new", "config": SMALL})
    new = call.info("qm-new").body["backend_info"]
    assert "api_socket" not in new and "qmp_socket" in new, new
    rows = daemon.db_rows()
    assert (rows["fc-old"]["backend"], rows["qm-new"]["backend"]) == ("firecracker", "qemu")
    qemu_pid = int(new["pid"])

    call.must("ShutdownVm", {"vm_id": "fc-old", "force": True})
    for vm_id in ("fc-old", "qm-new"):
        call.must("DeleteVm", {"vm_id": vm_id, "force": True})
    assert_nothing_left(daemon, "fc-old", [pid])
    assert not pid_alive(qemu_pid) and not daemon.vm_dir("qm-new").exists()


# -- 7. start-up refusals -------------------------------------------------------------------------


def _run_serve(tmp: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`metald serve` that must stop at start-up (jailed; no network: it never gets that far)."""
    full = {
        **client_env(),
        "UNKEY_METALD_ADDRESS": "127.0.0.1",
        "UNKEY_METALD_PORT": "0",
        "UNKEY_METALD_DATA_DIR": str(tmp / "data"),
        "UNKEY_METALD_ASSETMANAGER_CACHE_DIR": str(ASSETS),
        "UNKEY_METALD_JAILER_CHROOT_DIR": str(tmp / "jail"),
        "UNKEY_METALD_JAILER_CGROUP_PARENT": f"metald-test-{tmp.name}",
        "UNKEY_METALD_NETWORK_ENABLED": "false",
        **env,
    }
    return subprocess.run(
        [str(METALD), "serve"], env=full, capture_output=True, text=True, timeout=120,
        check=False, cwd=tmp, start_new_session=True,
    )  # fmt: skip


@pytest.fixture
def scratch(e2e_root: Path) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="fcr", dir=e2e_root))
    (d / "jail").mkdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_startup_refuses_a_missing_binary(scratch: Path) -> None:
    missing = scratch / "no-such-firecracker"
    out = _run_serve(
        scratch,
        {
            "UNKEY_METALD_BACKEND": "firecracker",
            "UNKEY_METALD_FIRECRACKER_BINARY": str(missing),
            "UNKEY_METALD_FIRECRACKER_SKIP_KVM_CHECK": "true",
        },
    )
    print(f"\nstderr: {out.stderr.strip()}")
    assert out.returncode == 2, out
    assert "UNKEY_METALD_BACKEND=firecracker" in out.stderr, out.stderr
    assert str(missing) in out.stderr and "not found" in out.stderr, out.stderr
    assert "UNKEY_METALD_FIRECRACKER_BINARY" in out.stderr, out.stderr
    assert "github.com/firecracker-microvm/firecracker/releases" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_startup_refuses_without_working_kvm(scratch: Path, standin: Path) -> None:
    probe = probe_kvm_directly(probe_image())
    if probe.works:
        pytest.skip("KVM runs guests on this host: the KVM refusal cannot be shown here")
    out = _run_serve(
        scratch,
        {"UNKEY_METALD_BACKEND": "firecracker", "UNKEY_METALD_FIRECRACKER_BINARY": str(standin)},
    )
    print(f"\nstderr: {out.stderr.strip()}")
    assert out.returncode == 2, out
    assert "UNKEY_METALD_BACKEND=firecracker" in out.stderr, out.stderr
    assert "Firecracker needs working KVM" in out.stderr, out.stderr
    assert "UNKEY_METALD_FIRECRACKER_SKIP_KVM_CHECK=true" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


# -- 8. a real Firecracker, API only ------------------------------------------------------------


def test_a_real_firecracker_takes_what_the_daemon_configures(
    metald_factory: Callable[..., Daemon], callers: Callable[..., Caller]
) -> None:
    """The daemon with a real `firecracker` on PATH (jailed as always): CreateVm configures
    it (a NIC with rate limits) and nothing is refused; BootVm's InstanceStart is
    taken, pause and resume too. Needs no working KVM guest, so no guest is looked at: where
    KVM can run one, the tests above run against the real binary as well."""
    daemon = metald_factory(
        UNKEY_METALD_BACKEND="firecracker",
        UNKEY_METALD_FIRECRACKER_BINARY=real_firecracker_binary(),
        UNKEY_METALD_FIRECRACKER_SKIP_KVM_CHECK="true",
    )
    call = callers("grpcio", daemon.url)
    nic = {
        **NIC,
        "rx_rate_limit": {"bandwidth": 2 * MIB},
        "tx_rate_limit": {"bandwidth": MIB, "burst": 64 * 1024},
    }
    call.must("CreateVm", {"vm_id": "fc-real", "config": {**SMALL, "network": [nic]}})
    info = call.info("fc-real").body
    backend = info["backend_info"]
    assert fc_api(backend, "/")["state"] == "Not started"
    config = fc_api(backend, "/vm/config")
    assert config["machine-config"]["mem_size_mib"] == 128, config
    [iface] = config["network-interfaces"]
    assert iface["host_dev_name"] == info["network_info"]["tap_device"], iface
    assert _bucket(iface, "rx") == {"size": 2 * MIB, "refill_time": 1000}, iface
    assert _bucket(iface, "tx") == {"size": MIB, "refill_time": 1000, "one_time_burst": 64 * 1024}
    assert_no_refusals(call, "fc-real")

    booted = call.must("BootVm", {"vm_id": "fc-real"})
    assert state_name(booted.body["state"]) == "RUNNING"
    assert fc_api(backend, "/")["state"] == "Running"
    call.must("PauseVm", {"vm_id": "fc-real"})
    assert fc_api(backend, "/")["state"] == "Paused"
    call.must("ResumeVm", {"vm_id": "fc-real"})
    assert fc_api(backend, "/")["state"] == "Running"
    assert_no_refusals(call, "fc-real")

    pid = vmm_pid(call, "fc-real")
    call.must("DeleteVm", {"vm_id": "fc-real", "force": True})
    assert_nothing_left(daemon, "fc-real", [pid])

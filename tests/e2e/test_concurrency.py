"""Many callers at once: parallel creates and boots, then a storm of conflicting operations on
one VM. Every answer is ok or failed_precondition, and the recorded state matches the host."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from ._support import (
    MIB,
    Caller,
    Daemon,
    cpu_ticks,
    pid_alive,
    proc_state,
    qemu_processes,
    state_name,
    stays,
    wait_pid_gone,
    wait_until,
)

pytestmark = pytest.mark.guest

N_VMS = 8
N_OPS = 50
SMALL = {"memory": {"size_bytes": 128 * MIB}}


def _vm_qemus(daemon: Daemon, vm_id: str) -> dict[int, str]:
    return qemu_processes(f"{daemon.data_dir}/vms/{vm_id}/")


def test_parallel_boots_then_conflicting_operations(
    daemon: Daemon, callers: Callable[..., Caller]
) -> None:
    g = callers("grpcio", daemon.url)
    c = callers("curl-connect-json", daemon.url)
    ids = [f"par-{i}" for i in range(N_VMS)]

    # -- 8 VMs created and booted in parallel (half over gRPC, half over Connect JSON) ----
    start = threading.Barrier(N_VMS)

    def create_and_boot(i: int) -> tuple[str, str]:
        call = g if i % 2 else c
        start.wait(timeout=30)
        created = call("CreateVm", {"vm_id": ids[i], "config": SMALL})
        if not created.ok:
            return "create", repr(created)
        booted = call("BootVm", {"vm_id": ids[i]})
        return ("ok", "") if booted.ok else ("boot", repr(booted))

    with ThreadPoolExecutor(N_VMS) as pool:
        outcomes = list(pool.map(create_and_boot, range(N_VMS)))
    failed = [(ids[i], o) for i, o in enumerate(outcomes) if o != ("ok", "")]
    assert not failed, f"parallel create+boot failed: {failed}"
    pids = {}
    for vm_id in ids:
        info = g.info(vm_id)
        assert state_name(info.body["state"]) == "RUNNING", info
        pids[vm_id] = int(info.body["backend_info"]["pid"])
        assert pid_alive(pids[vm_id])
        assert list(_vm_qemus(daemon, vm_id)) == [pids[vm_id]], "one QEMU per VM"
    assert len(set(pids.values())) == N_VMS
    listed = g.must("ListVms", {"state_filter": ["VM_STATE_RUNNING"]})
    assert sorted(v["vm_id"] for v in listed.body["vms"]) == sorted(ids)
    assert listed.body["total_count"] == N_VMS

    # Keep one; delete the others in parallel (frees the two CPUs for what follows).
    target, others = ids[0], ids[1:]
    with ThreadPoolExecutor(len(others)) as pool:
        deleted = list(pool.map(lambda v: g("DeleteVm", {"vm_id": v, "force": True}), others))
    assert all(r.ok for r in deleted), deleted
    for vm_id in others:
        wait_pid_gone(pids[vm_id])

    # -- 50 conflicting operations on one VM at once --------------------------------------
    kinds: list[tuple[str, dict[str, Any]]] = [
        ("PauseVm", {}),
        ("ResumeVm", {}),
        ("RebootVm", {}),
        ("BootVm", {}),
        ("ShutdownVm", {"force": True}),
    ]
    ops = [kinds[i % len(kinds)] for i in range(N_OPS)]
    random.Random(1234).shuffle(ops)
    go = threading.Barrier(N_OPS)

    def run(i: int) -> tuple[str, str, Any]:
        method, extra = ops[i]
        call = g if i % 2 else c
        go.wait(timeout=30)
        return method, call(method, {"vm_id": target, **extra}).code, None

    t0 = time.monotonic()
    with ThreadPoolExecutor(N_OPS) as pool:
        results = list(pool.map(run, range(N_OPS)))
    storm = time.monotonic() - t0
    codes = Counter((m, code) for m, code, _ in results)
    unexpected = {k: n for k, n in codes.items() if k[1] not in ("ok", "failed_precondition")}
    assert not unexpected, f"answers other than ok/failed_precondition: {unexpected} (all: {codes})"
    assert any(code == "ok" for _, code, _ in results), codes
    print(f"{N_OPS} conflicting operations in {storm:.1f}s: {dict(codes)}")

    # -- the recorded state is one the state machine allows, and it is the real one -------
    info = g.info(target)
    state = state_name(info.body["state"])
    assert state in ("RUNNING", "PAUSED", "SHUTDOWN"), info
    assert daemon.db_rows()[target]["state"] == state
    procs = _vm_qemus(daemon, target)
    if state == "SHUTDOWN":
        assert not procs, f"SHUTDOWN but QEMU processes remain: {procs}"
        assert "pid" not in info.body["backend_info"] or not pid_alive(
            int(info.body["backend_info"]["pid"])
        )
        follow_up, expect = "BootVm", "RUNNING"
    else:
        pid = int(info.body["backend_info"]["pid"])
        assert list(procs) == [pid], f"{state}: expected exactly QEMU {pid}, found {procs}"
        assert proc_state(pid) in ("R", "S", "D"), f"QEMU {pid} is {proc_state(pid)}"
        console = Path(info.body["backend_info"]["console_log"])
        size = console.stat().st_size
        if state == "PAUSED":
            # A paused guest executes nothing: its VMM uses (almost) no CPU, and the console
            # does not grow.
            before = cpu_ticks(pid)
            stays(lambda: console.stat().st_size == size, 2.0, "a silent console while PAUSED")
            used = cpu_ticks(pid) - before
            assert used <= 20, f"PAUSED but QEMU used {used} ticks of CPU in 2 s"
            follow_up, expect = "ResumeVm", "RUNNING"
        else:
            # A running guest is booting or beating its heart: either way it writes.
            wait_until(
                lambda: console.stat().st_size > size, 60, "console output from a RUNNING VM"
            )
            follow_up, expect = "PauseVm", "PAUSED"
    # And the VM still works afterwards.
    after = g.must(follow_up, {"vm_id": target})
    assert state_name(after.body["state"]) == expect
    assert state_name(g.info(target).body["state"]) == expect

    g.must("DeleteVm", {"vm_id": target, "force": True})
    assert not daemon.qemu_pids()
    assert daemon.vm_dirs() == set()

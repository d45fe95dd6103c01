"""The largest valid requests are accepted and work: validation must not refuse what the
contract allows, and what it allows must really run."""

from __future__ import annotations

import os
import re
from collections.abc import Callable

import pytest

from ._support import MIB, ApiConsole, Caller, Daemon, pid_alive, state_name, wait_until

HOST_CORES = os.cpu_count() or 1


def test_largest_valid_config_is_accepted(daemon: Daemon, callers: Callable[..., Caller]) -> None:
    call = callers("curl-connect-json", daemon.url)
    metadata = {f"key-{i}": "v" for i in range(63)}
    metadata["k" * 128] = "v" * 1024  # longest key, longest value; 64 entries in all
    created = call(
        "CreateVm",
        {
            "vm_id": "largest",
            "config": {
                "cpu": {"vcpu_count": min(HOST_CORES, 32)},
                "memory": {"size_bytes": 128 * MIB},  # the smallest allowed
                "metadata": metadata,
            },
        },
    )
    assert created.ok, f"the largest valid CreateVm was refused: {created!r}"
    info = call.info("largest")
    assert info.body["config"]["metadata"] == metadata
    assert int(info.body["config"]["cpu"]["vcpu_count"]) == min(HOST_CORES, 32)
    booted = call.must("BootVm", {"vm_id": "largest"})
    assert state_name(booted.body["state"]) == "RUNNING"
    assert pid_alive(int(call.info("largest").body["backend_info"]["pid"]))
    [listed] = call.must("ListVms", {"page_size": 1000}).body["vms"]
    assert listed["metadata"] == metadata
    call.must("DeleteVm", {"vm_id": "largest", "force": True})


def test_longest_vm_id_works_or_is_refused_clearly(
    daemon: Daemon, callers: Callable[..., Caller]
) -> None:
    """A 64-character id is valid. It names the per-VM directory, so the paths in it (the QMP
    socket: at most 107 bytes for a Unix socket) get long. Under a long data directory (this
    suite's, below the pytest temp dir) metald may refuse such an id, but as invalid_argument
    naming vm_id (the caller can pick a shorter one), never as `internal`; a shorter id works."""
    call = callers("curl-connect-json", daemon.url)
    vm_id = "z" * 64
    created = call("CreateVm", {"vm_id": vm_id})
    if not created.ok:
        assert created.code == "invalid_argument" and "vm_id" in created.message, (
            f"CreateVm with a valid 64-character vm_id (data dir {daemon.data_dir}, "
            f"{len(str(daemon.data_dir))} bytes) failed: {created!r}"
        )
        assert daemon.vm_dirs() == set() and not daemon.qemu_pids()
        print(f"64-character id refused under this data dir: {created.message}")
        vm_id = "z" * 32
        call.must("CreateVm", {"vm_id": vm_id})
    call.must("BootVm", {"vm_id": vm_id})
    assert pid_alive(int(call.info(vm_id).body["backend_info"]["pid"]))
    call.must("DeleteVm", {"vm_id": vm_id, "force": True})


def test_paging_walks_every_vm_once(daemon: Daemon, callers: Callable[..., Caller]) -> None:
    call = callers("grpcio", daemon.url)
    ids = {call.must("CreateVm", {}).body["vm_id"] for _ in range(5)}
    seen: list[str] = []
    token = ""
    for _ in range(10):
        page = call.must("ListVms", {"page_size": 2, "page_token": token})
        assert len(page.body["vms"]) <= 2
        assert page.body["total_count"] == 5
        seen += [v["vm_id"] for v in page.body["vms"]]
        token = page.body["next_page_token"]
        if not token:
            break
    assert sorted(seen) == sorted(ids), "each VM exactly once over the pages"
    for vm_id in ids:
        call.must("DeleteVm", {"vm_id": vm_id})


@pytest.mark.guest
def test_longest_kernel_args_keep_metalds_own(
    daemon: Daemon, callers: Callable[..., Caller]
) -> None:
    """kernel_args may be 1024 bytes; metald adds its own arguments (console=, metald.vm_id=)
    to them. The guest must still get those: it reports its id in the READY line."""
    call = callers("grpcio", daemon.url)
    args = ("quiet " + "x" * 1024)[:1024]
    vm_id = call.must("CreateVm", {"config": {"boot": {"kernel_args": args}}}).body["vm_id"]
    console = ApiConsole(call, vm_id)
    call.must("BootVm", {"vm_id": vm_id})
    try:
        wait_until(
            lambda: console.ready_count() >= 1 or "Kernel panic" in console.text(),
            60,
            "READY (or a panic) on the console",
        )
        ready = re.search(r"METALD-GUEST READY vm=(\S*)", console.text())
        assert ready and ready.group(1) == vm_id, (
            "the guest did not get metald's own kernel arguments; console:\n" + console.tail()
        )
    finally:
        call.must("DeleteVm", {"vm_id": vm_id, "force": True})

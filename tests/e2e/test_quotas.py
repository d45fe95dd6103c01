"""Quotas and host admission through the real API of a real daemon: concurrent CreateVm of
one customer stop exactly at its quota, concurrent BootVm at its running quota (overrides
set with `metald quota set` on the daemon's database while it runs), the host's memory
ceiling, per-VM maxima and the rate-limit cap. Every refusal is resource_exhausted (quotas,
ceiling) or invalid_argument (per-VM maxima) naming what refused it, and leaves no VMM."""

from __future__ import annotations

import json
import subprocess
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from ._support import ASSETS, METALD, MIB, Caller, Daemon, Reply, state_name

SMALL = {"memory": {"size_bytes": 128 * MIB}}


def quota_cli(daemon: Daemon, *args: str) -> str:
    """`metald quota ARGS` as the operator runs it: on the host, with the daemon's settings."""
    done = subprocess.run(
        [str(METALD), "quota", *args],
        env=daemon.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, f"metald quota {args}: {done.stderr}"
    return done.stdout


def at_once(calls: list[Callable[[], Reply]]) -> list[Reply]:
    start = threading.Barrier(len(calls))

    def run(call: Callable[[], Reply]) -> Reply:
        start.wait(timeout=30)
        return call()

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


def live_rows(daemon: Daemon) -> dict[str, dict[str, Any]]:
    return {k: r for k, r in daemon.db_rows().items() if r["deleted_at"] is None}


def test_concurrent_creates_stop_exactly_at_the_customers_quota(
    metald_factory: Callable[..., Daemon], callers: Callable[..., Caller]
) -> None:
    daemon = metald_factory(UNKEY_METALD_QUOTA_VMS="100")
    quota_cli(daemon, "set", "acme", "--vms", "3")
    g = callers("grpcio", daemon.url)
    c = callers("curl-connect-json", daemon.url)
    ids = [f"q-{i}" for i in range(10)]

    def create(i: int) -> Callable[[], Reply]:
        return lambda: (g if i % 2 else c)("CreateVm", {"vm_id": ids[i], "config": SMALL})

    replies = at_once([create(i) for i in range(10)])
    codes = Counter(r.code for r in replies)
    assert codes == {"ok": 3, "resource_exhausted": 7}, replies
    for r in replies:
        if not r.ok:
            assert "quota vms is 3" in r.message, r
    made = sorted(r.body["vm_id"] for r in replies if r.ok)
    assert sorted(live_rows(daemon)) == made
    assert len(daemon.qemu_pids()) == 3, "one VMM per admitted VM, none for the refused"
    assert daemon.vm_dirs() == set(made)
    used = json.loads(quota_cli(daemon, "get", "acme", "--json"))["quotas"]["vms"]
    assert used == {"limit": 3, "source": "override", "used": 3}

    # Another customer has its own quota (the default); a deleted VM frees its place.
    other = callers("grpcio", daemon.url, "dev_customer_globex")
    other.must("CreateVm", {"vm_id": "globex-1", "config": SMALL})
    g.must("DeleteVm", {"vm_id": made[0]})
    g.must("CreateVm", {"vm_id": "q-again", "config": SMALL})
    assert g("CreateVm", {"config": SMALL}).code == "resource_exhausted"
    for vm_id in [*made[1:], "q-again"]:
        g.must("DeleteVm", {"vm_id": vm_id})
    other.must("DeleteVm", {"vm_id": "globex-1"})
    assert not daemon.qemu_pids()


@pytest.mark.guest
def test_concurrent_boots_stop_exactly_at_the_running_quota(
    daemon: Daemon, callers: Callable[..., Caller]
) -> None:
    g = callers("grpcio", daemon.url)
    ids = [f"b-{i}" for i in range(3)]
    for vm_id in ids:
        g.must("CreateVm", {"vm_id": vm_id, "config": SMALL})
        g.must("BootVm", {"vm_id": vm_id})
        g.must("ShutdownVm", {"vm_id": vm_id, "force": True})
    assert not daemon.qemu_pids()
    quota_cli(daemon, "set", "acme", "--running-vms", "2")
    replies = at_once([lambda v=vm_id: g("BootVm", {"vm_id": v}) for vm_id in ids])  # type: ignore[misc]
    codes = Counter(r.code for r in replies)
    assert codes == {"ok": 2, "resource_exhausted": 1}, replies
    [refusal] = [r for r in replies if not r.ok]
    assert "quota running_vms is 2" in refusal.message
    states = {vm_id: g.state(vm_id) for vm_id in ids}
    assert Counter(states.values()) == {"RUNNING": 2, "SHUTDOWN": 1}, states
    assert len(daemon.qemu_pids()) == 2
    # A new VM needs a VMM too (CREATED holds one): refused while two run.
    created = g("CreateVm", {"config": SMALL})
    assert created.code == "resource_exhausted" and "running_vms" in created.message
    # Shut one down: the SHUTDOWN one boots now.
    [running, *_] = [v for v, s in states.items() if s == "RUNNING"]
    [down] = [v for v, s in states.items() if s == "SHUTDOWN"]
    g.must("ShutdownVm", {"vm_id": running, "force": True})
    assert state_name(g.must("BootVm", {"vm_id": down}).body["state"]) == "RUNNING"
    for vm_id in ids:
        g.must("DeleteVm", {"vm_id": vm_id, "force": True})
    assert not daemon.qemu_pids()


def test_the_host_memory_ceiling_and_per_vm_maxima(
    metald_factory: Callable[..., Daemon], callers: Callable[..., Caller]
) -> None:
    daemon = metald_factory(
        UNKEY_METALD_HOST_MEMORY_BYTES=str(512 * MIB),
        UNKEY_METALD_MAX_DISKS="1",
        UNKEY_METALD_MAX_DISK_BYTES="1000000",
        UNKEY_METALD_NETWORK_RATE_LIMIT_MAX_MBPS="100",
    )
    acme = callers("curl-connect-json", daemon.url)
    globex = callers("grpcio", daemon.url, "dev_customer_globex")
    # Per VM at most the host's ceiling (MAX_MEMORY_BYTES unset): invalid_argument.
    big = acme("CreateVm", {"config": {"memory": {"size_bytes": 640 * MIB}}})
    assert big.code == "invalid_argument" and "size_bytes" in big.message, big
    initrd = json.loads((ASSETS / "default.json").read_text())["initrd"]  # an asset id
    [blob] = (ASSETS / "blobs" / "sha256").glob(f"{initrd.removeprefix('sha256-')}*")
    disks = [{"id": f"d{i}", "path": initrd, "read_only": True} for i in range(2)]
    two = acme("CreateVm", {"config": {**SMALL, "storage": disks}})
    assert two.code == "invalid_argument" and "at most 1 devices" in two.message, two
    large = acme("CreateVm", {"config": {**SMALL, "storage": disks[:1]}})
    assert large.code == "invalid_argument", large
    assert f"the image is {blob.stat().st_size} bytes" in large.message
    assert "maximum is 1000000 bytes" in large.message
    fast = {"id": "eth0", "rx_rate_limit": {"bandwidth": str(100_000_000 // 8 + 1)}}
    too_fast = acme("CreateVm", {"config": {**SMALL, "network": [fast]}})
    assert too_fast.code == "invalid_argument", too_fast
    assert "rx_rate_limit.bandwidth" in too_fast.message and "at most 12500000" in too_fast.message
    # The ceiling is shared by every customer's live VMs.
    half = {"memory": {"size_bytes": 256 * MIB}}
    acme.must("CreateVm", {"vm_id": "h-1", "config": half})
    globex.must("CreateVm", {"vm_id": "h-2", "config": half})
    full = acme("CreateVm", {"vm_id": "h-3", "config": SMALL})
    assert full.code == "resource_exhausted", full
    assert f"ceiling on committed memory_bytes is {512 * MIB}" in full.message
    assert "h-3" not in daemon.db_rows() and len(daemon.qemu_pids()) == 2
    globex.must("DeleteVm", {"vm_id": "h-2"})
    acme.must("CreateVm", {"vm_id": "h-3", "config": SMALL})
    for vm_id in ("h-1", "h-3"):
        acme.must("DeleteVm", {"vm_id": vm_id})
    assert not daemon.qemu_pids()

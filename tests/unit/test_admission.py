"""Admission through VmService on the port fakes: each quota refuses CreateVm or BootVm with
resource_exhausted naming it and its value, and changes nothing; what counts in which state;
the host ceiling; per-VM maxima and the rate-limit cap (invalid_argument); claims released
when a create fails or a VM is deleted, holds ended when a boot fails; concurrent creates and
boots never overshoot, also while the admitted ones are still starting."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from fakes import FakeAssets, FakeBackend, FakeNetwork, MemoryQuotas, MemoryStore
from fakes.assets import ROOT
from fakes.quotas import ROOMY_HOST, ROOMY_MAXIMA, FakeClaim, fake_admission

from metald.core.errors import BackendError, InvalidArgument, MetaldError, ResourceExhausted
from metald.core.identity import customer
from metald.core.models import DiskConfig, NetworkInterface, RateLimit, VmConfig
from metald.core.quotas import (
    Claim,
    HostCeiling,
    QuotaDefaults,
    QuotaExceeded,
    Resource,
    VmMaxima,
)
from metald.core.states import VmState
from metald.core.validation import Limits
from metald.service.vm_service import VmService

R = Resource
S = VmState
MIB, GIB = 1024**2, 1024**3
ALICE, BOB = "alice", "bob"
T = TypeVar("T")


@dataclass
class World:
    store: MemoryStore
    quotas: MemoryQuotas
    backend: FakeBackend
    network: FakeNetwork
    service: VmService


async def world(
    defaults: dict[Resource, int | None] | None = None,
    host: HostCeiling = ROOMY_HOST,
    maxima: VmMaxima = ROOMY_MAXIMA,
    disk_sizes: dict[Path, int] | None = None,
    store: MemoryStore | None = None,
    quotas: MemoryQuotas | None = None,
) -> World:
    store = store or MemoryStore()
    quotas = quotas or MemoryQuotas(store)
    backend, network = FakeBackend("fake"), FakeNetwork()
    clock = itertools.count(1_700_000_000)
    service = VmService(
        store,
        {"fake": backend},
        FakeAssets({"images/root.ext4", "images/data.img", "images/big.img"}),
        network,
        Limits(max_vcpus=8, max_memory_bytes=16 * GIB),
        admission=fake_admission(
            quotas, QuotaDefaults(defaults or {}), host, maxima, disk_sizes=disk_sizes
        ),
        clock=lambda: float(next(clock)),
    )
    await service.start()
    return World(store, quotas, backend, network, service)


async def refused(call: Awaitable[Any]) -> QuotaExceeded:
    with pytest.raises(QuotaExceeded) as caught:
        await call
    assert caught.value.code == "resource_exhausted"
    return caught.value


def small(vcpus: int = 1, memory: int = 128 * MIB, **kw: Any) -> VmConfig:
    return VmConfig(vcpu_count=vcpus, memory_bytes=memory, **kw)


def assert_clean(w: World, vm_id: str) -> None:
    """A refused or failed create left nothing: no row, no VMM, no network, no claim."""
    assert vm_id not in w.store.rows
    assert vm_id not in w.backend.vmms
    assert vm_id not in w.network.networks
    assert vm_id not in w.quotas.claims


# --- each quota ----------------------------------------------------------------------------


async def test_total_vms_counts_every_state_until_deleted() -> None:
    w = await world({R.VMS: 2})
    await w.service.create_vm(customer(ALICE), "a", small())
    await w.service.create_vm(customer(ALICE), "b", small())
    await w.service.boot_vm(customer(ALICE), "b")
    await w.service.shutdown_vm(customer(ALICE), "b")  # a shut-down VM still exists
    err = await refused(w.service.create_vm(customer(ALICE), "c", small()))
    assert (err.resource, err.limit, err.scope) == (R.VMS, 2, "customer")
    assert "quota vms is 2" in err.message
    assert_clean(w, "c")
    await w.service.create_vm(customer(BOB), "bob-1", small())  # another customer's own quota
    await w.service.delete_vm(customer(ALICE), "b")
    assert "b" not in w.quotas.claims
    await w.service.create_vm(customer(ALICE), "c", small())


async def test_running_vms_counts_created_running_paused_not_shutdown() -> None:
    w = await world({R.RUNNING_VMS: 2})
    await w.service.create_vm(customer(ALICE), "a", small())  # CREATED: its VMM is alive
    await w.service.create_vm(customer(ALICE), "b", small())
    await w.service.boot_vm(customer(ALICE), "b")
    await w.service.pause_vm(customer(ALICE), "b")
    err = await refused(w.service.create_vm(customer(ALICE), "c", small()))
    assert (err.resource, err.limit) == (R.RUNNING_VMS, 2)
    await w.service.boot_vm(customer(ALICE), "a")  # CREATED -> RUNNING takes nothing new
    await w.service.shutdown_vm(customer(ALICE), "a")
    await w.service.create_vm(customer(ALICE), "c", small())  # a's VMM is gone: room for one
    err = await refused(w.service.boot_vm(customer(ALICE), "a"))  # a boot from SHUTDOWN needs one
    assert (err.resource, err.limit) == (R.RUNNING_VMS, 2)
    assert w.store.rows["a"].state is S.SHUTDOWN and "a" not in w.backend.vmms
    await w.service.delete_vm(customer(ALICE), "c", force=True)
    booted = await w.service.boot_vm(customer(ALICE), "a")
    assert booted.state is S.RUNNING


async def test_vcpus_and_memory_sum_over_live_vms() -> None:
    w = await world({R.VCPUS: 4, R.MEMORY_BYTES: 1 * GIB})
    await w.service.create_vm(customer(ALICE), "a", small(vcpus=3, memory=512 * MIB))
    err = await refused(w.service.create_vm(customer(ALICE), "b", small(vcpus=2)))
    assert (err.resource, err.limit) == (R.VCPUS, 4)
    assert "3 in use, this VM needs 2 more" in err.message
    err = await refused(w.service.create_vm(customer(ALICE), "b", small(memory=640 * MIB)))
    assert (err.resource, err.limit) == (R.MEMORY_BYTES, GIB)
    await w.service.create_vm(
        customer(ALICE), "b", small(vcpus=1, memory=512 * MIB)
    )  # exactly full
    await w.service.boot_vm(customer(ALICE), "a")
    await w.service.shutdown_vm(customer(ALICE), "a")
    await w.service.create_vm(customer(ALICE), "c", small(vcpus=3, memory=512 * MIB))
    err = await refused(w.service.boot_vm(customer(ALICE), "a"))
    assert err.resource is R.VCPUS


async def test_disk_bytes_count_writable_disks_only() -> None:
    sizes = {ROOT / "images/root.ext4": 3 * GIB, ROOT / "images/data.img": 2 * GIB}
    w = await world({R.DISK_BYTES: 5 * GIB}, disk_sizes=sizes)
    shared = DiskConfig(id="ro", path="images/data.img", read_only=True)
    root = DiskConfig(id="root", path="images/root.ext4", is_root_device=True)
    await w.service.create_vm(customer(ALICE), "a", small(storage=(root, shared)))  # 3 GiB counted
    err = await refused(w.service.create_vm(customer(ALICE), "b", small(storage=(root,))))
    assert (err.resource, err.limit) == (R.DISK_BYTES, 5 * GIB)
    assert_clean(w, "b")
    data = DiskConfig(id="data", path="images/data.img")
    await w.service.create_vm(customer(ALICE), "b", small(storage=(data, shared)))  # 2 GiB: full
    await w.service.boot_vm(customer(ALICE), "b")
    await w.service.shutdown_vm(customer(ALICE), "b")  # its disks stay: still counted
    await refused(w.service.create_vm(customer(ALICE), "c", small(storage=(data,))))
    await w.service.create_vm(customer(ALICE), "c", small())  # no disks: no disk bytes


async def test_an_override_beats_the_default_and_none_is_unlimited() -> None:
    w = await world({R.VMS: 1})
    await w.quotas.set_override(ALICE, R.VMS, None)
    await w.quotas.set_override(BOB, R.VMS, 0)
    for i in range(3):
        await w.service.create_vm(customer(ALICE), f"a-{i}", small())
    err = await refused(w.service.create_vm(customer(BOB), "b-0", small()))
    assert (err.resource, err.limit) == (R.VMS, 0)


# --- the host ----------------------------------------------------------------------------


async def test_the_host_ceiling_counts_every_customers_live_vms() -> None:
    w = await world(host=HostCeiling(memory_bytes=1 * GIB, vcpus=3))
    await w.service.create_vm(customer(ALICE), "a", small(vcpus=2, memory=512 * MIB))
    err = await refused(w.service.create_vm(customer(BOB), "b", small(vcpus=2)))
    assert (err.scope, err.resource, err.limit) == ("host", R.VCPUS, 3)
    assert "this host's ceiling on committed vcpus is 3" in err.message
    err = await refused(w.service.create_vm(customer(BOB), "b", small(memory=640 * MIB)))
    assert (err.scope, err.resource) == ("host", R.MEMORY_BYTES)
    await w.service.create_vm(customer(BOB), "b", small(vcpus=1, memory=512 * MIB))
    await w.service.boot_vm(customer(ALICE), "a")
    await w.service.shutdown_vm(customer(ALICE), "a")  # frees the host as well
    await w.service.create_vm(customer(BOB), "c", small(vcpus=2, memory=512 * MIB))
    err = await refused(w.service.boot_vm(customer(ALICE), "a"))
    assert err.scope == "host"


# --- per-VM maxima and rate limits (invalid_argument: never fits on this host) -------------


async def test_per_vm_disk_maxima_are_invalid_argument() -> None:
    sizes = {ROOT / "images/big.img": 2 * GIB}
    w = await world(maxima=VmMaxima(disks=1, disk_bytes=1 * GIB), disk_sizes=sizes)
    two = tuple(DiskConfig(id=f"d{i}", path="images/data.img") for i in range(2))
    with pytest.raises(InvalidArgument) as caught:
        await w.service.create_vm(customer(ALICE), "a", small(storage=two))
    assert caught.value.field == "config.storage" and "at most 1" in caught.value.message
    big = (DiskConfig(id="big", path="images/big.img", read_only=True),)
    with pytest.raises(InvalidArgument) as caught:
        await w.service.create_vm(customer(ALICE), "a", small(storage=big))
    assert caught.value.field == "config.storage[0].path"
    assert str(GIB) in caught.value.message
    assert_clean(w, "a")
    await w.service.create_vm(customer(ALICE), "a", small(storage=two[:1]))  # 64 MiB, one disk


@pytest.mark.parametrize("direction", ["rx", "tx"])
async def test_rate_limits_above_the_operators_maximum_are_refused(direction: str) -> None:
    cap = 125_000_000  # 1000 Mbit/s
    w = await world(maxima=VmMaxima(disks=8, disk_bytes=GIB, rate_limit_bandwidth=cap))

    def nic(bandwidth: int) -> VmConfig:
        limit = RateLimit(bandwidth=bandwidth)
        return small(network=(NetworkInterface(id="eth0", **{f"{direction}_rate_limit": limit}),))

    with pytest.raises(InvalidArgument) as caught:
        await w.service.create_vm(customer(ALICE), "a", nic(cap + 1))
    assert caught.value.field == f"config.network[0].{direction}_rate_limit.bandwidth"
    assert f"at most {cap} bytes/s" in caught.value.message
    assert_clean(w, "a")
    vm = await w.service.create_vm(
        customer(ALICE), "a", nic(cap)
    )  # at the cap: as asked, not clamped
    assert getattr(vm.config.network[0], f"{direction}_rate_limit").bandwidth == cap
    assert getattr(w.network.networks["a"].nic, f"{direction}_rate_limit").bandwidth == cap
    await w.service.create_vm(customer(ALICE), "b", small(network=(NetworkInterface(id="eth0"),)))


# --- failures undo their claim ------------------------------------------------------------


async def test_a_failed_create_releases_its_claim() -> None:
    w = await world({R.VMS: 1})
    w.backend.faults.fail("create", BackendError("the VMM would not start"))
    with pytest.raises(BackendError):
        await w.service.create_vm(customer(ALICE), "a", small())
    assert_clean(w, "a")
    await w.service.create_vm(customer(ALICE), "b", small())  # the quota's one VM is still free


async def test_a_failed_boot_ends_its_hold() -> None:
    w = await world({R.RUNNING_VMS: 1})
    await w.service.create_vm(customer(ALICE), "a", small())
    await w.service.boot_vm(customer(ALICE), "a")
    await w.service.shutdown_vm(customer(ALICE), "a")
    w.backend.faults.fail("boot", BackendError("no"))
    with pytest.raises(BackendError):
        await w.service.boot_vm(customer(ALICE), "a")
    assert not w.quotas.claims["a"].held
    await w.service.create_vm(customer(ALICE), "b", small())  # a holds nothing: room for b


async def test_a_store_failure_in_the_admission_changes_nothing() -> None:
    w = await world({R.VMS: 5})
    w.quotas.faults.fail("admit", MetaldError("database gone"))
    with pytest.raises(MetaldError, match="database gone"):
        await w.service.create_vm(customer(ALICE), "a", small())
    assert_clean(w, "a")


async def test_start_sweeps_claims_a_crash_left() -> None:
    store = MemoryStore()
    quotas = MemoryQuotas(store)
    first = await world({R.VMS: 1}, store=store, quotas=quotas)
    await first.service.create_vm(customer(ALICE), "a", small())
    await first.service.delete_vm(customer(ALICE), "a")
    # A create cut short after its admission: a claim with no VM row behind it.
    quotas.claims["lost"] = FakeClaim(ALICE, Claim(1, 128 * MIB, 0), held=True)
    second = await world({R.VMS: 1}, store=store, quotas=quotas)
    assert "lost" not in quotas.claims
    await second.service.create_vm(customer(ALICE), "b", small())


# --- concurrency --------------------------------------------------------------------------


async def _settled(tasks: list[asyncio.Task[T]], count: int) -> None:
    """Let the event loop run until `count` of the tasks are done (no clock involved)."""
    for _ in range(10_000):
        if sum(t.done() for t in tasks) >= count:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"only {sum(t.done() for t in tasks)} of {count} calls finished")


async def test_concurrent_creates_never_overshoot_while_the_admitted_are_starting() -> None:
    w = await world({R.VMS: 3})
    gate = w.backend.faults.gate("create")  # the admitted creates wait inside their VMM start
    tasks = [
        asyncio.create_task(w.service.create_vm(customer(ALICE), f"vm-{i}", small()))
        for i in range(10)
    ]
    await _settled(tasks, 7)  # the 7 refused finish while 3 are still starting
    refusals = [t.exception() for t in tasks if t.done()]
    assert all(isinstance(e, ResourceExhausted) and "quota vms is 3" in str(e) for e in refusals)
    gate.release()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    created = [r for r in results if not isinstance(r, BaseException)]
    assert len(created) == 3
    assert sorted(w.store.live()) == sorted(r.id for r in created)
    assert set(w.backend.vmms) == set(w.store.live())


async def test_concurrent_boots_never_overshoot_the_running_quota() -> None:
    w = await world({R.RUNNING_VMS: 5})
    for i in range(5):
        await w.service.create_vm(customer(ALICE), f"vm-{i}", small())
        await w.service.boot_vm(customer(ALICE), f"vm-{i}")
        await w.service.shutdown_vm(customer(ALICE), f"vm-{i}")
    await w.quotas.set_override(ALICE, R.RUNNING_VMS, 2)
    gate = w.backend.faults.gate("boot")
    tasks = [asyncio.create_task(w.service.boot_vm(customer(ALICE), f"vm-{i}")) for i in range(5)]
    await _settled(tasks, 3)
    assert all(isinstance(t.exception(), QuotaExceeded) for t in tasks if t.done())
    gate.release()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    booted = [r for r in results if not isinstance(r, BaseException)]
    assert len(booted) == 2
    running = {k for k, r in w.store.live().items() if r.state is S.RUNNING}
    assert running == {r.id for r in booted} == set(w.backend.vmms)
    assert not any(c.held for c in w.quotas.claims.values())

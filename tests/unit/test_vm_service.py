"""VmService against in-memory fakes of every port (tests/fakes): the state machine for every
operation and state, ownership, ids, the undo of each failing step of CreateVm, the exit
callback, adoption at start, backends that are not configured, routing between two backends,
and a property: no sequence of operations leaves the backend and the store disagreeing.

The fakes refuse what a real VMM would (pausing a VM that is not running, creating one twice),
so a service that called its backend out of turn fails here with a BackendError.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from fakes import FakeAssets, FakeBackend, FakeNetwork, MemoryQuotas, MemoryStore
from fakes.quotas import fake_admission
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metald.core.errors import (
    AlreadyExists,
    BackendError,
    FailedPrecondition,
    InvalidArgument,
    MetaldError,
    NotFound,
    NotYours,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from metald.core.identity import customer
from metald.core.models import (
    DiskConfig,
    NetworkInterface,
    NetworkMode,
    ProcessIdentity,
    VmConfig,
    VmRecord,
)
from metald.core.quotas import QuotaDefaults, QuotaExceeded, Resource
from metald.core.states import DELETE_NEEDS_FORCE, LIVE_STATES, TRANSITIONS, Operation, VmState
from metald.core.timing import StepTimes
from metald.core.validation import Limits, check_vm_id
from metald.service.vm_service import VmService

S = VmState
ALICE, BOB = "alice", "bob"
LIMITS = Limits(max_vcpus=8, max_memory_bytes=8 * 1024**3)
PLAIN = VmConfig()
NETWORKED = VmConfig(network=(NetworkInterface(id="eth0", mode=NetworkMode.DUAL_STACK),))
GONE_AT_START = "vmm process was gone when metald started"


@dataclass
class World:
    store: MemoryStore
    backends: dict[str, FakeBackend]
    assets: FakeAssets
    network: FakeNetwork
    service: VmService

    @property
    def backend(self) -> FakeBackend:
        return next(iter(self.backends.values()))

    def restarted(self, **kwargs: Any) -> World:
        """A new daemon over the same database, VMM processes and host networking."""
        return world(self.store, self.backends, self.assets, self.network, **kwargs)


def world(
    store: MemoryStore | None = None,
    backends: dict[str, FakeBackend] | None = None,
    assets: FakeAssets | None = None,
    network: FakeNetwork | None = None,
    default_backend: str = "",
    quotas: QuotaDefaults | None = None,
    **options: Any,
) -> World:
    store = store or MemoryStore()
    backends = backends or {"fake": FakeBackend("fake")}
    assets = assets or FakeAssets({"kernels/vmlinux", "images/root.ext4"})
    network = network or FakeNetwork()
    clock = itertools.count(1_700_000_000)
    service = VmService(
        store,
        backends,
        assets,
        network,
        LIMITS,
        admission=fake_admission(MemoryQuotas(store), quotas),
        default_backend=default_backend,
        default_shutdown_timeout=30.0,
        clock=lambda: float(next(clock)),
        **options,
    )
    return World(store, backends, assets, network, service)


@pytest.fixture
async def w() -> World:
    started = world()
    await started.service.start()
    return started


async def vm_in(
    w: World, state: VmState, vm_id: str = "vm-1", config: VmConfig = PLAIN, owner: str = ALICE
) -> VmRecord:
    """A VM brought to `state` through the service's own operations."""
    vm = await w.service.create_vm(customer(owner), vm_id, config)
    if state is S.CREATED:
        return vm
    vm = await w.service.boot_vm(customer(owner), vm_id)
    if state is S.PAUSED:
        vm = await w.service.pause_vm(customer(owner), vm_id)
    elif state is S.SHUTDOWN:
        vm = await w.service.shutdown_vm(customer(owner), vm_id)
    return vm


def assert_agree(w: World) -> None:
    """The store's rows and the fakes' processes, directories and networks match exactly,
    and the service's registry holds exactly the store's live rows, as the store has them."""
    live = w.store.live()
    assert w.service.registry.snapshot() == {
        k: r for k, r in live.items() if r.state in LIVE_STATES
    }, "the registry and the store disagree"
    for vm_id, row in live.items():
        backend = w.backends.get(row.backend)
        if backend is None:
            continue  # another daemon's VM: nobody here touches it
        vmm = backend.vmms.get(vm_id)
        if row.state is S.SHUTDOWN:
            assert vmm is None, f"{vm_id} is SHUTDOWN but its VMM runs"
            assert row.process is None
        else:
            assert vmm is not None, f"{vm_id} is {row.state} but has no VMM"
            assert (vmm.state, vmm.identity) == (row.state, row.process), vm_id
        assert vm_id in backend.saved, f"{vm_id} has no VM directory"
        assert (vm_id in w.network.networks) == bool(row.config.network), vm_id
    for backend in w.backends.values():
        mine = {k for k, r in live.items() if r.backend == backend.name}
        assert set(backend.vmms) <= mine, "a VMM no VM row owns"
        assert set(backend.saved) <= mine, "a VM directory no VM row owns"
    assert set(w.network.networks) <= set(live), "a network no VM row owns"


def assert_nothing_of(w: World, vm_id: str) -> None:
    assert vm_id not in w.store.rows
    assert w.service.registry.get(vm_id) is None
    assert vm_id not in w.network.networks
    for backend in w.backends.values():
        assert vm_id not in backend.vmms
        assert vm_id not in backend.saved


# --- operations, by name, for the parametrised tests ---------------------------------------

Op = Callable[[VmService, str, str], Awaitable[Any]]

OPERATIONS: dict[Operation, Op] = {
    Operation.BOOT: lambda s, who, vm: s.boot_vm(who, vm),
    Operation.PAUSE: lambda s, who, vm: s.pause_vm(who, vm),
    Operation.RESUME: lambda s, who, vm: s.resume_vm(who, vm),
    Operation.REBOOT: lambda s, who, vm: s.reboot_vm(who, vm),
    Operation.SHUTDOWN: lambda s, who, vm: s.shutdown_vm(who, vm),
    Operation.DELETE: lambda s, who, vm: s.delete_vm(who, vm, force=True),
}
EVERY_CALL: dict[str, Op] = {
    **{op.value: call for op, call in OPERATIONS.items()},
    "get": lambda s, who, vm: s.get_vm(who, vm),
}
MOVES = [op for op in Operation if op is not Operation.DELETE]


# --- the state machine ---------------------------------------------------------------------


@pytest.mark.parametrize("state", list(VmState))
@pytest.mark.parametrize("op", MOVES)
async def test_every_operation_from_every_state(w: World, op: Operation, state: VmState) -> None:
    await vm_in(w, state)
    before = w.store.rows["vm-1"]
    calls = len(w.backend.calls)
    if state in TRANSITIONS[op]:
        vm = await OPERATIONS[op](w.service, customer(ALICE), "vm-1")
        assert vm.state is TRANSITIONS[op][state]
        assert w.store.rows["vm-1"].state is vm.state
        assert w.backend.methods("vm-1")[-1] == op.value
    else:
        with pytest.raises(FailedPrecondition) as caught:
            await OPERATIONS[op](w.service, customer(ALICE), "vm-1")
        assert f"state {state.value}" in caught.value.message
        assert caught.value.code == "failed_precondition"
        # Refused before anything was touched.
        assert w.store.rows["vm-1"] == before
        assert len(w.backend.calls) == calls
    assert_agree(w)


@pytest.mark.parametrize("state", list(VmState))
async def test_delete_needs_force_while_a_guest_runs(w: World, state: VmState) -> None:
    await vm_in(w, state, config=NETWORKED)
    if state in DELETE_NEEDS_FORCE:
        with pytest.raises(FailedPrecondition, match=state.value):
            await w.service.delete_vm(customer(ALICE), "vm-1")
        assert w.store.rows["vm-1"].deleted_at is None
        assert "vm-1" in w.backend.vmms and "vm-1" in w.network.networks
    await w.service.delete_vm(customer(ALICE), "vm-1", force=state in DELETE_NEEDS_FORCE)
    row = w.store.rows["vm-1"]
    assert row.deleted_at is not None  # the row stays, so the id is never reused
    assert (row.state, row.process) == (S.SHUTDOWN, None)
    assert "vm-1" not in w.backend.vmms and "vm-1" not in w.backend.saved
    assert "vm-1" not in w.network.networks
    with pytest.raises(NotFound):
        await w.service.get_vm(customer(ALICE), "vm-1")
    assert_agree(w)


async def test_boot_after_shutdown_starts_a_new_vmm_and_clears_the_exit_reason(w: World) -> None:
    first = (await vm_in(w, S.RUNNING)).process
    off = await w.service.shutdown_vm(customer(ALICE), "vm-1")
    assert off.backend_info["exit_reason"] == "shutdown requested (graceful)"
    again = await w.service.boot_vm(customer(ALICE), "vm-1")
    assert again.process is not None and again.process != first
    assert "exit_reason" not in again.backend_info
    assert_agree(w)


async def test_shutdown_timeout_and_force_reach_the_backend(w: World) -> None:
    await vm_in(w, S.RUNNING)
    vm = await w.service.shutdown_vm(customer(ALICE), "vm-1", force=True, timeout_seconds=7)
    assert w.backend.calls[-1].args == {"timeout": 7.0, "force": True}
    assert vm.backend_info["exit_reason"] == "shutdown requested (forced)"
    await w.service.boot_vm(customer(ALICE), "vm-1")
    await w.service.shutdown_vm(customer(ALICE), "vm-1")
    assert w.backend.calls[-1].args == {"timeout": 30.0, "force": False}  # the default
    with pytest.raises(InvalidArgument, match=r"^timeout_seconds"):
        await w.service.shutdown_vm(customer(ALICE), "vm-1", timeout_seconds=-1)


async def test_a_failing_backend_call_changes_no_state(w: World) -> None:
    await vm_in(w, S.RUNNING)
    before = w.store.rows["vm-1"]
    w.backend.faults.fail("pause", BackendError("qmp: broken pipe"))
    with pytest.raises(BackendError, match="broken pipe"):
        await w.service.pause_vm(customer(ALICE), "vm-1")
    assert w.store.rows["vm-1"] == before
    assert (await w.service.pause_vm(customer(ALICE), "vm-1")).state is S.PAUSED
    assert_agree(w)


async def test_get_vm_reports_usage_backend_info_and_network(w: World) -> None:
    await vm_in(w, S.RUNNING, config=NETWORKED)
    vm, usage, info, network = await w.service.get_vm(customer(ALICE), "vm-1")
    assert vm.state is S.RUNNING
    assert usage.memory_bytes == 64 * 1024 * 1024
    assert info == {"accelerator": "tcg"}  # no host details (pid, paths) for a tenant
    assert network is not None
    assert str(network.ipv4) == w.network.networks["vm-1"].address
    await w.service.shutdown_vm(customer(ALICE), "vm-1")
    _, usage, info, _ = await w.service.get_vm(customer(ALICE), "vm-1")
    assert usage.memory_bytes == 0  # no VMM, no usage
    assert info["exit_reason"] == "shutdown requested (graceful)"


async def test_a_live_vm_is_read_from_the_registry_and_a_stopped_one_from_the_store(
    w: World,
) -> None:
    await vm_in(w, S.RUNNING, "vm-1")
    await vm_in(w, S.SHUTDOWN, "vm-2")
    w.store.faults.fail("get", RuntimeError("database is locked"), times=None)
    vm, _, _, _ = await w.service.get_vm(customer(ALICE), "vm-1")  # no store read
    assert vm.state is S.RUNNING
    with pytest.raises(NotFound):
        await w.service.get_vm(customer(BOB), "vm-1")  # the registry checks ownership too
    with pytest.raises(RuntimeError, match="locked"):
        await w.service.get_vm(customer(ALICE), "vm-2")  # not live: the store's row
    w.store.faults.clear("get")
    assert (await w.service.get_vm(customer(ALICE), "vm-2"))[0].state is S.SHUTDOWN


async def test_a_failing_store_write_leaves_the_registry_as_the_store_is(w: World) -> None:
    await vm_in(w, S.RUNNING)
    w.store.faults.fail("update", RuntimeError("disk I/O error"))
    with pytest.raises(RuntimeError, match="disk I/O"):
        await w.service.pause_vm(customer(ALICE), "vm-1")
    # The VMM did pause, but the store does not say so: nor does the registry (GetVmInfo).
    assert (await w.service.get_vm(customer(ALICE), "vm-1"))[0].state is S.RUNNING
    assert w.service.registry.snapshot() == {"vm-1": w.store.rows["vm-1"]}


async def test_changing_a_returned_record_changes_nothing_stored(w: World) -> None:
    vm = await vm_in(w, S.RUNNING)
    vm.state = S.SHUTDOWN
    got, _, _, _ = await w.service.get_vm(customer(ALICE), "vm-1")
    got.state = S.PAUSED
    assert (await w.service.get_vm(customer(ALICE), "vm-1"))[0].state is S.RUNNING
    assert_agree(w)


async def test_get_vm_while_the_vmm_is_exiting_still_answers(w: World) -> None:
    await vm_in(w, S.RUNNING)
    w.backend.faults.fail("usage", BackendError("process exited"))
    vm, usage, _, _ = await w.service.get_vm(customer(ALICE), "vm-1")
    assert (vm.state, usage.cpu_time_ns) == (S.RUNNING, 0)


async def test_operations_on_one_vm_are_serialised_and_other_vms_go_on(w: World) -> None:
    await vm_in(w, S.CREATED, "vm-1")
    await vm_in(w, S.CREATED, "vm-2")
    gate = w.backend.faults.gate("boot")
    booting = asyncio.create_task(w.service.boot_vm(customer(ALICE), "vm-1"))
    await gate.entered.wait()
    # A shutdown of the same VM waits for the boot (without the lock it would see CREATED).
    stopping = asyncio.create_task(w.service.shutdown_vm(customer(ALICE), "vm-1"))
    # Another VM is not held up: pause it through the same service meanwhile.
    w.backend.faults.clear("boot")
    assert (await w.service.boot_vm(customer(ALICE), "vm-2")).state is S.RUNNING
    assert not booting.done() and not stopping.done()
    gate.release()
    assert (await booting).state is S.RUNNING
    assert (await stopping).state is S.SHUTDOWN
    assert_agree(w)


# --- ownership -----------------------------------------------------------------------------


@pytest.mark.parametrize("call", list(EVERY_CALL))
@pytest.mark.parametrize("state", list(VmState))
async def test_another_customers_vm_is_not_found(w: World, call: str, state: VmState) -> None:
    await vm_in(w, state, "vm-1")
    before = w.store.rows["vm-1"]
    calls = len(w.backend.calls)
    with pytest.raises(NotFound) as theirs:
        await EVERY_CALL[call](w.service, customer(BOB), "vm-1")
    with pytest.raises(NotFound) as missing:
        await EVERY_CALL[call](w.service, customer(BOB), "vm-9")
    # The same answer as for an id nobody has: ids leak nothing.
    assert theirs.value.message == missing.value.message.replace("vm-9", "vm-1")
    assert w.store.rows["vm-1"] == before
    assert len(w.backend.calls) == calls


async def test_lists_are_per_customer(w: World) -> None:
    await vm_in(w, S.CREATED, "a-1", owner=ALICE)
    await vm_in(w, S.CREATED, "b-1", owner=BOB)
    assert [vm.id for vm in (await w.service.list_vms(customer(ALICE), [], 0, "")).vms] == ["a-1"]
    assert [vm.id for vm in (await w.service.list_vms(customer(BOB), [], 0, "")).vms] == ["b-1"]


async def test_creating_for_someone_else_is_permission_denied(w: World) -> None:
    with pytest.raises(PermissionDenied, match="customer_id"):
        await w.service.create_vm(customer(ALICE), "vm-1", PLAIN, customer_id=BOB)
    assert w.store.rows == {} and w.backend.calls == [w.backend.calls[0]]  # only start
    vm = await w.service.create_vm(customer(ALICE), "vm-1", PLAIN, customer_id=ALICE)
    assert vm.customer_id == ALICE


# --- ids -----------------------------------------------------------------------------------


async def test_a_used_id_is_already_exists_even_after_delete(w: World) -> None:
    await vm_in(w, S.CREATED, "vm-1")
    with pytest.raises(AlreadyExists):
        await w.service.create_vm(customer(ALICE), "vm-1", PLAIN)
    with pytest.raises(AlreadyExists):  # whoever asks: an id names one VM for ever
        await w.service.create_vm(customer(BOB), "vm-1", PLAIN)
    await w.service.delete_vm(customer(ALICE), "vm-1")
    with pytest.raises(AlreadyExists):
        await w.service.create_vm(customer(ALICE), "vm-1", PLAIN)
    assert w.backend.methods().count("create") == 1


async def test_generated_ids_are_valid_and_distinct(w: World) -> None:
    ids = {(await w.service.create_vm(customer(ALICE), "", PLAIN)).id for _ in range(20)}
    assert len(ids) == 20
    for vm_id in ids:
        check_vm_id(vm_id)
    assert set(w.store.rows) == ids


@pytest.mark.parametrize("bad", ["", "UPPER", "a/b", "x" * 65, "vm_1"])
async def test_a_bad_id_is_invalid_argument_everywhere(w: World, bad: str) -> None:
    if bad:
        with pytest.raises(InvalidArgument, match=r"^vm_id"):
            await w.service.create_vm(customer(ALICE), bad, PLAIN)
    for call in EVERY_CALL.values():
        with pytest.raises(InvalidArgument, match=r"^vm_id"):
            await call(w.service, customer(ALICE), bad)
    assert w.store.rows == {}


# --- bad input changes nothing -------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "field"),
    [
        (VmConfig(vcpu_count=0), "config.cpu.vcpu_count"),
        (VmConfig(vcpu_count=9), "config.cpu.vcpu_count"),  # over this host's limit
        (VmConfig(memory_bytes=8 * 1024**3 + 1024**2), "config.memory.size_bytes"),
        (VmConfig(kernel_path="kernels/missing"), "config.boot.kernel_path"),
        (VmConfig(initrd_path="nope"), "config.boot.initrd_path"),
        (
            VmConfig(storage=(DiskConfig(id="root", path="images/other.ext4"),)),
            "config.storage[0].path",
        ),
        (VmConfig(network=(NetworkInterface(), NetworkInterface())), "config.network"),
    ],
)
async def test_a_bad_config_names_the_field_and_creates_nothing(
    w: World, config: VmConfig, field: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await w.service.create_vm(customer(ALICE), "vm-1", config)
    assert caught.value.field == field
    assert_nothing_of(w, "vm-1")
    assert "create" not in w.backend.methods() and ("setup", "vm-1") not in w.network.calls


async def test_a_host_that_refuses_networking_creates_nothing(w: World) -> None:
    w.network.refusal = InvalidArgument("config.network", "networking is off")
    with pytest.raises(InvalidArgument, match="networking is off"):
        await w.service.create_vm(customer(ALICE), "vm-1", NETWORKED)
    assert_nothing_of(w, "vm-1")
    await w.service.create_vm(customer(ALICE), "vm-1", PLAIN)  # the id was not taken


async def test_create_resolves_assets_into_the_launch_spec(w: World) -> None:
    config = VmConfig(
        kernel_path="kernels/vmlinux",
        storage=(DiskConfig(id="root", path="images/root.ext4", is_root_device=True),),
    )
    await w.service.create_vm(customer(ALICE), "vm-1", config)
    spec = w.backend.saved["vm-1"]
    assert str(spec.kernel).endswith("kernels/vmlinux") and spec.initrd is None
    assert [str(d.path) for d in spec.disks] == ["/fake-assets/images/root.ext4"]
    await w.service.create_vm(customer(ALICE), "vm-2", PLAIN)
    default = w.backend.saved["vm-2"]
    assert (default.kernel.name, default.initrd and default.initrd.name) == ("vmlinux", "initrd")


async def test_another_customers_asset_is_not_found_and_creates_nothing() -> None:
    """The caller is who resolves: an asset another customer owns is NotFound, exactly as
    one nobody has, and nothing is made; the owner attaches it."""
    assets = FakeAssets({"kernels/vmlinux", "kernels/bobs"}, owners={"kernels/bobs": BOB})
    w = world(assets=assets)
    await w.service.start()
    foreign, missing = VmConfig(kernel_path="kernels/bobs"), VmConfig(kernel_path="sha256-x")
    assets.owners["sha256-x"] = "nobody"
    with pytest.raises(NotFound) as theirs:
        await w.service.create_vm(customer(ALICE), "vm-1", foreign)
    with pytest.raises(NotFound) as nobodys:
        await w.service.create_vm(customer(ALICE), "vm-1", missing)
    assert theirs.value.code == nobodys.value.code == "not_found"
    assert_nothing_of(w, "vm-1")
    assert "create" not in w.backend.methods()
    assert set(assets.customers) == {ALICE}
    await w.service.create_vm(customer(BOB), "vm-2", foreign)
    assert assets.customers[-1] == BOB


# --- undo of a failing CreateVm ------------------------------------------------------------


async def test_network_setup_failing_leaves_nothing(w: World) -> None:
    boom = ResourceExhausted("no free IPv4 address")
    w.network.faults.fail("setup", boom)
    with pytest.raises(ResourceExhausted) as caught:
        await w.service.create_vm(customer(ALICE), "vm-1", NETWORKED)
    assert caught.value is boom
    assert_nothing_of(w, "vm-1")
    assert "create" not in w.backend.methods()


async def test_backend_create_failing_leaves_nothing(w: World) -> None:
    w.backend.faults.fail("create", BackendError("qemu: could not start"))
    with pytest.raises(BackendError, match="could not start"):
        await w.service.create_vm(customer(ALICE), "vm-1", NETWORKED)
    assert_nothing_of(w, "vm-1")
    assert ("teardown", "vm-1") in w.network.calls
    # The id is free again: nothing was ever created under it.
    await w.service.create_vm(customer(ALICE), "vm-1", NETWORKED)
    assert_agree(w)


async def test_joining_the_tap_failing_leaves_nothing(w: World) -> None:
    w.network.faults.fail("attach", BackendError("tap: no such device"))
    with pytest.raises(BackendError, match="tap"):
        await w.service.create_vm(customer(ALICE), "vm-1", NETWORKED)
    assert_nothing_of(w, "vm-1")


async def test_backend_create_cancelled_leaves_nothing(w: World) -> None:
    gate = w.backend.faults.gate("create")
    creating = asyncio.create_task(w.service.create_vm(customer(ALICE), "vm-1", NETWORKED))
    await gate.entered.wait()
    assert "vm-1" in w.store.rows and "vm-1" in w.network.networks  # half-way
    creating.cancel()
    with pytest.raises(asyncio.CancelledError):
        await creating
    assert_nothing_of(w, "vm-1")
    w.backend.faults.clear()
    await w.service.create_vm(customer(ALICE), "vm-1", NETWORKED)  # and the VM's lock was let go
    assert_agree(w)


async def test_recording_the_new_vmm_failing_leaves_nothing(w: World) -> None:
    # insert (intent) succeeds; the update that records the VMM's identity fails.
    w.store.faults.fail("update", OSError("disk full"))
    with pytest.raises(OSError, match="disk full"):
        await w.service.create_vm(customer(ALICE), "vm-1", NETWORKED)
    assert_nothing_of(w, "vm-1")


async def test_recording_the_intent_failing_creates_nothing(w: World) -> None:
    w.store.faults.fail("insert", OSError("database is locked"))
    with pytest.raises(OSError, match="locked"):
        await w.service.create_vm(customer(ALICE), "vm-1", NETWORKED)
    assert_nothing_of(w, "vm-1")
    assert ("setup", "vm-1") not in w.network.calls


async def test_every_undo_step_runs_when_one_fails(w: World) -> None:
    w.backend.faults.fail("create", BackendError("qemu: could not start"))
    w.backend.faults.fail("destroy", BackendError("directory busy"))
    with pytest.raises(BackendError, match="could not start"):  # the cause, not the undo's
        await w.service.create_vm(customer(ALICE), "vm-1", NETWORKED)
    assert ("teardown", "vm-1") in w.network.calls
    assert "vm-1" not in w.store.rows and "vm-1" not in w.network.networks


# --- the exit callback ---------------------------------------------------------------------


@pytest.mark.parametrize("state", sorted(LIVE_STATES))
async def test_a_vmm_exiting_marks_the_vm_shutdown_with_the_reason(
    w: World, state: VmState
) -> None:
    await vm_in(w, state)
    await w.backend.exit("vm-1", "guest powered off")
    row = w.store.rows["vm-1"]
    assert (row.state, row.process) == (S.SHUTDOWN, None)
    assert row.backend_info["exit_reason"] == "guest powered off"
    assert_agree(w)
    assert (await w.service.boot_vm(customer(ALICE), "vm-1")).state is S.RUNNING


async def test_an_exit_of_a_deleted_or_stopped_vm_changes_nothing(w: World) -> None:
    await vm_in(w, S.SHUTDOWN, "vm-1")
    before = w.store.rows["vm-1"]
    assert w.backend.exit_callback is not None
    await w.backend.exit_callback("vm-1", "late news")
    assert w.store.rows["vm-1"] == before
    await w.service.delete_vm(customer(ALICE), "vm-1")
    deleted = w.store.rows["vm-1"]
    await w.backend.exit_callback("vm-1", "later news")
    await w.backend.exit_callback("vm-never", "about nobody")
    assert w.store.rows["vm-1"] == deleted and "vm-never" not in w.store.rows


# --- adoption at start ---------------------------------------------------------------------


async def test_start_sets_both_callbacks_on_every_backend() -> None:
    two = world(backends={"qemu": FakeBackend("qemu"), "fc": FakeBackend("fc")})
    await two.service.start()
    for backend in two.backends.values():
        assert backend.exit_callback is not None
        assert backend.tap_callback is not None


@pytest.mark.parametrize("state", sorted(LIVE_STATES))
async def test_a_live_vmm_is_adopted_and_keeps_its_state(w: World, state: VmState) -> None:
    before = await vm_in(w, state)
    again = w.restarted()
    await again.service.start()
    assert w.store.rows["vm-1"].state is state
    assert w.store.rows["vm-1"].process == before.process
    assert again.backend.calls[-2].args == {"identity": before.process}  # adopt, then orphans
    assert_agree(again)
    # Adopted VMs are controlled by the new daemon and report its exits.
    await again.service.delete_vm(customer(ALICE), "vm-1", force=True)
    assert_agree(again)


async def test_a_live_vmm_in_another_state_corrects_the_row(w: World) -> None:
    await vm_in(w, S.RUNNING)
    w.backend.adoption["vm-1"] = S.PAUSED  # paused while metald was away
    again = w.restarted()
    await again.service.start()
    assert w.store.rows["vm-1"].state is S.PAUSED
    assert_agree(again)
    assert (await again.service.resume_vm(customer(ALICE), "vm-1")).state is S.RUNNING


@pytest.mark.parametrize("state", sorted(LIVE_STATES))
async def test_a_vmm_gone_while_metald_was_away_is_shutdown(w: World, state: VmState) -> None:
    await vm_in(w, state, config=NETWORKED)
    del w.backend.vmms["vm-1"]  # it died with nobody watching
    again = w.restarted()
    await again.service.start()
    row = w.store.rows["vm-1"]
    assert (row.state, row.process) == (S.SHUTDOWN, None)
    assert row.backend_info["exit_reason"] == GONE_AT_START
    assert "vm-1" in w.backend.saved and "vm-1" in w.network.networks  # still its own
    assert_agree(again)
    assert (await again.service.boot_vm(customer(ALICE), "vm-1")).state is S.RUNNING


async def test_a_reused_pid_is_not_adopted(w: World) -> None:
    await vm_in(w, S.RUNNING)
    vmm = w.backend.vmms["vm-1"]
    vmm.identity = vmm.identity._replace(start_time=vmm.identity.start_time + 1)
    again = w.restarted()
    await again.service.start()
    assert w.store.rows["vm-1"].state is S.SHUTDOWN


async def test_a_row_without_a_process_is_shutdown_at_start(w: World) -> None:
    await w.store.insert(
        VmRecord("vm-1", ALICE, PLAIN, S.CREATED, "fake", created_at=1.0, updated_at=1.0)
    )
    await w.restarted().service.start()
    assert w.store.rows["vm-1"].state is S.SHUTDOWN
    assert "adopt" not in w.backend.methods()


async def test_stopped_and_deleted_vms_are_not_adopted(w: World) -> None:
    await vm_in(w, S.SHUTDOWN, "vm-1")
    await vm_in(w, S.CREATED, "vm-2")
    await w.service.delete_vm(customer(ALICE), "vm-2")
    again = w.restarted()
    await again.service.start()
    assert "adopt" not in again.backend.methods()


async def test_orphans_are_removed_on_every_backend_and_in_the_network(w: World) -> None:
    qemu, fc = FakeBackend("qemu"), FakeBackend("fc")
    first = world(backends={"qemu": qemu, "fc": fc})
    await first.service.start()
    await vm_in(first, S.SHUTDOWN, "kept", config=NETWORKED)  # its directory stays
    qemu.orphans |= {"lost-q"}
    fc.orphans |= {"lost-f"}
    first.network.orphans |= {"lost-n"}
    again = first.restarted()
    await again.service.start()
    assert qemu.orphans == fc.orphans == first.network.orphans == set()
    for backend in (qemu, fc):
        assert backend.calls[-1].args == {"known": {"kept"}}
    assert "kept" in qemu.saved and "kept" in first.network.networks
    assert_agree(again)


async def test_a_vm_of_a_backend_not_configured_is_left_alone_and_unavailable() -> None:
    store = MemoryStore()
    other = VmRecord(
        "fc-1",
        ALICE,
        PLAIN,
        S.RUNNING,
        "firecracker",
        created_at=1.0,
        updated_at=1.0,
        process=ProcessIdentity(pid=4242, start_time=1),
    )
    await store.insert(other)
    w = world(store)
    await w.service.start()
    assert w.store.rows["fc-1"] == other  # not marked SHUTDOWN: its daemon adopts it
    assert "adopt" not in w.backend.methods()
    assert w.backend.calls[-1].args == {"known": {"fc-1"}}  # and not an orphan here
    vm, _, _, _ = await w.service.get_vm(customer(ALICE), "fc-1")  # reads still answer
    assert vm.state is S.RUNNING
    for op, call in OPERATIONS.items():
        refused = FailedPrecondition if S.RUNNING not in TRANSITIONS[op] else Unavailable
        with pytest.raises(refused) as caught:
            await call(w.service, customer(ALICE), "fc-1")
        if refused is Unavailable:
            assert "firecracker" in caught.value.message
    assert w.store.rows["fc-1"] == other


# --- two backends --------------------------------------------------------------------------


async def test_each_vm_is_routed_to_its_rows_backend() -> None:
    qemu, fc = FakeBackend("qemu"), FakeBackend("firecracker")
    w = world(backends={"qemu": qemu, "firecracker": fc}, default_backend="firecracker")
    await w.service.start()
    new = await vm_in(w, S.RUNNING, "new")
    assert new.backend == "firecracker" and "new" in fc.vmms
    # A VM an earlier daemon created on QEMU (its row says so).
    await w.store.insert(
        VmRecord("old", ALICE, PLAIN, S.SHUTDOWN, "qemu", created_at=1.0, updated_at=1.0)
    )
    qemu.saved["old"] = fc.saved["new"]
    await w.service.boot_vm(customer(ALICE), "old")
    await w.service.pause_vm(customer(ALICE), "old")
    assert qemu.methods("old") == ["boot", "pause"] and fc.methods("old") == []
    assert qemu.methods("new") == []
    await w.service.delete_vm(customer(ALICE), "old", force=True)
    assert "old" not in qemu.saved
    assert_agree(w)


def test_the_backends_must_include_the_default() -> None:
    with pytest.raises(ValueError, match="at least one"):
        admission = fake_admission(MemoryQuotas())
        VmService(MemoryStore(), {}, FakeAssets(), FakeNetwork(), LIMITS, admission=admission)
    with pytest.raises(ValueError, match="not among"):
        world(backends={"qemu": FakeBackend("qemu")}, default_backend="firecracker")


# --- listing -------------------------------------------------------------------------------


async def test_pages_filters_and_totals(w: World) -> None:
    for i in range(5):
        await vm_in(w, S.RUNNING if i % 2 else S.CREATED, f"vm-{i}")
    first = await w.service.list_vms(customer(ALICE), [], 2, "")
    assert ([v.id for v in first.vms], first.total_count) == (["vm-0", "vm-1"], 5)
    second = await w.service.list_vms(customer(ALICE), [], 2, first.next_token)
    third = await w.service.list_vms(customer(ALICE), [], 2, second.next_token)
    assert [v.id for v in second.vms + third.vms] == ["vm-2", "vm-3", "vm-4"]
    assert third.next_token == ""
    running = await w.service.list_vms(customer(ALICE), [S.RUNNING], 0, "")
    assert ([v.id for v in running.vms], running.total_count) == (["vm-1", "vm-3"], 2)
    with pytest.raises(InvalidArgument, match=r"^page_token"):
        await w.service.list_vms(customer(ALICE), [], 0, "garbage!")
    with pytest.raises(InvalidArgument, match=r"^page_size"):
        await w.service.list_vms(customer(ALICE), [], -1, "")


# --- property: the backend and the store never disagree ------------------------------------

VMS = ["p-0", "p-1", "p-2"]
step = st.one_of(
    st.tuples(st.just("create"), st.sampled_from(VMS), st.booleans()),
    st.tuples(st.sampled_from([op.value for op in MOVES]), st.sampled_from(VMS)),
    st.tuples(st.just("delete"), st.sampled_from(VMS), st.booleans()),
    st.tuples(st.just("exit"), st.sampled_from(VMS)),
    st.tuples(st.just("crash"), st.sampled_from(VMS)),  # dies while metald is down
    st.tuples(st.just("fail"), st.sampled_from(["create", "boot", "pause", "shutdown"])),
    st.tuples(st.just("intruder"), st.sampled_from(VMS)),
    st.tuples(st.just("restart")),
)


async def _run(steps: list[tuple[Any, ...]]) -> None:
    w = world()
    await w.service.start()
    for action, *args in steps:
        try:
            if action == "create":
                await w.service.create_vm(customer(ALICE), args[0], NETWORKED if args[1] else PLAIN)
            elif action == "delete":
                await w.service.delete_vm(customer(ALICE), args[0], force=args[1])
            elif action == "exit":
                if args[0] in w.backend.vmms:
                    await w.backend.exit(args[0], "guest powered off")
            elif action == "crash":
                w.backend.vmms.pop(args[0], None)
                w = w.restarted()
                await w.service.start()
            elif action == "fail":
                w.backend.faults.fail(args[0], BackendError("injected"))
            elif action == "intruder":
                await w.service.boot_vm(customer(BOB), args[0])
            elif action == "restart":
                w = w.restarted()
                await w.service.start()
            else:
                before = await w.store.get(args[0])
                vm = await OPERATIONS[Operation(action)](w.service, customer(ALICE), args[0])
                assert before is not None
                assert vm.state is TRANSITIONS[Operation(action)][before.state]
        except MetaldError:
            pass  # refused with a typed error: the invariant below still has to hold
        assert_agree(w)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(step, max_size=30))
def test_no_sequence_of_operations_makes_backend_and_store_disagree(
    steps: list[tuple[Any, ...]],
) -> None:
    asyncio.run(_run(steps))


class RecordingTelemetry:
    """The service's telemetry port, recorded as (event, details)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, tuple[Any, ...]]] = []

    def create_steps(self, backend: str, times: StepTimes) -> None:
        self.events.append(("create", (backend, list(times.steps), times.total)))

    def booted(self, backend: str, seconds: float, since_create: float | None) -> None:
        self.events.append(("boot", (backend, seconds >= 0, since_create)))

    def adoption(self, backend: str, adopted: bool) -> None:
        self.events.append(("adoption", (backend, adopted)))

    def vmm_exited(self, backend: str) -> None:
        self.events.append(("exit", (backend,)))

    def quota_refused(self, scope: str, resource: str) -> None:
        self.events.append(("quota", (scope, resource)))

    def of(self, kind: str) -> list[tuple[Any, ...]]:
        return [details for event, details in self.events if event == kind]


async def test_a_create_reports_its_steps_and_a_failed_one_does_not() -> None:
    """metald's own share of CreateVm, step by step (core/timing.py): what /metrics shows."""
    seen = RecordingTelemetry()
    w = world(telemetry=seen)
    await w.service.start()
    await w.service.create_vm(customer(ALICE), "vm-1", NETWORKED)
    assert [(b, steps) for b, steps, _ in seen.of("create")] == [
        ("fake", ["check", "admission", "store", "network", "network_ready"])
    ]
    assert seen.of("create")[0][2] is not None
    w.backend.faults.fail("create", BackendError("no"))
    with pytest.raises(BackendError):
        await w.service.create_vm(customer(ALICE), "vm-2", PLAIN)
    assert len(seen.of("create")) == 1


async def test_boots_exits_adoptions_and_quota_refusals_are_reported() -> None:
    seen = RecordingTelemetry()
    w = world(telemetry=seen)
    await w.service.start()
    assert seen.of("adoption") == []  # nothing to adopt
    created = await w.service.create_vm(customer(ALICE), "vm-1", PLAIN)
    booted = await w.service.boot_vm(customer(ALICE), "vm-1")
    # The first boot: create to RUNNING by the service's clock (one tick per change here).
    assert seen.of("boot") == [("fake", True, booted.updated_at - created.created_at)]
    await w.service.shutdown_vm(customer(ALICE), "vm-1")
    await w.service.boot_vm(customer(ALICE), "vm-1")
    assert seen.of("boot")[1] == ("fake", True, None)  # a later boot has no create
    await w.backend.exit("vm-1", "guest powered off")
    assert seen.of("exit") == [("fake",)]
    await w.service.boot_vm(customer(ALICE), "vm-1")
    await w.service.create_vm(customer(ALICE), "vm-2", PLAIN)

    again = RecordingTelemetry()
    w.backend.adoption["vm-1"] = None  # its VMM is gone; vm-2's is there
    await w.restarted(telemetry=again).service.start()
    assert sorted(again.of("adoption")) == [("fake", False), ("fake", True)]

    limited = RecordingTelemetry()
    w2 = world(telemetry=limited, quotas=QuotaDefaults({Resource.VMS: 1}))
    await w2.service.start()
    await w2.service.create_vm(customer(ALICE), "vm-a", PLAIN)
    with pytest.raises(QuotaExceeded):
        await w2.service.create_vm(customer(ALICE), "vm-b", PLAIN)
    assert limited.of("quota") == [("customer", "vms")]
    assert len(limited.of("create")) == 1


async def test_someone_elses_vm_is_not_owned_and_answers_as_a_missing_one(w: World) -> None:
    await w.service.create_vm(customer(ALICE), "vm-1", PLAIN)
    with pytest.raises(NotYours) as theirs:
        await w.service.get_vm(customer(BOB), "vm-1")
    with pytest.raises(NotFound) as missing:
        await w.service.get_vm(customer(BOB), "vm-none")
    assert type(missing.value) is NotFound
    assert theirs.value.code == missing.value.code == "not_found"
    assert theirs.value.message == "VM 'vm-1' not found"
    assert missing.value.message == "VM 'vm-none' not found"

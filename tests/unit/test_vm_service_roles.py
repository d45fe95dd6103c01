"""Roles through the service (core/identity.py), with fakes of every port:

- a customer acts on its own VMs only: another's is not_found, and it may neither create for
  nor list another customer (permission_denied);
- an operator lists every customer's VMs or one customer's, creates for a named customer,
  reads and runs the lifecycle of any customer's VM; each of its calls (refused ones too)
  is an audit event through the Audit port, with the credential, the customer, the call and
  its result; a customer's calls are not the service's to audit;
- an audit store that fails does not fail the operator's call.
"""

from __future__ import annotations

import itertools

import pytest
from fakes import FakeAssets, FakeBackend, FakeNetwork, MemoryQuotas, MemoryStore
from fakes.audit import MemoryAudit
from fakes.quotas import fake_admission

from metald.core import callcontext
from metald.core.errors import InvalidArgument, NotFound, NotYours, PermissionDenied
from metald.core.identity import Caller, Role, customer
from metald.core.models import VmConfig
from metald.core.states import VmState
from metald.core.validation import Limits
from metald.service.vm_service import VmService

ALICE, BOB = customer("alice"), customer("bob")
OPS = Caller(
    actor="key:opskey1",
    role=Role.OPERATOR,
    customer_id=None,
    source="10.0.0.9:5000",
    tenant_header="t-1",
)
ADMIN = Caller(actor="jwt:https://idp#root", role=Role.ADMIN, customer_id=None)
RPC = "vmprovisioner.v1.VmService/"


@pytest.fixture
async def world() -> tuple[VmService, MemoryAudit]:
    store, audit = MemoryStore(), MemoryAudit()
    clock = itertools.count(1_700_000_000)
    svc = VmService(
        store,
        {"fake": FakeBackend("fake")},
        FakeAssets({"kernels/vmlinux"}),
        FakeNetwork(),
        Limits(max_vcpus=8, max_memory_bytes=8 * 1024**3),
        admission=fake_admission(MemoryQuotas(store)),
        clock=lambda: float(next(clock)),
        audit=audit,
    )
    await svc.start()
    return svc, audit


async def test_a_customer_acts_on_its_own_vms_only(world: tuple[VmService, MemoryAudit]) -> None:
    svc, audit = world
    await svc.create_vm(ALICE, "a-1", VmConfig())
    with pytest.raises(NotYours):
        await svc.boot_vm(BOB, "a-1")
    with pytest.raises(NotYours):
        await svc.get_vm(BOB, "a-1")
    with pytest.raises(PermissionDenied):
        await svc.create_vm(BOB, "b-1", VmConfig(), customer_id="alice")
    assert (await svc.create_vm(BOB, "b-1", VmConfig(), customer_id="bob")).customer_id == "bob"
    assert audit.events == []  # customers' calls: the API layer's audit, not the service's


async def test_a_customer_cannot_list_another_customer(
    world: tuple[VmService, MemoryAudit],
) -> None:
    svc, _ = world
    await svc.create_vm(ALICE, "a-1", VmConfig())
    await svc.create_vm(BOB, "b-1", VmConfig())
    with pytest.raises(PermissionDenied):
        await svc.list_vms(BOB, [], 0, "", customer_id="alice")
    mine = await svc.list_vms(BOB, [], 0, "", customer_id="bob")
    assert [vm.id for vm in mine.vms] == ["b-1"]
    assert [vm.id for vm in (await svc.list_vms(BOB, [], 0, "")).vms] == ["b-1"]


async def test_an_operator_lists_across_customers_and_filters(
    world: tuple[VmService, MemoryAudit],
) -> None:
    svc, audit = world
    await svc.create_vm(ALICE, "a-1", VmConfig())
    await svc.create_vm(BOB, "b-1", VmConfig())
    await svc.create_vm(ALICE, "a-2", VmConfig())
    every = await svc.list_vms(OPS, [], 0, "")
    assert [(vm.id, vm.customer_id) for vm in every.vms] == [
        ("a-1", "alice"),
        ("b-1", "bob"),
        ("a-2", "alice"),
    ]
    assert every.total_count == 3
    first = await svc.list_vms(OPS, [], 2, "")
    rest = await svc.list_vms(OPS, [], 2, first.next_token)
    assert [vm.id for vm in first.vms + rest.vms] == ["a-1", "b-1", "a-2"]
    alices = await svc.list_vms(OPS, [], 0, "", customer_id="alice")
    assert [vm.id for vm in alices.vms] == ["a-1", "a-2"] and alices.total_count == 2
    with pytest.raises(InvalidArgument):
        await svc.list_vms(OPS, [], 0, "", customer_id="not a customer!")
    listed = [(e.method, e.customer_id, e.code) for e in audit.events]
    assert listed == [
        (RPC + "ListVms", None, "ok"),
        (RPC + "ListVms", None, "ok"),
        (RPC + "ListVms", None, "ok"),
        (RPC + "ListVms", "alice", "ok"),
    ]


async def test_an_operators_actions_on_a_customers_vm_are_audited(
    world: tuple[VmService, MemoryAudit],
) -> None:
    svc, audit = world
    await svc.create_vm(ALICE, "a-1", VmConfig())
    bound = callcontext.bind(trace_id="ab" * 16)  # as the API layer binds the caller's
    assert (await svc.boot_vm(OPS, "a-1")).state is VmState.RUNNING
    callcontext.reset(bound)
    vm, _, _, _ = await svc.get_vm(OPS, "a-1")
    assert vm.customer_id == "alice"
    await svc.get_console(OPS, "a-1", 0, 0)
    await svc.pause_vm(OPS, "a-1")
    with pytest.raises(Exception) as refused:  # a paused VM cannot pause again
        await svc.pause_vm(OPS, "a-1")
    await svc.resume_vm(ADMIN, "a-1")
    await svc.reboot_vm(OPS, "a-1")
    await svc.shutdown_vm(OPS, "a-1")
    await svc.delete_vm(OPS, "a-1")
    with pytest.raises(NotFound):
        await svc.boot_vm(OPS, "a-1")
    got = [(e.actor, e.role, e.method, e.vm_id, e.customer_id, e.code) for e in audit.events]
    ops = ("key:opskey1", "operator")
    assert got == [
        (*ops, RPC + "BootVm", "a-1", "alice", "ok"),
        (*ops, RPC + "GetVmInfo", "a-1", "alice", "ok"),
        (*ops, RPC + "GetVmConsole", "a-1", "alice", "ok"),
        (*ops, RPC + "PauseVm", "a-1", "alice", "ok"),
        (*ops, RPC + "PauseVm", "a-1", "alice", getattr(refused.value, "code", "?")),
        ("jwt:https://idp#root", "admin", RPC + "ResumeVm", "a-1", "alice", "ok"),
        (*ops, RPC + "RebootVm", "a-1", "alice", "ok"),
        (*ops, RPC + "ShutdownVm", "a-1", "alice", "ok"),
        (*ops, RPC + "DeleteVm", "a-1", "alice", "ok"),
        (*ops, RPC + "BootVm", "a-1", None, "not_found"),
    ]
    assert audit.events[4].code == "failed_precondition"
    first = audit.events[0]
    assert (first.source, first.tenant_header) == ("10.0.0.9:5000", "t-1")
    assert first.at_ns > 0
    assert (first.trace_id, audit.events[1].trace_id) == ("ab" * 16, "")


async def test_an_operator_creates_for_a_named_customer(
    world: tuple[VmService, MemoryAudit],
) -> None:
    svc, audit = world
    with pytest.raises(InvalidArgument):
        await svc.create_vm(OPS, "x-1", VmConfig())  # for whom?
    vm = await svc.create_vm(OPS, "", VmConfig(), customer_id="alice")
    assert vm.customer_id == "alice"
    assert [vm.id for vm in (await svc.list_vms(ALICE, [], 0, "")).vms] == [vm.id]
    (event,) = audit.events
    assert (event.method, event.vm_id, event.customer_id, event.code) == (
        RPC + "CreateVm",
        vm.id,
        "alice",
        "ok",
    )


async def test_a_failing_audit_store_does_not_fail_the_call(
    world: tuple[VmService, MemoryAudit],
) -> None:
    svc, audit = world
    await svc.create_vm(ALICE, "a-1", VmConfig())
    audit.fail = True
    assert (await svc.boot_vm(OPS, "a-1")).state is VmState.RUNNING

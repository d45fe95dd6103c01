"""Roles through the service (core/identity.py), with fakes of every port:

- a customer acts on its own VMs only: another's is not_found, and it may neither create for
  nor list another customer (permission_denied);
- an operator lists every customer's VMs or one customer's, creates for a named customer,
  reads and runs the lifecycle of any customer's VM;
- what the service notes for the call's audit row (core.audit.note; api/audit.py writes the
  row): the VM's id and whose VM it is, for an operator's call as for a customer's; a
  refused access notes no owner.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from fakes import FakeAssets, FakeBackend, FakeNetwork, MemoryQuotas, MemoryStore
from fakes.quotas import fake_admission

from metald.core.audit import CallNote, call_note
from metald.core.errors import InvalidArgument, NotYours, PermissionDenied
from metald.core.identity import Caller, Role, customer
from metald.core.models import VmConfig
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


async def noted(call: Callable[[], Awaitable[Any]]) -> tuple[CallNote, Any]:
    """Run one use case as the API runs it, inside an audited call: the note it leaves, and
    what it returned (or raised)."""
    note = CallNote()
    token = call_note.set(note)
    try:
        result: Any = await call()
    except Exception as exc:
        result = exc
    finally:
        call_note.reset(token)
    return note, result


@pytest.fixture
async def svc() -> VmService:
    store = MemoryStore()
    clock = itertools.count(1_700_000_000)
    svc = VmService(
        store,
        {"fake": FakeBackend("fake")},
        FakeAssets({"kernels/vmlinux"}),
        FakeNetwork(),
        Limits(max_vcpus=8, max_memory_bytes=8 * 1024**3),
        admission=fake_admission(MemoryQuotas(store)),
        clock=lambda: float(next(clock)),
    )
    await svc.start()
    return svc


async def test_a_customer_acts_on_its_own_vms_only(svc: VmService) -> None:
    await svc.create_vm(ALICE, "a-1", VmConfig())
    with pytest.raises(NotYours):
        await svc.boot_vm(BOB, "a-1")
    with pytest.raises(NotYours):
        await svc.get_vm(BOB, "a-1")
    with pytest.raises(PermissionDenied):
        await svc.create_vm(BOB, "b-1", VmConfig(), customer_id="alice")
    assert (await svc.create_vm(BOB, "b-1", VmConfig(), customer_id="bob")).customer_id == "bob"


async def test_a_refused_access_notes_no_owner(svc: VmService) -> None:
    await svc.create_vm(ALICE, "a-1", VmConfig())
    note, refused = await noted(lambda: svc.boot_vm(BOB, "a-1"))
    assert isinstance(refused, NotYours)
    assert note.owner is None  # bob's row names bob, and does not learn whose a-1 is
    note, _ = await noted(lambda: svc.get_vm(ALICE, "a-1"))
    assert (note.vm_id, note.owner) == ("a-1", "alice")


async def test_a_customer_cannot_list_another_customer(
    svc: VmService,
) -> None:
    await svc.create_vm(ALICE, "a-1", VmConfig())
    await svc.create_vm(BOB, "b-1", VmConfig())
    with pytest.raises(PermissionDenied):
        await svc.list_vms(BOB, [], 0, "", customer_id="alice")
    mine = await svc.list_vms(BOB, [], 0, "", customer_id="bob")
    assert [vm.id for vm in mine.vms] == ["b-1"]
    assert [vm.id for vm in (await svc.list_vms(BOB, [], 0, "")).vms] == ["b-1"]


async def test_an_operator_lists_across_customers_and_filters(
    svc: VmService,
) -> None:
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
    note, _ = await noted(lambda: svc.list_vms(OPS, [], 0, "", customer_id="alice"))
    assert note.owner == "alice"
    note, _ = await noted(lambda: svc.list_vms(OPS, [], 0, ""))
    assert note.owner is None  # every customer's: the row names the operator's own (none)


async def test_an_operators_actions_note_whose_vm_they_touched(svc: VmService) -> None:
    await svc.create_vm(ALICE, "a-1", VmConfig())
    calls: list[Callable[[], Awaitable[Any]]] = [
        lambda: svc.boot_vm(OPS, "a-1"),
        lambda: svc.get_vm(OPS, "a-1"),
        lambda: svc.get_console(OPS, "a-1", 0, 0),
        lambda: svc.pause_vm(OPS, "a-1"),
        lambda: svc.pause_vm(OPS, "a-1"),  # a paused VM cannot pause again
        lambda: svc.resume_vm(ADMIN, "a-1"),
        lambda: svc.reboot_vm(OPS, "a-1"),
        lambda: svc.shutdown_vm(OPS, "a-1"),
        lambda: svc.delete_vm(OPS, "a-1"),
        lambda: svc.boot_vm(OPS, "a-1"),  # gone
    ]
    got = []
    for call in calls:
        note, result = await noted(call)
        outcome = getattr(result, "code", "ok") if isinstance(result, Exception) else "ok"
        got.append((note.vm_id, note.owner, outcome))
    assert got == [
        *[("a-1", "alice", "ok")] * 4,
        ("a-1", "alice", "failed_precondition"),
        *[("a-1", "alice", "ok")] * 4,
        (None, None, "not_found"),
    ]


async def test_an_operator_creates_for_a_named_customer(svc: VmService) -> None:
    with pytest.raises(InvalidArgument):
        await svc.create_vm(OPS, "x-1", VmConfig())  # for whom?
    note, vm = await noted(lambda: svc.create_vm(OPS, "", VmConfig(), customer_id="alice"))
    assert vm.customer_id == "alice"
    assert (note.vm_id, note.owner) == (vm.id, "alice")  # the id the service picked
    assert [vm.id for vm in (await svc.list_vms(ALICE, [], 0, "")).vms] == [vm.id]

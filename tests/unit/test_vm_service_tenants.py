"""What one tenant can learn about another's VMs through the service, and what a tenant is
shown of the host (fakes of every port, as in test_vm_service.py):

- a call on another customer's VM answers not_found at once, even while the owner's
  operation on it holds the VM's lock; it never waits behind it;
- CreateVm with an id that is taken answers one already_exists, the same whoever holds it,
  and at once, also while the holder's create of it is still running;
- backend_info holds no host details (pid, paths) unless the operator asked for them; the
  exit reason a VMM gives is bounded and without host paths, in the store as well;
- the console RPC is the owner's only, bounded, and follows the log by offsets.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable

import pytest
from fakes import FakeAssets, FakeBackend, FakeNetwork, MemoryQuotas, MemoryStore
from fakes.faults import Gate
from fakes.quotas import fake_admission

from metald.core.errors import AlreadyExists, InvalidArgument, NotFound
from metald.core.identity import customer
from metald.core.models import VmConfig, VmRecord
from metald.core.redaction import MAX_REASON_BYTES
from metald.core.states import VmState
from metald.core.validation import MAX_SHUTDOWN_TIMEOUT_SECONDS, Limits
from metald.service.vm_service import MAX_CONSOLE_BYTES, VmService

ALICE, BOB = "alice", "bob"
LIMITS = Limits(max_vcpus=8, max_memory_bytes=8 * 1024**3)


def service(backend: FakeBackend, store: MemoryStore, *, host_details: bool = False) -> VmService:
    clock = itertools.count(1_700_000_000)
    return VmService(
        store,
        {"fake": backend},
        FakeAssets({"kernels/vmlinux"}),
        FakeNetwork(),
        LIMITS,
        admission=fake_admission(MemoryQuotas(store)),
        clock=lambda: float(next(clock)),
        host_details=host_details,
    )


@pytest.fixture
async def svc() -> tuple[VmService, FakeBackend, MemoryStore]:
    backend, store = FakeBackend("fake"), MemoryStore()
    s = service(backend, store)
    await s.start()
    return s, backend, store


async def _alice_vm_busy(
    svc: VmService, backend: FakeBackend
) -> tuple[asyncio.Future[VmRecord], Gate]:
    """Alice's running VM with her ShutdownVm stuck inside the backend (lock held)."""
    await svc.create_vm(customer(ALICE), "vm-a", VmConfig())
    await svc.boot_vm(customer(ALICE), "vm-a")
    gate = backend.faults.gate("shutdown")
    task = asyncio.ensure_future(svc.shutdown_vm(customer(ALICE), "vm-a"))
    await gate.entered.wait()
    return task, gate


async def _settled(call: Awaitable[object]) -> BaseException | None:
    """Run `call` while the loop has other work pending at most 100 rounds; its exception.
    A call still waiting then (for a lock nobody will release) fails the test."""
    task = asyncio.ensure_future(call)
    for _ in range(100):
        if task.done():
            return task.exception()
        await asyncio.sleep(0)
    task.cancel()
    raise AssertionError("the call waited (for the owner's lock)")


OPS = {
    "boot": lambda s, c, v: s.boot_vm(c, v),
    "pause": lambda s, c, v: s.pause_vm(c, v),
    "resume": lambda s, c, v: s.resume_vm(c, v),
    "reboot": lambda s, c, v: s.reboot_vm(c, v),
    "shutdown": lambda s, c, v: s.shutdown_vm(c, v),
    "delete": lambda s, c, v: s.delete_vm(c, v, force=True),
    "get": lambda s, c, v: s.get_vm(c, v),
    "console": lambda s, c, v: s.get_console(c, v, 0, 0),
}


@pytest.mark.parametrize("op", sorted(OPS))
async def test_another_customers_call_does_not_wait_for_the_owners_lock(
    svc: tuple[VmService, FakeBackend, MemoryStore], op: str
) -> None:
    s, backend, _ = svc
    held, gate = await _alice_vm_busy(s, backend)
    # Bob's call must answer while Alice's shutdown is still inside the backend: had it
    # waited for the lock, it would still be pending when the loop has nothing else to run.
    on_hers = await _settled(OPS[op](s, customer(BOB), "vm-a"))
    on_none = await _settled(OPS[op](s, customer(BOB), "vm-nobody"))
    assert isinstance(on_hers, NotFound) and isinstance(on_none, NotFound)
    assert str(on_hers) == str(on_none).replace("vm-nobody", "vm-a")
    assert not held.done()
    gate.release()
    assert (await held).state is VmState.SHUTDOWN


async def test_a_taken_id_answers_the_same_whoever_holds_it(
    svc: tuple[VmService, FakeBackend, MemoryStore],
) -> None:
    s, backend, _ = svc
    await s.create_vm(customer(ALICE), "vm-a", VmConfig())
    await s.create_vm(customer(BOB), "vm-b", VmConfig())
    await s.delete_vm(customer(BOB), "vm-b")
    answers = []
    for vm_id in ("vm-a", "vm-b"):  # held by another customer; deleted (own)
        with pytest.raises(AlreadyExists) as err:
            await s.create_vm(customer(BOB), vm_id, VmConfig())
        answers.append(str(err.value).replace(vm_id, "<id>"))
    with pytest.raises(AlreadyExists) as own:
        await s.create_vm(customer(ALICE), "vm-a", VmConfig())
    answers.append(str(own.value).replace("vm-a", "<id>"))
    assert len(set(answers)) == 1, answers
    assert "alice" not in answers[0]
    # Nothing of Alice's VM changed.
    assert [c.method for c in backend.calls if c.vm_id == "vm-a"] == ["create"]


async def test_a_create_of_an_id_someone_is_creating_answers_at_once(
    svc: tuple[VmService, FakeBackend, MemoryStore],
) -> None:
    s, backend, store = svc
    gate = backend.faults.gate("create")
    alices = asyncio.ensure_future(s.create_vm(customer(ALICE), "vm-x", VmConfig()))
    await gate.entered.wait()
    # Answers while Alice's create is still inside the backend.
    assert isinstance(await _settled(s.create_vm(customer(BOB), "vm-x", VmConfig())), AlreadyExists)
    assert not alices.done()
    gate.release()
    vm = await alices
    assert vm.customer_id == ALICE and (await store.get("vm-x")) is not None


async def test_backend_info_holds_no_host_details_unless_asked(
    svc: tuple[VmService, FakeBackend, MemoryStore],
) -> None:
    s, backend, store = svc
    await s.create_vm(customer(ALICE), "vm-a", VmConfig())
    _, _, info, _ = await s.get_vm(customer(ALICE), "vm-a")
    assert info == {"accelerator": "tcg"}
    operator_view = service(backend, store, host_details=True)
    _, _, info, _ = await operator_view.get_vm(customer(ALICE), "vm-a")
    assert info["pid"] and info["console_log"].startswith("/srv/fake/")


async def test_a_vmms_exit_reason_is_bounded_and_without_host_paths(
    svc: tuple[VmService, FakeBackend, MemoryStore],
) -> None:
    s, backend, store = svc
    await s.create_vm(customer(ALICE), "vm-a", VmConfig())
    await s.boot_vm(customer(ALICE), "vm-a")
    said = (
        "vmm exited unexpectedly (exit status 1): -kernel /srv/jailer/qemu/vm-a/root/vmlinux:"
        " bad\nsecond line\x1b[31m " + "x" * 10_000
    )
    await backend.exit("vm-a", said)
    stored = (await store.get("vm-a")).backend_info["exit_reason"]  # type: ignore[union-attr]
    _, _, info, _ = await s.get_vm(customer(ALICE), "vm-a")
    for reason in (stored, info["exit_reason"]):
        assert len(reason.encode()) <= MAX_REASON_BYTES
        assert "/srv" not in reason and "jailer" not in reason
        assert "\n" not in reason and "\x1b" not in reason
        assert reason.startswith("vmm exited unexpectedly (exit status 1): -kernel vmlinux: bad")


async def test_shutdown_timeout_is_capped(svc: tuple[VmService, FakeBackend, MemoryStore]) -> None:
    s, _, _ = svc
    await s.create_vm(customer(ALICE), "vm-a", VmConfig())
    await s.boot_vm(customer(ALICE), "vm-a")
    for bad in (-1, MAX_SHUTDOWN_TIMEOUT_SECONDS + 1, 2**31 - 1):
        with pytest.raises(InvalidArgument, match=r"^timeout_seconds"):
            await s.shutdown_vm(customer(ALICE), "vm-a", timeout_seconds=bad)
    vm = await s.shutdown_vm(customer(ALICE), "vm-a", timeout_seconds=MAX_SHUTDOWN_TIMEOUT_SECONDS)
    assert vm.state is VmState.SHUTDOWN


async def test_the_console_follows_by_offsets(
    svc: tuple[VmService, FakeBackend, MemoryStore],
) -> None:
    s, backend, _ = svc
    await s.create_vm(customer(ALICE), "vm-a", VmConfig())
    backend.consoles["vm-a"] = b"0123456789"
    first = await s.get_console(customer(ALICE), "vm-a", 0, 4)
    assert (first.data, first.offset, first.next_offset, first.size) == (b"0123", 0, 4, 10)
    rest = await s.get_console(customer(ALICE), "vm-a", first.next_offset, 0)
    assert rest.data == b"456789" and rest.next_offset == 10
    tail = await s.get_console(customer(ALICE), "vm-a", -3, 0)
    assert (tail.data, tail.offset) == (b"789", 7)
    backend.consoles["vm-a"] = b"new"  # the VM was started again: a new log
    again = await s.get_console(customer(ALICE), "vm-a", 10, 0)
    assert (again.data, again.offset) == (b"new", 0)
    await s.get_console(customer(ALICE), "vm-a", 0, 10 * MAX_CONSOLE_BYTES)
    assert backend.calls[-1].args["max_bytes"] == MAX_CONSOLE_BYTES
    with pytest.raises(InvalidArgument, match=r"^max_bytes"):
        await s.get_console(customer(ALICE), "vm-a", 0, -1)
    with pytest.raises(NotFound):
        await s.get_console(customer(BOB), "vm-a", 0, 0)

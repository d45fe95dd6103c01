"""Which calls the audit interceptor records, and what a row holds: driven directly, with
the call's note filled by hand as AuditCaller, the errors interceptor and the service
(core.audit.note) would fill it."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError

from metald.api import security
from metald.api.audit import AuditInterceptor, presented_actor
from metald.core.audit import AuditEvent, call_note
from metald.core.identity import Caller, Role


class Recorded:
    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    async def record(self, event: AuditEvent) -> None:
        self.events.append(event)


def ctx(method: str, **headers: str) -> Any:
    return SimpleNamespace(
        method=SimpleNamespace(name=method, service_name="vmprovisioner.v1.VmService"),
        request_headers={k.lower().replace("_", "-"): v for k, v in headers.items()},
        client_address="192.0.2.9:4000",
    )


ACME = Caller("token:acme", Role.CUSTOMER, "acme")
OPERATOR = Caller("key:op1", Role.OPERATOR, None)


async def run(
    method: str,
    caller: Caller | None,
    error: Exception | None = None,
    refused: str | None = None,
    vm_id: str | None = None,
    owner: str | None = None,
    **headers: str,
) -> list[AuditEvent]:
    recorded = Recorded()
    interceptor = AuditInterceptor(recorded, clock=lambda: 42)
    call = ctx(method, **headers)
    started = await interceptor.on_start(call)
    note = call_note.get()
    note.caller, note.refused, note.vm_id, note.owner = caller, refused, vm_id, owner
    await interceptor.on_end(started, call, error)
    assert call_note.get(None) is None  # reset
    return recorded.events


async def test_a_mutating_call_is_a_row_with_every_field() -> None:
    (row,) = await run("DeleteVm", ACME, vm_id="vm-1", x_tenant_id="t" * 1000)
    assert row == AuditEvent(
        at_ns=42, actor="token:acme", role="customer", customer_id="acme",
        method="vmprovisioner.v1.VmService/DeleteVm", vm_id="vm-1", code="ok",
        source="192.0.2.9:4000", trace_id="", tenant_header="t" * 256,
    )  # fmt: skip
    failed = await run("BootVm", ACME, ConnectError(Code.FAILED_PRECONDITION, "no"))
    assert [r.code for r in failed] == ["failed_precondition"]


async def test_a_customers_read_is_not_a_row_an_operators_is() -> None:
    assert await run("GetVmInfo", ACME, vm_id="vm-1") == []
    assert await run("ListVms", ACME) == []
    (row,) = await run("GetVmInfo", OPERATOR, vm_id="vm-1", owner="acme")
    # the row names whose VM the operator read (the service noted the owner)
    assert (row.actor, row.role, row.customer_id) == ("key:op1", "operator", "acme")
    (listed,) = await run("ListVms", OPERATOR)  # every customer's: no customer
    assert (listed.method.endswith("/ListVms"), listed.customer_id) == (True, None)


async def test_refusals_are_rows(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="metald.security")
    (anon,) = await run("ListVms", None, ConnectError(Code.UNAUTHENTICATED, "invalid token"),
                        authorization="Bearer s3cret", x_tenant_id="t-7")  # fmt: skip
    assert (anon.actor, anon.role, anon.code) == ("anonymous", "", "unauthenticated")
    assert anon.tenant_header == "t-7"
    (theirs,) = await run("GetVmInfo", ACME, ConnectError(Code.NOT_FOUND, "VM 'x' not found"),
                          refused=security.NOT_YOURS, vm_id="x")  # fmt: skip
    assert (theirs.code, theirs.vm_id) == ("not_found", "x")
    # Refused before auth finished for another reason (a rate limit): no row.
    assert await run("ListVms", None, ConnectError(Code.RESOURCE_EXHAUSTED, "slow down")) == []
    # A genuinely missing VM of the caller's own: a read, not a refusal.
    assert await run("GetVmInfo", ACME, ConnectError(Code.NOT_FOUND, "VM 'y' not found")) == []
    lines = [r for r in caplog.records if r.name == "metald.security"]
    assert [(r.levelname, r.event, getattr(r, "reason", None)) for r in lines] == [
        ("WARNING", "security", "unauthenticated"),
        ("WARNING", "security", "not_found_not_owner"),
    ]
    assert lines[0].tenant == "t-7"
    assert all("s3cret" not in r.getMessage() and "s3cret" not in str(vars(r)) for r in lines)


def test_a_refused_api_key_names_its_key_id_never_its_secret() -> None:
    secret = "A" * 43
    assert presented_actor(f"Bearer mk_{'k' * 16}_{secret}") == f"key:{'k' * 16}"
    assert presented_actor("Bearer mk_short_x") == "anonymous"  # not a key's shape
    assert presented_actor("Bearer dev_customer_acme") == "anonymous"
    assert presented_actor(None) == "anonymous"

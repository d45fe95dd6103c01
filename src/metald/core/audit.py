"""What the audit log records: one event per mutating RPC, per operator action, and per
refused authentication or access (DESIGN §12, layer 5).

The shape is the contract between the api layer (which sees every call and its result), the
service (which knows when an operator acted on a customer's VM) and the store (which chains
the rows so that an edited or deleted one is detected): core.ports.Audit takes these.

One writer per call: the API's audit interceptor (api/audit.py) writes the row when the call
has ended, from a `CallNote` it leaves in a context variable. What only deeper layers learn
goes into that note: the auth interceptor's caller, and through `note` the service's VM id
(a create picks one) and the VM's owner (an operator's row names whose VM it acted on). Code
outside an audited call (tests of the service, the CLI) notes into nothing.

Standard library only.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

from metald.core.identity import Caller


@dataclass(frozen=True)
class AuditEvent:
    at_ns: int  # wall clock, Unix nanoseconds
    actor: str  # the credential (core/identity.py), "anonymous" when none was accepted
    role: str  # core.identity.Role's value, "" when none was accepted
    customer_id: str | None  # whose VM or account the call was about
    method: str  # "vmprovisioner.v1.VmService/CreateVm"
    vm_id: str | None
    code: str  # the Connect result code's name: "ok", "not_found", "unauthenticated", ...
    source: str | None  # the peer address
    trace_id: str  # "" when the call carried none
    tenant_header: str | None  # X-Tenant-ID as sent


@dataclass
class CallNote:
    """What the layers behind the audit interceptor learn about the call it will record."""

    caller: Caller | None = None  # the authenticated caller (None: authentication failed)
    vm_id: str | None = None
    owner: str | None = None  # whose VM (or, for a list, whose VMs) the call was about
    refused: str | None = None  # api.security's reason for a refused access


call_note: ContextVar[CallNote] = ContextVar("audit_call_note")


def note(*, vm_id: str | None = None, owner: str | None = None) -> None:
    """Tell the running call's audit row the VM id and the owner learnt (outside an audited
    call: nothing)."""
    current = call_note.get(None)
    if current is None:
        return
    if vm_id is not None:
        current.vm_id = vm_id
    if owner is not None:
        current.owner = owner

"""What the audit log records: one event per mutating RPC, per operator action, and per
refused authentication or access (DESIGN §12, layer 5).

The shape is the contract between the api layer (which sees every call and its result), the
service (which knows when an operator acted on a customer's VM) and the store (which chains
the rows so that an edited or deleted one is detected): core.ports.Audit takes these.
"""

from __future__ import annotations

from dataclasses import dataclass


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

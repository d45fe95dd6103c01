"""Who is calling: the authenticated caller of an RPC, its role, and what it may act on.

Every way in (a static token, a development token, an API key from the store, a JWT, a
client certificate) ends as one `Caller`: the api layer authenticates, the service decides
with it. DESIGN's tenant rule stays the service's: a customer acts on its own VMs only, and
someone else's VM looks exactly like a missing one (core.errors.NotYours). Operators act on
every customer's VMs (each such action audited); admins also manage keys and quotas.

`actor` names the credential, not the customer, so an audit row says which key or
certificate acted: "token:<customer>", "dev:<customer>", "key:<key id>",
"jwt:<issuer>#<subject>", "mtls:<SPIFFE id or subject>".
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Role(StrEnum):
    CUSTOMER = "customer"  # its own VMs only
    OPERATOR = "operator"  # every VM: list (with a customer filter), read, lifecycle
    ADMIN = "admin"  # what an operator may, and keys and quotas


@dataclass(frozen=True)
class Caller:
    actor: str
    role: Role
    customer_id: str | None  # the customer it acts as (None: an operator or admin without one)
    source: str | None = None  # the peer address, when known
    tenant_header: str | None = None  # X-Tenant-ID as sent (recorded, never trusted)

    @property
    def is_operator(self) -> bool:
        return self.role in (Role.OPERATOR, Role.ADMIN)

    def may_act_on(self, owner: str) -> bool:
        """Whether this caller may read or change a VM of customer `owner`."""
        return self.is_operator or self.customer_id == owner


def customer(customer_id: str, actor: str | None = None) -> Caller:
    """A customer-role caller (what every credential was before roles)."""
    actor = actor or f"token:{customer_id}"
    return Caller(actor=actor, role=Role.CUSTOMER, customer_id=customer_id)

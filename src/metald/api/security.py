"""Security events: one log line for every refused authentication or access.

An operator (and a SIEM) must see who is knocking: a call without a valid token, a caller
acting for another customer, a caller naming a VM that is someone else's. The caller is told
only what DESIGN's tenant rules allow (someone else's VM is `not_found`, like a missing one);
the event says what really happened, with the method, the source address and the customer
when the token named one. It is a WARNING on the `metald.security` logger with
`event=security` and its fields as a log record's extras, so the JSON log has them as keys.
"""

from __future__ import annotations

import logging
from typing import Any

from connectrpc.request import RequestContext

log = logging.getLogger("metald.security")

UNAUTHENTICATED = "unauthenticated"
PERMISSION_DENIED = "permission_denied"
NOT_YOURS = "not_found_not_owner"  # answered not_found: the VM is another customer's


def refused(
    reason: str,
    ctx: RequestContext[Any, Any],
    detail: str,
    customer: str | None = None,
    *,
    actor: str | None = None,
    tenant: str | None = None,
) -> None:
    """`actor`: the credential, when one was accepted; `tenant`: X-Tenant-ID as sent."""
    method = f"{ctx.method.service_name}/{ctx.method.name}"
    source = ctx.client_address or "unknown"
    extra: dict[str, str] = {
        "event": "security",
        "reason": reason,
        "method": method,
        "source": source,
    }
    if customer:
        extra["customer_id"] = customer
    if actor:
        extra["actor"] = actor
    if tenant:
        extra["tenant"] = tenant[:128]
    log.warning(
        "security: refused %s (%s) to %s from %s%s",
        method,
        reason,
        customer or "an unauthenticated caller",
        source,
        f": {detail}" if detail else "",
        extra=extra,
    )

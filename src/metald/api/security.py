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

from metald.core.audit import AuditEvent

log = logging.getLogger("metald.security")

UNAUTHENTICATED = "unauthenticated"
PERMISSION_DENIED = "permission_denied"
NOT_YOURS = "not_found_not_owner"  # answered not_found: the VM is another customer's
AUTH_THROTTLED = "auth_failures_throttled"  # a source failed authentication too often


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


def audited(event: AuditEvent, reason: str | None, detail: str = "") -> None:
    """The log line of an audit row (api/audit.py): a refusal (`reason` set) is a security
    event as above; any other row an INFO line with `event=audit`. One line per row."""
    extra: dict[str, str] = {
        "event": "security" if reason else "audit",
        "method": event.method,
        "source": event.source or "unknown",
        "actor": event.actor,
        "role": event.role,
        "code": event.code,
    }
    if reason:
        extra["reason"] = reason
    if event.customer_id:
        extra["customer_id"] = event.customer_id
    if event.vm_id:
        extra["vm_id"] = event.vm_id
    if event.tenant_header:
        extra["tenant"] = event.tenant_header  # as every line of the call names it
    who = event.customer_id or ("an unauthenticated caller" if not event.role else event.actor)
    if reason:
        log.warning(
            "security: refused %s (%s) to %s from %s%s",
            event.method,
            reason,
            who,
            extra["source"],
            f": {detail}" if detail else "",
            extra=extra,
        )
    else:
        log.info(
            "audit: %s by %s (%s) from %s: %s",
            event.method,
            event.actor,
            event.role,
            extra["source"],
            event.code,
            extra=extra,
        )


def throttled(source: str, ctx: RequestContext[Any, Any]) -> None:
    """A source used up its failed-authentication bucket (api/ratelimit.py): its calls are
    refused before authentication until it refills. One line per episode, no audit row."""
    extra = {
        "event": "security",
        "reason": AUTH_THROTTLED,
        "method": f"{ctx.method.service_name}/{ctx.method.name}",
        "source": ctx.client_address or "unknown",
        "throttled_source": source,
    }
    log.warning("security: %s failed authentication too often: throttled", source, extra=extra)

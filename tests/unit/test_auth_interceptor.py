"""The auth interceptor on its own (no server): the Caller it sets for the handler carries
the credential's identity, the peer address and X-Tenant-ID as sent; the call's log fields
name the customer, the actor and the tenant; everything is reset after the call; a refused
token is counted by reason (its security line and audit row are the audit interceptor's:
tests/unit/test_audit_interceptor.py)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from connectrpc.errors import ConnectError

from metald.api.auth import TokenAuthenticator, current_caller, current_customer
from metald.api.interceptors import AuthInterceptor
from metald.core import callcontext
from metald.core.identity import Role


class Counted:
    def __init__(self) -> None:
        self.refused: list[str] = []

    def auth_refused(self, reason: str) -> None:
        self.refused.append(reason)

    def rpc_served(self, method: str, code: str, seconds: float) -> None: ...

    def access_refused(self, method: str) -> None: ...


def ctx(**headers: str) -> Any:
    method = SimpleNamespace(service_name="vmprovisioner.v1.VmService", name="ListVms")
    return SimpleNamespace(request_headers=headers, client_address="127.0.0.1:4242", method=method)


async def test_the_caller_has_the_peer_and_the_tenant_header() -> None:
    metrics = Counted()
    auth = AuthInterceptor(TokenAuthenticator(dev_tokens=True), metrics)  # type: ignore[arg-type]
    call = ctx(authorization="Bearer dev_user_acme", **{"x-tenant-id": "t-9"})
    tokens = await auth.on_start(call)
    caller = current_caller.get()
    assert (caller.actor, caller.role, caller.customer_id) == ("dev:acme", Role.CUSTOMER, "acme")
    assert (caller.source, caller.tenant_header) == ("127.0.0.1:4242", "t-9")
    assert current_customer.get() == "acme"
    assert dict(callcontext.fields()) == {
        "customer_id": "acme",
        "actor": "dev:acme",
        "tenant": "t-9",
    }
    await auth.on_end(tokens, call, None)
    assert current_caller.get(None) is None and dict(callcontext.fields()) == {}
    assert metrics.refused == []


async def test_a_refusal_is_counted_and_sets_no_caller() -> None:
    metrics = Counted()
    auth = AuthInterceptor(TokenAuthenticator(dev_tokens=False), metrics)  # type: ignore[arg-type]
    with pytest.raises(ConnectError):
        await auth.on_start(ctx(authorization="Bearer dev_customer_acme", **{"x-tenant-id": "t"}))
    assert metrics.refused == ["invalid"]
    assert current_caller.get(None) is None

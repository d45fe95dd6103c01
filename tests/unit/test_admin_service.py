"""The admin role's use cases (service/admin_service.py) on a real SQLite database for keys
and the quota fake:

- only an admin: an operator and a customer are permission_denied, before anything is read
  or written;
- a key made here is the token ApiKeyTokens accepts, and a revoked one it refuses; bad
  input is invalid_argument and stores nothing; with API keys off no key is made;
- quotas: get shows defaults, overrides and use; set applies limits, unlimited and
  default, or clears; bad input changes nothing;
- the audit note names the customer a key or a quota is about.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from fakes.quotas import MemoryQuotas

from metald.api.auth import ApiKeyTokens, TokenRefused
from metald.core.audit import CallNote, call_note
from metald.core.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from metald.core.identity import Caller, Role, customer
from metald.core.quotas import QuotaDefaults, Resource
from metald.service.admin_service import AdminService, QuotaChange
from metald.store.api_keys import SqlApiKeys
from metald.store.database import Database

PEPPER = b"admin-service-test-pepper"
ADMIN = Caller("key:root0000root0000", Role.ADMIN, None)
OPERATOR = Caller("key:ops00000ops00000", Role.OPERATOR, None)
DEFAULTS = QuotaDefaults({Resource.VMS: 10, Resource.VCPUS: 8})


@pytest.fixture
async def keys(tmp_path: Path) -> AsyncIterator[SqlApiKeys]:
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'm.db'}")
    await database.migrate()
    yield SqlApiKeys(database)
    await database.close()


def admin_service(keys: SqlApiKeys, pepper: bytes | None = PEPPER) -> AdminService:
    return AdminService(keys, MemoryQuotas(), DEFAULTS, pepper=pepper, clock=lambda: 1e9)


async def noted(call: Callable[[], Awaitable[Any]]) -> tuple[CallNote, Any]:
    note = CallNote()
    token = call_note.set(note)
    try:
        return note, await call()
    finally:
        call_note.reset(token)


async def test_only_an_admin(keys: SqlApiKeys) -> None:
    admin = admin_service(keys)
    for caller in (OPERATOR, customer("acme")):
        with pytest.raises(PermissionDenied):
            await admin.create_api_key(
                caller, customer_id="acme", role="", expires_in_seconds=0, description=""
            )
        with pytest.raises(PermissionDenied):
            await admin.list_api_keys(caller)
        with pytest.raises(PermissionDenied):
            await admin.revoke_api_key(caller, "a" * 16)
        with pytest.raises(PermissionDenied):
            await admin.get_quota(caller, "acme")
        with pytest.raises(PermissionDenied):
            await admin.set_quota(caller, "acme", [QuotaChange(Resource.VMS, 1)], clear=False)
    assert await keys.all() == []
    assert await admin.get_quota(ADMIN, "acme") == await admin.get_quota(ADMIN, "acme")
    assert not any(row.override for row in await admin.get_quota(ADMIN, "acme"))


async def test_keys_made_here_are_the_daemons(keys: SqlApiKeys) -> None:
    admin = admin_service(keys)
    note, made = await noted(
        lambda: admin.create_api_key(
            ADMIN, customer_id="acme", role="customer", expires_in_seconds=3600, description="ci"
        )
    )
    assert note.owner == "acme"
    assert made.key.expires_at == 1e9 + 3600
    tokens = ApiKeyTokens(keys, PEPPER, clock=lambda: 1e9 + 1)
    caller = await tokens.authenticate(made.token)
    assert caller is not None and (caller.customer_id, caller.role) == ("acme", Role.CUSTOMER)
    ops = await admin.create_api_key(
        ADMIN, customer_id="", role="operator", expires_in_seconds=0, description=""
    )
    listed = {k.key_id: k.role for k in await admin.list_api_keys(ADMIN)}
    assert listed == {made.key.key_id: Role.CUSTOMER, ops.key.key_id: Role.OPERATOR}
    note, revoked = await noted(lambda: admin.revoke_api_key(ADMIN, made.key.key_id))
    assert note.owner == "acme" and admin.status(revoked) == "revoked"
    with pytest.raises(TokenRefused, match="revoked"):
        await tokens.authenticate(made.token)
    with pytest.raises(NotFound):
        await admin.revoke_api_key(ADMIN, "z" * 16)


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"role": "root"}, InvalidArgument),
        ({"customer_id": ""}, InvalidArgument),  # a customer key needs its customer
        ({"customer_id": "a b"}, InvalidArgument),
        ({"expires_in_seconds": -1}, InvalidArgument),
        ({"description": "x" * 257}, InvalidArgument),
    ],
)
async def test_a_bad_key_request_stores_nothing(
    keys: SqlApiKeys, fields: dict[str, Any], error: type[Exception]
) -> None:
    request: dict[str, Any] = {
        "customer_id": "acme",
        "role": "customer",
        "expires_in_seconds": 0,
        "description": "",
    }
    with pytest.raises(error):
        await admin_service(keys).create_api_key(ADMIN, **{**request, **fields})
    assert await keys.all() == []


async def test_no_key_without_api_keys_on(keys: SqlApiKeys) -> None:
    with pytest.raises(FailedPrecondition, match="UNKEY_METALD_AUTH_API_KEYS"):
        await admin_service(keys, pepper=None).create_api_key(
            ADMIN, customer_id="acme", role="", expires_in_seconds=0, description=""
        )
    assert await keys.all() == []


async def test_quotas_get_and_set(keys: SqlApiKeys) -> None:
    admin = admin_service(keys)
    rows = {r.resource: r for r in await admin.get_quota(ADMIN, "acme")}
    assert (rows[Resource.VMS].limit, rows[Resource.VMS].override) == (10, False)
    assert rows[Resource.RUNNING_VMS].limit is None  # no default: unlimited
    changes = [
        QuotaChange(Resource.VMS, 3),
        QuotaChange(Resource.VCPUS, None),  # unlimited, as an override
    ]
    note, after = await noted(lambda: admin.set_quota(ADMIN, "acme", changes, clear=False))
    assert note.owner == "acme"
    rows = {r.resource: r for r in after}
    assert (rows[Resource.VMS].limit, rows[Resource.VMS].override) == (3, True)
    assert (rows[Resource.VCPUS].limit, rows[Resource.VCPUS].override) == (None, True)
    back = await admin.set_quota(
        ADMIN, "acme", [QuotaChange(Resource.VMS, default=True)], clear=False
    )
    rows = {r.resource: r for r in back}
    assert (rows[Resource.VMS].limit, rows[Resource.VMS].override) == (10, False)
    assert rows[Resource.VCPUS].override
    cleared = await admin.set_quota(ADMIN, "acme", [], clear=True)
    assert not any(r.override for r in cleared)
    for bad in (
        [],  # nothing to do
        [QuotaChange(Resource.VMS, 1), QuotaChange(Resource.VMS, 2)],
        [QuotaChange(Resource.VMS, -1)],
    ):
        with pytest.raises(InvalidArgument):
            await admin.set_quota(ADMIN, "acme", bad, clear=False)
    with pytest.raises(InvalidArgument):
        await admin.get_quota(ADMIN, "not a customer")
    assert not any(r.override for r in await admin.get_quota(ADMIN, "acme"))

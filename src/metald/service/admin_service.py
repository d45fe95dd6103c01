"""The admin role's use cases: API keys and per-customer quotas, over the API.

The role model (core/identity.py) gives admins what operators have and keys and quotas too;
this is where "too" is enforced: every use case here refuses any caller but an admin with
permission_denied, before it looks at anything. The same work is done on the daemon's host
by `metald keys` and `metald quota` (which open the database directly); both paths go
through the same ports (ApiKeys, Quotas) and the same rules (core/apikeys.py, the quota
model), so a key made here is the one the CLI lists, and the reverse.

Each call is an audit row written by the API's audit interceptor (an admin's calls always
are); the customer a key or a quota belongs to is noted for that row (core.audit.note).
A key is created only when API keys are on (the pepper is what makes its hash): otherwise
failed_precondition, and nothing is stored.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from metald.core import apikeys, audit
from metald.core.apikeys import ApiKey, NewKey
from metald.core.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from metald.core.identity import Caller, Role
from metald.core.ports import ApiKeys, Quotas
from metald.core.quotas import Limit, QuotaDefaults, Resource
from metald.core.validation import check_customer_id

MAX_DESCRIPTION = 256
MAX_EXPIRY_SECONDS = 10 * 365 * 86400


@dataclass(frozen=True)
class QuotaRow:
    resource: Resource
    limit: Limit  # None: unlimited
    override: bool  # False: the host's default
    used: int


@dataclass(frozen=True)
class QuotaChange:
    """One resource's new value: a limit (None: unlimited), or `default` (drop the
    override)."""

    resource: Resource
    limit: Limit = None
    default: bool = False


class AdminService:
    def __init__(
        self,
        keys: ApiKeys,
        quotas: Quotas,
        defaults: QuotaDefaults,
        *,
        pepper: bytes | None,
        clock: Callable[[], float],
    ) -> None:
        """`pepper`: the API keys' pepper (None: API keys are off, no key can be made)."""
        self._keys = keys
        self._quotas = quotas
        self._defaults = defaults
        self._pepper = pepper
        self._clock = clock

    # -- API keys --------------------------------------------------------------------------

    async def create_api_key(
        self,
        caller: Caller,
        *,
        customer_id: str,
        role: str,
        expires_in_seconds: int,
        description: str,
    ) -> NewKey:
        _admin(caller)
        try:
            key_role = Role(role or Role.CUSTOMER.value)
        except ValueError:
            roles = ", ".join(r.value for r in Role)
            raise InvalidArgument("role", f"must be one of {roles}") from None
        if customer_id:
            check_customer_id(customer_id)
        elif key_role is Role.CUSTOMER:
            raise InvalidArgument("customer_id", "a customer key needs its customer")
        if not 0 <= expires_in_seconds <= MAX_EXPIRY_SECONDS:
            raise InvalidArgument(
                "expires_in_seconds", f"must be 0 (never) to {MAX_EXPIRY_SECONDS}"
            )
        if len(description) > MAX_DESCRIPTION:
            raise InvalidArgument("description", f"at most {MAX_DESCRIPTION} characters")
        if self._pepper is None:
            raise FailedPrecondition(
                "API keys are off on this host (UNKEY_METALD_AUTH_API_KEYS): no key is made"
            )
        audit.note(owner=customer_id or None)
        now = self._clock()
        made = apikeys.new_key(
            self._pepper,
            customer_id=customer_id or None,
            role=key_role,
            now=now,
            expires_at=now + expires_in_seconds if expires_in_seconds else None,
            description=description,
        )
        await self._keys.add(made.key)
        return made

    async def list_api_keys(self, caller: Caller) -> list[ApiKey]:
        _admin(caller)
        return await self._keys.all()

    async def revoke_api_key(self, caller: Caller, key_id: str) -> ApiKey:
        _admin(caller)
        if not apikeys.KEY_ID.fullmatch(key_id):
            raise InvalidArgument("key_id", "a key id is 16 characters a-z0-9")
        key = await self._keys.revoke(key_id, self._clock())
        if key is None:
            raise NotFound(f"no API key {key_id!r}")
        audit.note(owner=key.customer_id)
        return key

    def status(self, key: ApiKey) -> str:
        """active, expired or revoked, now."""
        return key.refusal(self._clock()) or "active"

    # -- quotas ----------------------------------------------------------------------------

    async def get_quota(self, caller: Caller, customer_id: str) -> list[QuotaRow]:
        _admin(caller)
        check_customer_id(customer_id)
        audit.note(owner=customer_id)
        return await self._rows(customer_id)

    async def set_quota(
        self, caller: Caller, customer_id: str, changes: list[QuotaChange], *, clear: bool
    ) -> list[QuotaRow]:
        _admin(caller)
        check_customer_id(customer_id)
        if not changes and not clear:
            raise InvalidArgument("changes", "give at least one change, or clear")
        if len({c.resource for c in changes}) != len(changes):
            raise InvalidArgument("changes", "each resource at most once")
        for change in changes:
            if change.limit is not None and change.limit < 0:
                raise InvalidArgument("changes", f"{change.resource}: a limit is not negative")
        audit.note(owner=customer_id)
        if clear:
            await self._quotas.clear_override(customer_id)
        for change in changes:
            if change.default:
                await self._quotas.clear_override(customer_id, change.resource)
            else:
                await self._quotas.set_override(customer_id, change.resource, change.limit)
        return await self._rows(customer_id)

    async def _rows(self, customer_id: str) -> list[QuotaRow]:
        overrides: Mapping[Resource, Limit] = await self._quotas.overrides(customer_id)
        usage = await self._quotas.usage(customer_id)
        limits = self._defaults.effective(overrides)
        return [QuotaRow(r, limits[r], r in overrides, usage.of(r)) for r in Resource]


def _admin(caller: Caller) -> None:
    if caller.role is not Role.ADMIN:
        raise PermissionDenied("keys and quotas are for the admin role")

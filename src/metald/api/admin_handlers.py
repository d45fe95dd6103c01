"""The AdminService RPCs (proto/metald/admin/v1/admin.proto): proto in, service call, proto
out, as api/handlers.py does for VmService. The caller is the auth interceptor's."""

from __future__ import annotations

from typing import Any

from connectrpc.request import RequestContext

from metald.api.auth import current_caller
from metald.core.apikeys import ApiKey
from metald.core.errors import InvalidArgument
from metald.core.quotas import Resource
from metald.gen.metald.admin.v1 import admin_pb2 as pb
from metald.service.admin_service import AdminService, QuotaChange, QuotaRow

Ctx = RequestContext[Any, Any]


class AdminHandlers:
    def __init__(self, service: AdminService) -> None:
        self._service = service

    async def create_api_key(
        self, request: pb.CreateApiKeyRequest, ctx: Ctx, /
    ) -> pb.CreateApiKeyResponse:
        made = await self._service.create_api_key(
            current_caller.get(),
            customer_id=request.customer_id,
            role=request.role,
            expires_in_seconds=request.expires_in_seconds,
            description=request.description,
        )
        return pb.CreateApiKeyResponse(key=self._key(made.key), token=made.token)

    async def list_api_keys(
        self, request: pb.ListApiKeysRequest, ctx: Ctx, /
    ) -> pb.ListApiKeysResponse:
        keys = await self._service.list_api_keys(current_caller.get())
        return pb.ListApiKeysResponse(keys=[self._key(k) for k in keys])

    async def revoke_api_key(
        self, request: pb.RevokeApiKeyRequest, ctx: Ctx, /
    ) -> pb.RevokeApiKeyResponse:
        key = await self._service.revoke_api_key(current_caller.get(), request.key_id)
        return pb.RevokeApiKeyResponse(key=self._key(key))

    async def get_quota(self, request: pb.GetQuotaRequest, ctx: Ctx, /) -> pb.GetQuotaResponse:
        rows = await self._service.get_quota(current_caller.get(), request.customer_id)
        return pb.GetQuotaResponse(customer_id=request.customer_id, quotas=_quotas(rows))

    async def set_quota(self, request: pb.SetQuotaRequest, ctx: Ctx, /) -> pb.SetQuotaResponse:
        changes = [_change(c) for c in request.changes]
        rows = await self._service.set_quota(
            current_caller.get(), request.customer_id, changes, clear=request.clear
        )
        return pb.SetQuotaResponse(customer_id=request.customer_id, quotas=_quotas(rows))

    def _key(self, key: ApiKey) -> pb.ApiKey:
        return pb.ApiKey(
            key_id=key.key_id,
            customer_id=key.customer_id or "",
            role=key.role.value,
            created_at_unix=int(key.created_at),
            expires_at_unix=int(key.expires_at or 0),
            revoked_at_unix=int(key.revoked_at or 0),
            status=self._service.status(key),
            description=key.description,
        )


def _quotas(rows: list[QuotaRow]) -> list[pb.Quota]:
    return [
        pb.Quota(
            resource=row.resource.value,
            unlimited=row.limit is None,
            limit=row.limit or 0,
            override=row.override,
            used=row.used,
        )
        for row in rows
    ]


def _change(change: pb.QuotaChange) -> QuotaChange:
    try:
        resource = Resource(change.resource)
    except ValueError:
        names = ", ".join(r.value for r in Resource)
        raise InvalidArgument("changes.resource", f"must be one of {names}") from None
    which = change.WhichOneof("value")
    if which == "limit":
        return QuotaChange(resource, change.limit)
    if which == "unlimited" and change.unlimited:
        return QuotaChange(resource, None)
    if which == "default" and change.default:
        return QuotaChange(resource, default=True)
    raise InvalidArgument(
        "changes.value", f"{resource}: give a limit, unlimited: true or default: true"
    )

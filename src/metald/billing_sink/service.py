"""The sink's billing.v1.BillingService: billaged's rules, and every call kept in the store.

billaged's rules, kept so that a client that works against the sink works against it:
- every RPC but SendHeartbeat needs a non-empty `X-Tenant-ID` header, else
  `unauthenticated` "tenant ID is required" (checked first, before the request's fields);
- a batch without metrics answers success=false, message "no metrics provided";
- every other accepted call answers success=true.
The sink adds one refusal billaged does not make: a call without a vm_id is
`invalid_argument` (it would bill nobody).
"""

from __future__ import annotations

import logging

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext

from metald.billing import codec
from metald.billing_sink.store import Notice, SinkStore
from metald.gen.billing.v1 import billing_pb2 as pb

log = logging.getLogger("metald.billing_sink")

TENANT_HEADER = "x-tenant-id"
TENANT_REQUIRED = "tenant ID is required"
NO_METRICS = "no metrics provided"


def tenant_of(ctx: RequestContext[object, object]) -> str:
    """The caller's tenant, or the `unauthenticated` error billaged answers without one."""
    tenant = ctx.request_headers.get(TENANT_HEADER, "").strip()
    if not tenant:
        raise ConnectError(Code.UNAUTHENTICATED, TENANT_REQUIRED)
    return tenant


def _need_vm(vm_id: str) -> None:
    if not vm_id:
        raise ConnectError(Code.INVALID_ARGUMENT, "vm_id is required")


class BillingSink:
    """billing.v1.BillingService over a SinkStore."""

    def __init__(self, store: SinkStore) -> None:
        self._store = store

    async def send_metrics_batch(
        self, request: pb.SendMetricsBatchRequest, ctx: RequestContext[object, object]
    ) -> pb.SendMetricsBatchResponse:
        tenant = tenant_of(ctx)
        _need_vm(request.vm_id)
        if not request.metrics:
            return pb.SendMetricsBatchResponse(success=False, message=NO_METRICS)
        records = codec.usage_records(request)
        result = await self._store.run(lambda: self._store.add_samples(tenant, records))
        log.debug(
            "batch of VM %s (customer %s): %d stored, %d duplicates",
            request.vm_id, request.customer_id, result.stored, result.duplicates,
        )  # fmt: skip
        return pb.SendMetricsBatchResponse(
            success=True,
            message=f"{result.stored} stored, {result.duplicates} duplicates dropped",
        )

    async def send_heartbeat(
        self, request: pb.SendHeartbeatRequest, ctx: RequestContext[object, object]
    ) -> pb.SendHeartbeatResponse:
        active = list(request.active_vms)
        await self._store.run(lambda: self._store.add_heartbeat(request.instance_id, active))
        return pb.SendHeartbeatResponse(success=True)

    async def notify_vm_started(
        self, request: pb.NotifyVmStartedRequest, ctx: RequestContext[object, object]
    ) -> pb.NotifyVmStartedResponse:
        notice = Notice(
            "started", request.vm_id, request.customer_id, tenant_of(ctx), at_ns=request.start_time
        )
        await self._notice(notice)
        return pb.NotifyVmStartedResponse(success=True)

    async def notify_vm_stopped(
        self, request: pb.NotifyVmStoppedRequest, ctx: RequestContext[object, object]
    ) -> pb.NotifyVmStoppedResponse:
        notice = Notice("stopped", request.vm_id, "", tenant_of(ctx), at_ns=request.stop_time)
        await self._notice(notice)
        return pb.NotifyVmStoppedResponse(success=True)

    async def notify_possible_gap(
        self, request: pb.NotifyPossibleGapRequest, ctx: RequestContext[object, object]
    ) -> pb.NotifyPossibleGapResponse:
        notice = Notice(
            "gap", request.vm_id, "", tenant_of(ctx),
            last_sent_ns=request.last_sent, resume_ns=request.resume_time,
        )  # fmt: skip
        await self._notice(notice)
        return pb.NotifyPossibleGapResponse(success=True)

    async def _notice(self, notice: Notice) -> None:
        _need_vm(notice.vm_id)
        await self._store.run(lambda: self._store.add_notice(notice))
        log.info(
            "%s notice of VM %s (tenant %s): %s", notice.kind, notice.vm_id, notice.tenant_id,
            f"last sent {notice.last_sent_ns}, resumed {notice.resume_ns}"
            if notice.kind == "gap" else f"at {notice.at_ns}",
        )  # fmt: skip

"""The billing client: core.ports.Billing over ConnectRPC to billing.v1.BillingService.

Wire-compatible with the existing billaged: Connect protocol with binary protobuf (what its
Go clients send), the VM's customer in an `X-Tenant-ID` header on every call that has one
(billaged refuses the others as unauthenticated; SendHeartbeat names no VM and needs none),
notice times as Unix nanoseconds, sample instants as Timestamps (codec.py).

What a failure means decides what the caller does with its records, so the mapping is the
point of this module:
- BillingUnavailable (keep the records, retry later): no connection, no answer within the
  timeout, `unavailable` (also what connectrpc makes of HTTP 502/503/504 and 429),
  `deadline_exceeded`, and every server-side failure (`internal`, `unknown` -- a bare 500 --,
  `aborted`, `resource_exhausted`, `data_loss`, `canceled`): the records may not have been
  stored, and a retry is harmless because the service bills deltas of cumulative counters
  (a record sent twice changes nothing). Also a refusal of who is calling or of where:
  `unauthenticated`, `permission_denied`, `unimplemented` (a 404: a wrong path or a proxy in
  the way), `not_found`. Those are a deployment fault an operator fixes (credentials, the
  endpoint), not a fault of the records: dropping them would lose usage for good, so they
  wait in the bounded backlog like any outage, and the delivery's warning says why.
- BillingRejected (retrying the same call will not help): the service answered
  success=false, or refused what was sent (`invalid_argument`, `failed_precondition`,
  `already_exists`, `out_of_range`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from pyqwest import Client, HTTPTransport

from metald.billing import codec
from metald.core.errors import BillingRejected, BillingUnavailable
from metald.core.metering import UsageRecord
from metald.gen.billing.v1 import billing_pb2
from metald.gen.billing.v1.billing_connect import BillingServiceClient

TENANT_HEADER = "X-Tenant-ID"

# Connect codes after which the call may not have taken effect: try again later.
RETRYABLE = frozenset(
    {
        Code.UNAVAILABLE,
        Code.DEADLINE_EXCEEDED,
        Code.INTERNAL,
        Code.UNKNOWN,
        Code.ABORTED,
        Code.RESOURCE_EXHAUSTED,
        Code.DATA_LOSS,
        Code.CANCELED,
        # who or where: a deployment fault, not the records' (module docstring)
        Code.UNAUTHENTICATED,
        Code.PERMISSION_DENIED,
        Code.UNIMPLEMENTED,
        Code.NOT_FOUND,
    }
)
_MAX_DETAIL = 200
POOL_IDLE_SECONDS = 3.0


class _Answer(Protocol):
    @property
    def success(self) -> bool: ...


A = TypeVar("A", bound=_Answer)
Rpc = Callable[..., Awaitable[A]]


class ConnectBilling:
    """core.ports.Billing against one billing.v1 endpoint (`http://host:port`)."""

    def __init__(
        self, endpoint: str, *, timeout: float = 5.0, connect_timeout: float = 2.0
    ) -> None:
        self.endpoint = endpoint.rstrip("/")
        self._timeout = timeout
        # Idle connections are dropped before a server's keep-alive would close them (the
        # sink's hypercorn closes them after 5 s): reusing one the server is closing at that
        # moment fails the call for nothing.
        self._transport = HTTPTransport(
            connect_timeout=connect_timeout, pool_idle_timeout=POOL_IDLE_SECONDS
        )
        self._stub = BillingServiceClient(
            self.endpoint,
            http_client=Client(self._transport),
            timeout_ms=max(1, round(timeout * 1000)),
            send_compression=None,
        )

    async def send_batch(
        self, vm_id: str, customer_id: str, records: Sequence[UsageRecord]
    ) -> None:
        try:
            codec.check_records(vm_id, customer_id, records)
        except ValueError as exc:
            raise BillingRejected(f"billing SendMetricsBatch not sent: {exc}") from None
        request = codec.batch_request(vm_id, customer_id, records)
        answer = await self._call(
            "SendMetricsBatch", customer_id, self._stub.send_metrics_batch, request
        )
        if not answer.success:
            raise BillingRejected(
                f"billing SendMetricsBatch for VM {vm_id} refused: "
                f"{answer.message or 'success=false'}"
            )

    async def heartbeat(self, instance_id: str, active_vm_ids: Sequence[str]) -> None:
        request = billing_pb2.SendHeartbeatRequest(
            instance_id=instance_id, active_vms=list(active_vm_ids)
        )
        answer = await self._call("SendHeartbeat", None, self._stub.send_heartbeat, request)
        self._accepted("SendHeartbeat", answer)

    async def vm_started(self, vm_id: str, customer_id: str, at_ns: int) -> None:
        request = billing_pb2.NotifyVmStartedRequest(
            vm_id=vm_id, customer_id=customer_id, start_time=at_ns
        )
        answer = await self._call(
            "NotifyVmStarted", customer_id, self._stub.notify_vm_started, request
        )
        self._accepted("NotifyVmStarted", answer)

    async def vm_stopped(self, vm_id: str, customer_id: str, at_ns: int) -> None:
        request = billing_pb2.NotifyVmStoppedRequest(vm_id=vm_id, stop_time=at_ns)
        answer = await self._call(
            "NotifyVmStopped", customer_id, self._stub.notify_vm_stopped, request
        )
        self._accepted("NotifyVmStopped", answer)

    async def possible_gap(
        self, vm_id: str, customer_id: str, last_sent_ns: int, resume_ns: int
    ) -> None:
        request = billing_pb2.NotifyPossibleGapRequest(
            vm_id=vm_id, last_sent=last_sent_ns, resume_time=resume_ns
        )
        answer = await self._call(
            "NotifyPossibleGap", customer_id, self._stub.notify_possible_gap, request
        )
        self._accepted("NotifyPossibleGap", answer)

    async def close(self) -> None:
        await self._stub.close()
        await self._transport.__aexit__(None, None, None)

    @staticmethod
    def _accepted(rpc: str, answer: _Answer) -> None:
        if not answer.success:
            raise BillingRejected(f"billing {rpc} refused: success=false")

    async def _call(self, rpc: str, tenant: str | None, method: Rpc[A], request: Any) -> A:
        headers: Mapping[str, str] = {TENANT_HEADER: tenant} if tenant else {}
        try:
            answer = await method(request, headers=headers)
        except ConnectError as err:
            raise self._error(rpc, err) from err
        except (OSError, TimeoutError) as exc:  # a transport error connectrpc did not wrap
            raise BillingUnavailable(
                f"billing {rpc}: cannot reach {self.endpoint}: {_detail(str(exc))}"
            ) from exc
        return answer

    def _error(self, rpc: str, err: ConnectError) -> BillingUnavailable | BillingRejected:
        cause = err.__cause__
        if err.code is Code.DEADLINE_EXCEEDED:
            return BillingUnavailable(
                f"billing {rpc}: no answer from {self.endpoint} within {self._timeout:g}s"
            )
        if (
            err.code is Code.UNAVAILABLE
            and cause is not None
            and not isinstance(cause, ConnectError)
        ):
            return BillingUnavailable(
                f"billing {rpc}: cannot reach {self.endpoint}: {_detail(str(cause))}"
            )
        detail = f"billing {rpc}: {self.endpoint} answered {err.code.value}: {_detail(err.message)}"
        if err.code in RETRYABLE:
            return BillingUnavailable(detail)
        return BillingRejected(detail)


def _detail(text: str) -> str:
    marker = "client error (Connect): "
    if marker in text:
        text = text.split(marker, 1)[1]
    return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 3] + "..."

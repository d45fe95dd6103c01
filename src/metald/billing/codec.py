"""Usage records <-> billing.v1 messages, and the wire's two forms of time.

One place, shared by the client and the sink, so that what one writes the other reads back
unchanged: notices carry Unix nanoseconds as int64; a sample carries its instant as a
google.protobuf.Timestamp (seconds + nanos, nanos always in [0, 1e9) -- also for instants
before 1970, which Timestamp spells as negative seconds and positive nanos).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from google.protobuf.timestamp_pb2 import Timestamp

from metald.core.metering import UsageRecord
from metald.gen.billing.v1 import billing_pb2

NANOS = 1_000_000_000


def timestamp_from_ns(ns: int) -> Timestamp:
    seconds, nanos = divmod(ns, NANOS)
    return Timestamp(seconds=seconds, nanos=nanos)


def ns_from_timestamp(ts: Timestamp) -> int:
    return ts.seconds * NANOS + ts.nanos


def vm_metrics(record: UsageRecord) -> billing_pb2.VMMetrics:
    return billing_pb2.VMMetrics(
        timestamp=timestamp_from_ns(record.timestamp_ns),
        cpu_time_nanos=record.cpu_time_ns,
        memory_usage_bytes=record.memory_bytes,
        disk_read_bytes=record.disk_read_bytes,
        disk_write_bytes=record.disk_write_bytes,
        network_rx_bytes=record.network_rx_bytes,
        network_tx_bytes=record.network_tx_bytes,
    )


def batch_request(
    vm_id: str, customer_id: str, records: Iterable[UsageRecord]
) -> billing_pb2.SendMetricsBatchRequest:
    return billing_pb2.SendMetricsBatchRequest(
        vm_id=vm_id, customer_id=customer_id, metrics=[vm_metrics(r) for r in records]
    )


def usage_records(request: billing_pb2.SendMetricsBatchRequest) -> list[UsageRecord]:
    """The records of a batch, in the order they came (the VM and customer are the
    request's: VMMetrics has neither)."""
    return [usage_record(request.vm_id, request.customer_id, m) for m in request.metrics]


def usage_record(vm_id: str, customer_id: str, metrics: billing_pb2.VMMetrics) -> UsageRecord:
    return UsageRecord(
        vm_id=vm_id,
        customer_id=customer_id,
        timestamp_ns=ns_from_timestamp(metrics.timestamp),
        cpu_time_ns=metrics.cpu_time_nanos,
        memory_bytes=metrics.memory_usage_bytes,
        disk_read_bytes=metrics.disk_read_bytes,
        disk_write_bytes=metrics.disk_write_bytes,
        network_rx_bytes=metrics.network_rx_bytes,
        network_tx_bytes=metrics.network_tx_bytes,
    )


def check_records(vm_id: str, customer_id: str, records: Sequence[UsageRecord]) -> None:
    """A batch names one VM of one customer: refuse a record of another (a caller's bug
    that would bill the wrong VM)."""
    for record in records:
        if record.vm_id != vm_id or record.customer_id != customer_id:
            raise ValueError(
                f"a batch of VM {vm_id} (customer {customer_id}) holds a record of VM "
                f"{record.vm_id} (customer {record.customer_id})"
            )

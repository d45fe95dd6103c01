"""The sink's BillingService on a real SQLite file: billaged's tenant rule, empty batches,
duplicates dropped, notices and heartbeats kept (the handlers called directly; the same over
the wire is tests/integration/test_billing_sink.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.method import IdempotencyLevel, MethodInfo, StreamType
from connectrpc.request import Headers, RequestContext

from metald.billing import codec
from metald.billing_sink.service import BillingSink
from metald.billing_sink.store import Notice, SinkStore
from metald.core.metering import UsageRecord
from metald.gen.billing.v1 import billing_pb2 as pb


def ctx(tenant: str | None = "acme") -> RequestContext[Any, Any]:
    method: MethodInfo[Any, Any] = MethodInfo(
        name="X", service_name="billing.v1.BillingService", input=pb.SendHeartbeatRequest,
        output=pb.SendHeartbeatResponse, idempotency_level=IdempotencyLevel.UNKNOWN,
        stream_type=StreamType.UNARY,
    )  # fmt: skip
    headers = Headers({"X-Tenant-ID": tenant} if tenant is not None else {})
    return RequestContext(method=method, http_method="POST", request_headers=headers)


@pytest.fixture
def store(tmp_path: Path) -> Any:
    s = SinkStore(tmp_path / "sink.db")
    yield s
    s.close()


def batch(*timestamps: int, vm_id: str = "vm-1") -> pb.SendMetricsBatchRequest:
    records = [UsageRecord(vm_id, "acme", t, cpu_time_ns=t * 10) for t in timestamps]
    return codec.batch_request(vm_id, "acme", records)


CALLS = {
    "send_metrics_batch": batch(1),
    "notify_vm_started": pb.NotifyVmStartedRequest(vm_id="vm-1", customer_id="acme", start_time=1),
    "notify_vm_stopped": pb.NotifyVmStoppedRequest(vm_id="vm-1", stop_time=2),
    "notify_possible_gap": pb.NotifyPossibleGapRequest(vm_id="vm-1", last_sent=1, resume_time=3),
}


@pytest.mark.parametrize("rpc", sorted(CALLS))
@pytest.mark.parametrize("tenant", [None, "", "  "])
async def test_every_call_but_the_heartbeat_needs_a_tenant(
    store: SinkStore, rpc: str, tenant: str | None
) -> None:
    with pytest.raises(ConnectError) as err:
        await getattr(BillingSink(store), rpc)(CALLS[rpc], ctx(tenant))
    assert (err.value.code, err.value.message) == (Code.UNAUTHENTICATED, "tenant ID is required")
    assert store.samples() == [] and store.notices() == []  # nothing kept


async def test_the_tenant_is_checked_before_the_request_fields(store: SinkStore) -> None:
    with pytest.raises(ConnectError) as err:
        await BillingSink(store).send_metrics_batch(pb.SendMetricsBatchRequest(), ctx(None))
    assert err.value.code is Code.UNAUTHENTICATED


async def test_a_heartbeat_needs_no_tenant_and_is_kept(store: SinkStore) -> None:
    request = pb.SendHeartbeatRequest(instance_id="host-1", active_vms=["vm-1", "vm-2"])
    answer = await BillingSink(store).send_heartbeat(request, ctx(None))
    assert answer.success
    [beat] = store.heartbeats()
    assert (beat.instance_id, beat.active_vms) == ("host-1", ("vm-1", "vm-2"))


async def test_an_empty_batch_is_refused_as_billaged_does(store: SinkStore) -> None:
    answer = await BillingSink(store).send_metrics_batch(batch(), ctx())
    assert (answer.success, answer.message) == (False, "no metrics provided")


async def test_a_call_without_a_vm_is_invalid(store: SinkStore) -> None:
    with pytest.raises(ConnectError) as err:
        await BillingSink(store).notify_vm_stopped(pb.NotifyVmStoppedRequest(stop_time=1), ctx())
    assert err.value.code is Code.INVALID_ARGUMENT
    assert store.notices() == []


async def test_duplicates_by_vm_and_instant_are_dropped_first_copy_kept(store: SinkStore) -> None:
    sink = BillingSink(store)
    first = await sink.send_metrics_batch(batch(1, 2, 3), ctx())
    assert (first.success, first.message) == (True, "3 stored, 0 duplicates dropped")
    again = batch(2, 3, 4)
    again.metrics[0].cpu_time_nanos = 999  # a different copy of instant 2: the first stays
    second = await sink.send_metrics_batch(again, ctx())
    assert second.message == "1 stored, 2 duplicates dropped"
    other_vm = await sink.send_metrics_batch(batch(1, vm_id="vm-2"), ctx())
    assert other_vm.message == "1 stored, 0 duplicates dropped"
    got = [(r.vm_id, r.timestamp_ns, r.cpu_time_ns) for r in store.samples()]
    assert got == [("vm-1", 1, 10), ("vm-1", 2, 20), ("vm-1", 3, 30), ("vm-1", 4, 40),
                   ("vm-2", 1, 10)]  # fmt: skip
    assert [r.vm_id for r in store.samples("acme")] == ["vm-1"] * 4 + ["vm-2"]
    assert store.samples("globex") == []


async def test_notices_are_kept_in_order_with_their_times(store: SinkStore) -> None:
    sink = BillingSink(store)
    for rpc in ("notify_vm_started", "notify_possible_gap", "notify_vm_stopped"):
        assert (await getattr(sink, rpc)(CALLS[rpc], ctx("tenant-a"))).success
    assert store.notices() == [
        Notice("started", "vm-1", "acme", "tenant-a", at_ns=1),
        Notice("gap", "vm-1", "", "tenant-a", last_sent_ns=1, resume_ns=3),
        Notice("stopped", "vm-1", "", "tenant-a", at_ns=2),
    ]
    assert store.stops_by_vm() == {"vm-1": [2]}


def test_what_was_stored_survives_reopening_read_only(tmp_path: Path) -> None:
    path = tmp_path / "sink.db"
    writer = SinkStore(path)
    writer.add_samples("acme", [UsageRecord("vm-1", "acme", 5, cpu_time_ns=7)])
    reader = SinkStore(path, read_only=True)
    try:
        assert reader.samples() == [UsageRecord("vm-1", "acme", 5, cpu_time_ns=7)]
        with pytest.raises(Exception, match="readonly"):
            reader.add_samples("acme", [UsageRecord("vm-1", "acme", 6)])
    finally:
        reader.close()
        writer.close()


def test_a_missing_file_is_not_created_for_reading(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no billing sink database"):
        SinkStore(tmp_path / "nope.db", read_only=True)
    assert not (tmp_path / "nope.db").exists()

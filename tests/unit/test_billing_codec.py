"""The one translation between usage records and billing.v1 messages (client and sink)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from metald.billing import codec
from metald.core.metering import UsageRecord
from metald.gen.billing.v1 import billing_pb2

INT64 = st.integers(min_value=0, max_value=2**63 - 1)
# Timestamp's range: years 1 to 9999.
INSTANTS = st.integers(min_value=-62_135_596_800 * 10**9, max_value=253_402_300_799 * 10**9)


def record(ts: int = 1_764_000_000_123_456_789, **counters: int) -> UsageRecord:
    return UsageRecord("vm-1", "acme", ts, **counters)


def test_a_timestamp_carries_seconds_and_nanos() -> None:
    ts = codec.timestamp_from_ns(1_764_000_000_123_456_789)
    assert (ts.seconds, ts.nanos) == (1_764_000_000, 123_456_789)


def test_an_instant_before_1970_has_positive_nanos() -> None:
    ts = codec.timestamp_from_ns(-1)
    assert (ts.seconds, ts.nanos) == (-1, 999_999_999)
    assert codec.ns_from_timestamp(ts) == -1


@given(INSTANTS)
def test_instants_survive_the_wire(ns: int) -> None:
    ts = codec.timestamp_from_ns(ns)
    assert 0 <= ts.nanos < 10**9
    wire = billing_pb2.VMMetrics(timestamp=ts).SerializeToString()
    assert codec.ns_from_timestamp(billing_pb2.VMMetrics.FromString(wire).timestamp) == ns


@given(INSTANTS, INT64, INT64, INT64, INT64, INT64, INT64)
def test_records_survive_the_wire(
    ns: int, cpu: int, mem: int, rd: int, wr: int, rx: int, tx: int
) -> None:
    records = [
        UsageRecord("vm-1", "acme", ns, cpu, mem, rd, wr, rx, tx),
        UsageRecord("vm-1", "acme", ns + 1, cpu // 2, mem, rd, wr, rx, tx),
    ]
    wire = codec.batch_request("vm-1", "acme", records).SerializeToString()
    back = codec.usage_records(billing_pb2.SendMetricsBatchRequest.FromString(wire))
    assert back == records


def test_the_fields_land_on_billageds_numbers() -> None:
    m = codec.vm_metrics(
        record(cpu_time_ns=2, memory_bytes=3, disk_read_bytes=4, disk_write_bytes=5,
               network_rx_bytes=6, network_tx_bytes=7)
    )  # fmt: skip
    numbers = {f.name: f.number for f, _ in m.ListFields()}
    assert numbers == {
        "timestamp": 1, "cpu_time_nanos": 2, "memory_usage_bytes": 3, "disk_read_bytes": 4,
        "disk_write_bytes": 5, "network_rx_bytes": 6, "network_tx_bytes": 7,
    }  # fmt: skip
    assert [getattr(m, n) for n in list(numbers)[1:]] == [2, 3, 4, 5, 6, 7]


def test_a_batch_of_another_vm_or_customer_is_refused() -> None:
    codec.check_records("vm-1", "acme", [record()])
    with pytest.raises(ValueError, match="vm-2"):
        codec.check_records("vm-1", "acme", [record(), UsageRecord("vm-2", "acme", 1)])
    with pytest.raises(ValueError, match="globex"):
        codec.check_records("vm-1", "acme", [UsageRecord("vm-1", "globex", 1)])

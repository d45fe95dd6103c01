"""UNKEY_METALD_BILLING_*: off (no billing), mock (one JSON log line a call, nothing sent),
or the billing.v1 client of the endpoint; bad values stop start-up naming the variable."""

from __future__ import annotations

import json
import logging

import pytest

from metald.app import build_billing
from metald.billing.client import ConnectBilling
from metald.billing.mock import MockBilling
from metald.config import ConfigError, load_settings
from metald.core.metering import UsageRecord


def test_billing_is_on_by_default_to_billageds_port(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ENABLED", "ENDPOINT", "MOCK_MODE"):
        monkeypatch.delenv(f"UNKEY_METALD_BILLING_{name}", raising=False)
    s = load_settings()
    assert (s.billing_enabled, s.billing_endpoint, s.billing_mock_mode) == (
        True,
        "http://localhost:8081",
        False,
    )


async def test_off_means_no_billing_at_all() -> None:
    assert build_billing(load_settings(billing_enabled=False, billing_mock_mode=True)) is None


async def test_on_is_the_client_of_the_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNKEY_METALD_BILLING_ENDPOINT", "http://127.0.0.1:9999/")
    monkeypatch.setenv("UNKEY_METALD_BILLING_TIMEOUT_SECONDS", "1.5")
    billing = build_billing(load_settings())
    assert isinstance(billing, ConnectBilling)
    assert billing.endpoint == "http://127.0.0.1:9999"
    await billing.close()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("UNKEY_METALD_BILLING_ENDPOINT", "localhost:8081"),
        ("UNKEY_METALD_BILLING_ENDPOINT", "ftp://x"),
        ("UNKEY_METALD_BILLING_ENDPOINT", "http://"),
        ("UNKEY_METALD_BILLING_TIMEOUT_SECONDS", "0"),
        ("UNKEY_METALD_BILLING_CONNECT_TIMEOUT_SECONDS", "-1"),
        ("UNKEY_METALD_BILLING_MOCK_MODE", "perhaps"),
    ],
)
def test_a_bad_value_names_its_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=variable):
        load_settings()


async def test_mock_mode_logs_one_json_line_per_call(caplog: pytest.LogCaptureFixture) -> None:
    billing = build_billing(load_settings(billing_mock_mode=True))
    assert isinstance(billing, MockBilling)
    records = [
        UsageRecord("vm-1", "acme", 10, cpu_time_ns=1, memory_bytes=2),
        UsageRecord("vm-1", "acme", 20, cpu_time_ns=3, memory_bytes=4, network_tx_bytes=5),
    ]
    with caplog.at_level(logging.INFO, logger="metald.billing.mock"):
        await billing.send_batch("vm-1", "acme", records)
        await billing.heartbeat("host-1", ["vm-1"])
        await billing.vm_started("vm-1", "acme", 1)
        await billing.vm_stopped("vm-1", "acme", 2)
        await billing.possible_gap("vm-1", "acme", 3, 4)
        await billing.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "metald.billing.mock"]
    events = [json.loads(line) for line in lines]
    assert all("\n" not in line for line in lines)
    assert [e["rpc"] for e in events] == [
        "SendMetricsBatch", "SendHeartbeat", "NotifyVmStarted", "NotifyVmStopped",
        "NotifyPossibleGap",
    ]  # fmt: skip
    batch, beat, started, stopped, gap = events
    assert (batch["tenant"], batch["vm_id"], batch["records"]) == ("acme", "vm-1", 2)
    assert batch["first"]["timestamp_ns"] == 10
    assert batch["last"] == {
        "timestamp_ns": 20, "cpu_time_ns": 3, "memory_bytes": 4, "disk_read_bytes": 0,
        "disk_write_bytes": 0, "network_rx_bytes": 0, "network_tx_bytes": 5,
    }  # fmt: skip
    assert beat == {
        "event": "billing_mock", "rpc": "SendHeartbeat", "instance_id": "host-1",
        "active_vms": ["vm-1"],
    }  # fmt: skip
    assert (started["start_time"], stopped["stop_time"]) == (1, 2)
    assert (gap["last_sent"], gap["resume_time"], gap["tenant"]) == (3, 4, "acme")


async def test_with_traces_on_billing_calls_are_spans() -> None:
    from metald.observability.billing import TracedBilling

    billing = build_billing(load_settings(billing_mock_mode=True, otel_enabled=True))
    assert isinstance(billing, TracedBilling)
    await billing.close()

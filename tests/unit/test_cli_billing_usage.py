"""`metald billing usage` on a sink file written by the sink's own store: per VM and per
customer, --customer, --json, the table, and a missing file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from metald.billing_sink.store import Notice, SinkStore
from metald.cli.billing import human_bytes
from metald.cli.main import app
from metald.core.metering import UsageRecord

GIB = 2**30
HOUR = 3600 * 10**9
runner = CliRunner()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "sink.db"
    store = SinkStore(path)
    store.add_samples(
        "acme",
        [
            UsageRecord("vm-a", "acme", 0, cpu_time_ns=10**9, memory_bytes=GIB, disk_read_bytes=5),
            UsageRecord("vm-a", "acme", HOUR, cpu_time_ns=3 * 10**9, memory_bytes=GIB,
                        disk_read_bytes=2**20 + 5, disk_write_bytes=7, network_rx_bytes=8,
                        network_tx_bytes=9),
            UsageRecord("vm-b", "acme", 0, memory_bytes=2 * GIB),
            UsageRecord("vm-b", "acme", 2 * HOUR, cpu_time_ns=5 * 10**8, memory_bytes=2 * GIB),
        ],
    )  # fmt: skip
    store.add_samples(
        "globex",
        [UsageRecord("vm-g", "globex", 0), UsageRecord("vm-g", "globex", 1, cpu_time_ns=4)],
    )
    store.add_notice(Notice("stopped", "vm-b", "", "acme", at_ns=HOUR))
    store.close()
    return path


def test_json_gives_every_vm_and_customer(db: Path) -> None:
    result = runner.invoke(app, ["billing", "usage", "--db", str(db), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    vms = {v["vm_id"]: v for v in report["vms"]}
    assert set(vms) == {"vm-a", "vm-b", "vm-g"}
    a = vms["vm-a"]
    assert (a["cpu_seconds"], a["memory_gib_hours"], a["disk_read_bytes"]) == (2.0, 1.0, 2**20)
    assert (a["disk_write_bytes"], a["network_rx_bytes"], a["network_tx_bytes"]) == (7, 8, 9)
    # vm-b was stopped for the whole span between its samples: CPU counts, memory does not.
    assert (vms["vm-b"]["cpu_seconds"], vms["vm-b"]["memory_gib_hours"]) == (0.5, 0.0)
    customers = {c["customer_id"]: c for c in report["customers"]}
    acme = customers["acme"]
    assert (acme["vms"], acme["samples"], acme["cpu_seconds"], acme["memory_gib_hours"]) == (
        2,
        4,
        2.5,
        1.0,
    )
    assert acme["memory_max_bytes"] == 2 * GIB
    assert customers["globex"]["cpu_time_ns"] == 4


def test_one_customer(db: Path) -> None:
    result = runner.invoke(
        app, ["billing", "usage", "--db", str(db), "--json", "--customer", "globex"]
    )
    report = json.loads(result.output)
    assert [v["vm_id"] for v in report["vms"]] == ["vm-g"]
    assert [c["customer_id"] for c in report["customers"]] == ["globex"]


def test_the_db_comes_from_the_environment_too(db: Path) -> None:
    result = runner.invoke(
        app, ["billing", "usage", "--json"], env={"UNKEY_METALD_BILLING_SINK_DB": str(db)}
    )
    assert len(json.loads(result.output)["vms"]) == 3


def test_the_table_names_vms_and_customers(db: Path) -> None:
    result = runner.invoke(app, ["billing", "usage", "--db", str(db)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "usage per VM" in result.output and "usage per customer" in result.output
    for name in ("vm-a", "vm-b", "vm-g", "acme", "globex", "2.000", "1.000000", "1.0 MiB"):
        assert name in result.output


def test_an_empty_sink_says_so(tmp_path: Path) -> None:
    SinkStore(tmp_path / "s.db").close()
    result = runner.invoke(app, ["billing", "usage", "--db", str(tmp_path / "s.db")])
    assert (result.exit_code, result.output.strip()) == (0, "no samples received")


def test_a_missing_file_is_an_error_and_is_not_created(tmp_path: Path) -> None:
    result = runner.invoke(app, ["billing", "usage", "--db", str(tmp_path / "none.db")])
    assert result.exit_code == 1
    assert "no billing sink database" in result.output
    assert not (tmp_path / "none.db").exists()


def test_human_bytes() -> None:
    assert [human_bytes(v) for v in (0, 1023, 1024, 3 * 2**30 // 2)] == [
        "0 B",
        "1023 B",
        "1.0 KiB",
        "1.5 GiB",
    ]

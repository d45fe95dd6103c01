"""`metald billing-sink` (a billing.v1 service of our own) and `metald billing usage` (what
it has received, billed).

`billing usage` reads the sink's SQLite file directly (opened read-only; the sink may be
running: WAL lets both at once), not through an RPC: billing.v1 has no query call, and the
sink is a development and test tool run on the host that reads it. So it runs where the
sink's file is, with the same --db (or UNKEY_METALD_BILLING_SINK_DB).
"""

from __future__ import annotations

import json
import sqlite3
import sys
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from metald.core.metering import VmUsage, usage_by_vm

app = typer.Typer(no_args_is_help=True)

DEFAULT_DB = Path("billing-sink.db")
Db = Annotated[
    Path,
    typer.Option(
        "--db",
        metavar="PATH",
        envvar="UNKEY_METALD_BILLING_SINK_DB",
        help="The sink's SQLite file.",
    ),
]


def sink(
    db: Db = DEFAULT_DB,
    address: Annotated[
        str,
        typer.Option(
            "--address", envvar="UNKEY_METALD_BILLING_SINK_ADDRESS", help="Address to listen on."
        ),
    ] = "127.0.0.1",
    port: Annotated[
        int,
        typer.Option(
            "--port",
            min=1,
            max=65535,
            envvar="UNKEY_METALD_BILLING_SINK_PORT",
            help="Port to listen on (billaged's is 8081).",
        ),
    ] = 8081,
) -> None:
    """Run a billing service (billing.v1.BillingService, billaged's API: Connect, gRPC and
    gRPC-Web) that keeps every sample, notice and heartbeat it receives in a SQLite file,
    dropping duplicate samples (same VM, same instant). Point metald at it with
    UNKEY_METALD_BILLING_ENDPOINT=http://ADDRESS:PORT; read it with `metald billing usage`.
    Runs in the foreground until SIGINT or SIGTERM."""
    from metald.billing_sink.server import run

    run(db, address, port)


@app.command(
    "usage",
    short_help="CPU, memory, disk and network use per VM and customer (from the sink's file).",
)
def usage(
    customer: Annotated[
        str | None, typer.Option("--customer", metavar="C", help="Only this customer's VMs.")
    ] = None,
    db: Db = DEFAULT_DB,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Usage per VM and per customer from what `metald billing-sink` received: CPU seconds,
    GiB-hours of memory, bytes read, written, received and sent. It reads the sink's SQLite
    file directly (read-only; the sink may be running), so run it where that file is, with
    the sink's --db (or UNKEY_METALD_BILLING_SINK_DB). Counters are billed as billaged
    does, the sum of the positive deltas between a VM's successive samples (its first sample
    is the baseline); memory as the integral over time between samples (none over a span in
    which the VM was reported stopped), and its maximum."""
    from metald.billing_sink.store import SinkStore

    try:
        store = SinkStore(db, read_only=True)
        try:
            usages = usage_by_vm(store.samples(customer), store.stops_by_vm())
        finally:
            store.close()
    except FileNotFoundError as exc:
        _fail(str(exc))
    except (OSError, sqlite3.Error) as exc:
        _fail(f"{db}: {exc}")
    report = usage_report(usages)
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        _print_tables(report)


def _fail(message: str) -> NoReturn:
    Console(stderr=True, highlight=False, soft_wrap=True).print(f"error: {message}")
    raise typer.Exit(1)


def usage_report(usages: Sequence[VmUsage]) -> dict[str, list[dict[str, Any]]]:
    """Per VM (every counter, raw and in the billed units) and per customer (the sums)."""
    vms = [{**asdict(u), **_units(u)} for u in usages]
    customers: dict[str, VmUsage] = {}
    for u in usages:
        total = customers.get(u.customer_id) or VmUsage("", u.customer_id, first_ns=u.first_ns)
        customers[u.customer_id] = VmUsage(
            vm_id="",
            customer_id=u.customer_id,
            samples=total.samples + u.samples,
            first_ns=min(total.first_ns, u.first_ns),
            last_ns=max(total.last_ns, u.last_ns),
            cpu_time_ns=total.cpu_time_ns + u.cpu_time_ns,
            memory_byte_ns=total.memory_byte_ns + u.memory_byte_ns,
            memory_max_bytes=max(total.memory_max_bytes, u.memory_max_bytes),
            disk_read_bytes=total.disk_read_bytes + u.disk_read_bytes,
            disk_write_bytes=total.disk_write_bytes + u.disk_write_bytes,
            network_rx_bytes=total.network_rx_bytes + u.network_rx_bytes,
            network_tx_bytes=total.network_tx_bytes + u.network_tx_bytes,
        )
    rows = []
    for name, total in sorted(customers.items()):
        row = {k: v for k, v in asdict(total).items() if k != "vm_id"}
        row["vms"] = sum(1 for u in usages if u.customer_id == name)
        rows.append({**row, **_units(total)})
    return {"vms": vms, "customers": rows}


def _units(u: VmUsage) -> dict[str, float]:
    return {"cpu_seconds": u.cpu_seconds, "memory_gib_hours": u.memory_gib_hours}


_COLUMNS = (
    ("CPU s", "cpu_seconds"),
    ("mem GiB·h", "memory_gib_hours"),
    ("mem max", "memory_max_bytes"),
    ("disk read", "disk_read_bytes"),
    ("disk written", "disk_write_bytes"),
    ("net rx", "network_rx_bytes"),
    ("net tx", "network_tx_bytes"),
)


def _print_tables(report: dict[str, list[dict[str, Any]]]) -> None:
    console = Console()
    if not report["vms"]:
        console.print("no samples received")
        return
    vms = Table(title="usage per VM")
    for col in ("customer", "VM", "samples", "from", "to"):
        vms.add_column(col, overflow="fold")
    for title, _ in _COLUMNS:
        vms.add_column(title, justify="right")
    for row in report["vms"]:
        vms.add_row(
            row["customer_id"], row["vm_id"], str(row["samples"]),
            _when(row["first_ns"]), _when(row["last_ns"]),
            *(_cell(key, row[key]) for _, key in _COLUMNS),
        )  # fmt: skip
    console.print(vms)
    customers = Table(title="usage per customer")
    for col in ("customer", "VMs", "samples"):
        customers.add_column(col, overflow="fold")
    for title, _ in _COLUMNS:
        customers.add_column(title, justify="right")
    for row in report["customers"]:
        customers.add_row(
            row["customer_id"], str(row["vms"]), str(row["samples"]),
            *(_cell(key, row[key]) for _, key in _COLUMNS),
        )  # fmt: skip
    console.print(customers)


def _when(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _cell(key: str, value: float) -> str:
    if key == "cpu_seconds":
        return f"{value:.3f}"
    if key == "memory_gib_hours":
        return f"{value:.6f}"
    return human_bytes(int(value))


def human_bytes(value: int) -> str:
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if value >= factor:
            return f"{value / factor:.1f} {unit}"
    return f"{value} B"

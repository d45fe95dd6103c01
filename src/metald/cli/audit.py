"""`metald audit list|verify`: the audit log (store/audit_log.py), read from the daemon's
database directly, like `metald quota` (there is no RPC for it: the audit log is for the
host's operators, and whoever can read the data directory, or the database URL's
credentials, can read it; nobody else).

So it runs on the daemon's host, as the daemon's user, with the daemon's UNKEY_METALD_DATA_DIR
(or UNKEY_METALD_DATABASE_URL). It never migrates or writes: a database without the
audit_log table is an error.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from metald.cli.daemon_db import daemon_settings, fail, on_daemon_database
from metald.core.audit_chain import ChainedRow
from metald.store.audit_log import SqlAuditLog

app = typer.Typer(no_args_is_help=True)
T = TypeVar("T")


def _fail(message: str, code: int = 1) -> NoReturn:
    raise fail(message, code)


def _run(work: Callable[[SqlAuditLog], Awaitable[T]]) -> T:
    """Run `work` on the daemon's audit log, read only (cli/daemon_db.py opens it)."""
    return on_daemon_database(
        daemon_settings(), lambda database: work(SqlAuditLog(database)), migrate=False
    )


def parse_since(text: str, now: datetime | None = None) -> int:
    """`--since`: an ISO 8601 time (UTC unless it says otherwise) or a duration back from
    now (`90s`, `15m`, `2h`, `7d`); Unix nanoseconds."""
    now = now or datetime.now(UTC)
    value = text.strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if value[-1:].lower() in units and value[:-1].isdigit():
        moment = now - timedelta(seconds=int(value[:-1]) * units[value[-1].lower()])
    else:
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            raise typer.BadParameter(
                f"expected an ISO time (2026-12-01T10:00:00Z) or a duration (15m, 2h, 7d), "
                f"got {text!r}",
                param_hint="'--since'",
            ) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp()) * 10**9 + moment.microsecond * 1000


def _time(at_ns: int) -> str:
    moment = datetime.fromtimestamp(at_ns / 1e9, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def row_json(row: ChainedRow) -> dict[str, Any]:
    return {"seq": row.seq, "time": _time(row.event.at_ns), **asdict(row.event),
            "prev_hash": row.prev_hash, "hash": row.hash}  # fmt: skip


@app.command("list")
def list_(
    customer: Annotated[
        str | None, typer.Option("--customer", metavar="C", help="Only rows about customer C.")
    ] = None,
    since: Annotated[
        str | None,
        typer.Option("--since", metavar="T", help="From T on: an ISO time or 15m, 2h, 7d."),
    ] = None,
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="Only the newest N rows.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table.")] = False,
) -> None:
    """The audit log's rows, oldest first: time, actor, role, customer, method, VM, result
    code, source address, trace id, X-Tenant-ID."""
    since_ns = parse_since(since) if since else None
    rows = _run(lambda audit: audit.rows(customer, since_ns, limit))
    if as_json:
        for row in rows:
            sys.stdout.write(json.dumps(row_json(row)) + "\n")
        return
    table = Table(title="audit log")
    columns = ("seq", "time", "actor", "role", "customer", "method", "vm", "code", "source",
               "trace", "tenant")  # fmt: skip
    for col in columns:
        table.add_column(col, overflow="fold")
    for row in rows:
        e = row.event
        table.add_row(
            str(row.seq), _time(e.at_ns), e.actor, e.role, e.customer_id or "",
            e.method.rsplit("/", 1)[-1], e.vm_id or "", e.code, e.source or "",
            e.trace_id, e.tenant_header or "",
        )  # fmt: skip
    Console().print(table)


@app.command("verify")
def verify() -> None:
    """Walk the whole chain: every row's hash, its link to the row before, consecutive seqs,
    and the chain head (a truncated tail). Exit 0 when it holds; else exit 3 naming the first
    bad seq."""
    verdict = _run(lambda audit: audit.verify())
    if verdict.ok:
        Console(highlight=False).print(f"audit log OK: {verdict.rows} rows, the chain holds")
        return
    _fail(f"audit log broken at seq {verdict.bad_seq}: {verdict.problem}", code=3)

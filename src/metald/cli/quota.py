"""`metald quota get|set|list`: per-customer quota overrides, read and written in the
daemon's database directly (not through the API: the tenant API has no operator role yet;
an operator RPC can come with roles).

So it must run on the daemon's host, as the daemon's user, with the daemon's settings
(the same UNKEY_METALD_* environment: UNKEY_METALD_DATA_DIR or UNKEY_METALD_DATABASE_URL
say where the database is; UNKEY_METALD_QUOTA_* are the defaults it shows). A change
applies to the next CreateVm or BootVm of any daemon on that database; nothing running
is stopped by a lower quota.

Values: a number (memory and disk take KiB/MiB/GiB/TiB suffixes: `4GiB`), `unlimited`
(an override without a limit), or `default` (drop the override: the setting applies).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Awaitable, Callable, Mapping
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from metald.cli.daemon_db import daemon_settings, on_daemon_database
from metald.config import Settings
from metald.core.errors import MetaldError
from metald.core.quotas import Limit, QuotaDefaults, Resource, Usage
from metald.core.validation import check_customer_id
from metald.store.quotas import SqlQuotas

app = typer.Typer(no_args_is_help=True)
T = TypeVar("T")

JsonOut = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
Customer = Annotated[str, typer.Argument(metavar="CUSTOMER_ID", show_default=False)]

_SIZES = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_SIZE = re.compile(r"(\d+)\s*([kmgt]?)(i?b)?", re.IGNORECASE)
_BYTES = (Resource.MEMORY_BYTES, Resource.DISK_BYTES)

# A value `set` was given for a resource: a limit, or DEFAULT (drop the override).
DEFAULT = "default"


def parse_value(resource: Resource, text: str) -> Limit | str:
    """`12`, `4GiB` (bytes resources), `unlimited` (None) or `default`; BadParameter else."""
    value = text.strip().lower()
    if value == "unlimited":
        return None
    if value == DEFAULT:
        return DEFAULT
    match = _SIZE.fullmatch(value)
    if match is None or (resource not in _BYTES and (match.group(2) or match.group(3))):
        unit = " (with an optional KiB/MiB/GiB/TiB suffix)" if resource in _BYTES else ""
        raise typer.BadParameter(
            f"expected a number{unit}, 'unlimited' or 'default', got {text!r}",
            param_hint=f"'--{_flag(resource)}'",
        )
    return int(match.group(1)) * _SIZES[match.group(2).lower()]


def human(resource: Resource, value: int | None) -> str:
    if value is None:
        return "unlimited"
    if resource not in _BYTES:
        return str(value)
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if value >= factor and value % factor == 0:
            return f"{value // factor} {unit}"
    return f"{value} B"


def _flag(resource: Resource) -> str:
    return {
        Resource.MEMORY_BYTES: "memory",
        Resource.DISK_BYTES: "disk",
    }.get(resource, resource.value.replace("_", "-"))


def defaults_of(settings: Settings) -> QuotaDefaults:
    return QuotaDefaults({r: getattr(settings, f"quota_{r.value}") for r in Resource})


def _run(work: Callable[[SqlQuotas], Awaitable[T]]) -> tuple[Settings, T]:
    """Run `work` on the daemon's quotas (cli/daemon_db.py opens its database)."""
    settings = daemon_settings()
    return settings, on_daemon_database(settings, lambda database: work(SqlQuotas(database)))


def quota_rows(
    defaults: QuotaDefaults, overrides: Mapping[Resource, Limit], usage: Usage
) -> dict[str, dict[str, Any]]:
    limits = defaults.effective(overrides)
    return {
        r.value: {
            "limit": limits[r],
            "source": "override" if r in overrides else "default",
            "used": usage.of(r),
        }
        for r in Resource
    }


def _show(customer: str, rows: dict[str, dict[str, Any]], as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps({"customer_id": customer, "quotas": rows}, indent=2) + "\n")
        return
    table = Table(title=f"quotas of {customer}")
    for col in ("quota", "limit", "from", "in use"):
        table.add_column(col, overflow="fold")
    for name, row in rows.items():
        r = Resource(name)
        table.add_row(name, human(r, row["limit"]), row["source"], human(r, row["used"]))
    Console().print(table)


def _customer(customer: str) -> str:
    try:
        check_customer_id(customer)
    except MetaldError as exc:
        raise typer.BadParameter(exc.message, param_hint="'CUSTOMER_ID'") from None
    return customer


@app.command("get")
def get(customer: Customer, as_json: JsonOut = False) -> None:
    """A customer's quotas: each limit, whether it is an override or the default, and what
    the customer holds now (on every host sharing the database)."""
    customer = _customer(customer)

    async def work(quotas: SqlQuotas) -> tuple[dict[Resource, Limit], Usage]:
        return await quotas.overrides(customer), await quotas.usage(customer)

    settings, (overrides, usage) = _run(work)
    _show(customer, quota_rows(defaults_of(settings), overrides, usage), as_json)


@app.command("set")
def set_(
    customer: Customer,
    running_vms: Annotated[str | None, typer.Option("--running-vms", metavar="N")] = None,
    vms: Annotated[str | None, typer.Option("--vms", metavar="N")] = None,
    vcpus: Annotated[str | None, typer.Option("--vcpus", metavar="N")] = None,
    memory: Annotated[str | None, typer.Option("--memory", metavar="SIZE")] = None,
    disk: Annotated[str | None, typer.Option("--disk", metavar="SIZE")] = None,
    clear: Annotated[
        bool, typer.Option("--clear", help="Drop every override first (then apply the rest).")
    ] = False,
    as_json: JsonOut = False,
) -> None:
    """Set (or with `default`, drop) a customer's overrides; prints the result as `get` does.
    Each value: a number, `unlimited`, or `default`."""
    customer = _customer(customer)
    given = {
        Resource.RUNNING_VMS: running_vms,
        Resource.VMS: vms,
        Resource.VCPUS: vcpus,
        Resource.MEMORY_BYTES: memory,
        Resource.DISK_BYTES: disk,
    }
    changes = {r: parse_value(r, v) for r, v in given.items() if v is not None}
    if not changes and not clear:
        raise typer.BadParameter("give at least one quota to set, or --clear")

    async def work(quotas: SqlQuotas) -> tuple[dict[Resource, Limit], Usage]:
        if clear:
            await quotas.clear_override(customer)
        for resource, value in changes.items():
            if isinstance(value, str):  # DEFAULT
                await quotas.clear_override(customer, resource)
            else:
                await quotas.set_override(customer, resource, value)
        return await quotas.overrides(customer), await quotas.usage(customer)

    settings, (overrides, usage) = _run(work)
    _show(customer, quota_rows(defaults_of(settings), overrides, usage), as_json)


@app.command("list")
def list_(as_json: JsonOut = False) -> None:
    """The defaults, and every customer with an override (its effective limits)."""

    async def work(quotas: SqlQuotas) -> dict[str, dict[Resource, Limit]]:
        return await quotas.all_overrides()

    settings, every = _run(work)
    defaults = defaults_of(settings)
    if as_json:
        data = {
            "defaults": {r.value: defaults.limits.get(r) for r in Resource},
            "overrides": {c: {r.value: v for r, v in o.items()} for c, o in every.items()},
        }
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return
    table = Table(title="quotas (* an override)")
    table.add_column("customer", overflow="fold")
    for r in Resource:
        table.add_column(r.value, overflow="fold")
    table.add_row("(default)", *(human(r, defaults.limits.get(r)) for r in Resource))
    for customer, overrides in every.items():
        limits = defaults.effective(overrides)
        cells = [human(r, limits[r]) + ("*" if r in overrides else "") for r in Resource]
        table.add_row(customer, *cells)
    Console().print(table)

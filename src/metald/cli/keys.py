"""`metald keys create|list|revoke`: API keys, in the daemon's database directly.

How it authenticates: it does not call the API. Like `metald quota`, it runs on the
daemon's host with the daemon's settings (UNKEY_METALD_DATA_DIR or _DATABASE_URL say where
the database is, UNKEY_METALD_AUTH_PEPPER_FILE where the pepper is) and opens the database
itself. So whoever can read and write the data dir and read the pepper file (root, or the
metald user) manages keys, and nobody else: there is no key that makes keys, nothing to
leak over the network, and no bootstrap problem for the first one. It is the admin role's
tool; an API for it can come later.

`create` prints the token once (`mk_<key id>_<secret>`): only a keyed hash of the secret
is stored, so it cannot be shown again. `revoke` takes effect on the next call of every
open connection (the daemon looks the key up on every call).

Both are rows of the audit log (unless UNKEY_METALD_AUDIT_ENABLED=false), appended to the
chain the daemon writes (store/audit_log.py serialises writers across processes): actor
`cli:<unix user>`, role admin, the key's customer, method `metald keys create <key id>`.
The row follows the key's own transaction: a failure between the two leaves a key without
its row, and says so.
"""

from __future__ import annotations

import json
import os
import pwd
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy.exc import SQLAlchemyError

from metald.auth_setup import AuthSetupError, read_pepper
from metald.cli.daemon_db import daemon_settings, fail, on_daemon_database
from metald.config import Settings
from metald.core import apikeys
from metald.core.apikeys import ApiKey
from metald.core.audit import AuditEvent
from metald.core.errors import MetaldError
from metald.core.identity import Role
from metald.core.validation import check_customer_id
from metald.store.api_keys import SqlApiKeys
from metald.store.audit_log import SqlAuditLog
from metald.store.database import Database

app = typer.Typer(no_args_is_help=True)
T = TypeVar("T")

JsonOut = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _run(
    settings: Settings,
    work: Callable[[SqlApiKeys], Awaitable[T]],
    audited: Callable[[T], AuditEvent | None] | None = None,
) -> T:
    """Run `work` on the daemon's keys (cli/daemon_db.py opens its database), then append
    the audit row `audited` makes of its result (if any, and if audit is on)."""

    async def run(database: Database) -> T:
        result = await work(SqlApiKeys(database))
        event = audited(result) if audited is not None else None
        if event is not None and settings.audit_enabled:
            try:
                await SqlAuditLog(database).record(event)  # no writer task: appended now
            except (SQLAlchemyError, OSError) as exc:
                raise fail(f"done, but its audit row could not be written: {exc}") from None
        return result

    return on_daemon_database(settings, run)


def _audit_event(what: str, key: ApiKey) -> AuditEvent:
    """The audit row of a key made or revoked here, by whoever runs the CLI."""
    try:
        user = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        user = str(os.getuid())
    return AuditEvent(
        at_ns=time.time_ns(),
        actor=f"cli:{user}",
        role=Role.ADMIN.value,
        customer_id=key.customer_id,
        method=f"metald keys {what} {key.key_id}",
        vm_id=None,
        code="ok",
        source="local",
        trace_id="",
        tenant_header=None,
    )


def key_json(key: ApiKey, now: float) -> dict[str, Any]:
    return {
        "key_id": key.key_id,
        "customer_id": key.customer_id,
        "role": key.role.value,
        "created_at": apikeys.describe_expiry(key.created_at),
        "expires_at": None if key.expires_at is None else apikeys.describe_expiry(key.expires_at),
        "revoked_at": None if key.revoked_at is None else apikeys.describe_expiry(key.revoked_at),
        "status": key.refusal(now) or "active",
        "description": key.description,
    }


@app.command("create")
def create(
    customer: Annotated[
        str | None,
        typer.Option("--customer", metavar="C", help="The customer it acts as (customer role)."),
    ] = None,
    role: Annotated[Role, typer.Option("--role", help="customer, operator or admin.")] = (
        Role.CUSTOMER
    ),
    expires: Annotated[
        str | None,
        typer.Option("--expires", metavar="30d|ISO", help="A duration (30d, 12h) or a time."),
    ] = None,
    description: Annotated[str, typer.Option("--description", help="A note.")] = "",
    as_json: JsonOut = False,
) -> None:
    """Make a key and print its token, once. A customer key needs --customer; an operator's
    or admin's may name one (it then creates for that customer by default)."""
    if customer is not None:
        try:
            check_customer_id(customer)
        except MetaldError as exc:
            raise typer.BadParameter(exc.message, param_hint="'--customer'") from None
    elif role is Role.CUSTOMER:
        raise typer.BadParameter("a customer key needs --customer", param_hint="'--customer'")
    if len(description) > 256:
        raise typer.BadParameter("at most 256 characters", param_hint="'--description'")
    now = time.time()
    expires_at = None
    if expires is not None:
        try:
            expires_at = apikeys.parse_expiry(expires, now)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="'--expires'") from None
    settings = daemon_settings()
    try:
        pepper = read_pepper(settings.auth_pepper_file)
    except AuthSetupError as exc:
        raise fail(str(exc)) from None
    made = apikeys.new_key(
        pepper,
        customer_id=customer,
        role=role,
        now=now,
        expires_at=expires_at,
        description=description,
    )
    _run(settings, lambda keys: keys.add(made.key), lambda _: _audit_event("create", made.key))
    if as_json:
        sys.stdout.write(json.dumps({**key_json(made.key, now), "token": made.token}) + "\n")
        return
    Console(stderr=True, highlight=False).print(
        f"key {made.key.key_id} ({role.value}"
        + (f" of {customer}" if customer else "")
        + f", expires {apikeys.describe_expiry(expires_at)}); its token, shown only now:"
    )
    sys.stdout.write(made.token + "\n")


@app.command("list")
def list_(as_json: JsonOut = False) -> None:
    """Every key (never a secret): id, customer, role, created, expiry, status."""
    settings = daemon_settings()
    every = _run(settings, lambda keys: keys.all())
    now = time.time()
    rows = [key_json(k, now) for k in every]
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    table = Table(title="API keys")
    for col in ("key id", "customer", "role", "created", "expires", "status", "description"):
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(
            row["key_id"],
            row["customer_id"] or "-",
            row["role"],
            row["created_at"],
            row["expires_at"] or "never",
            row["status"],
            row["description"],
        )
    Console().print(table)


@app.command("revoke")
def revoke(
    key_id: Annotated[str, typer.Argument(metavar="KEY_ID", show_default=False)],
    as_json: JsonOut = False,
) -> None:
    """Revoke a key: refused from the next call on, on every connection."""
    if not apikeys.KEY_ID.fullmatch(key_id):
        raise typer.BadParameter("a key id is 16 characters a-z0-9", param_hint="'KEY_ID'")
    settings = daemon_settings()
    now = time.time()
    key = _run(
        settings,
        lambda keys: keys.revoke(key_id, now),
        lambda key: _audit_event("revoke", key) if key is not None else None,
    )
    if key is None:
        raise fail(f"no key {key_id}")
    if as_json:
        sys.stdout.write(json.dumps(key_json(key, now)) + "\n")
        return
    Console(highlight=False).print(
        f"key {key_id} revoked at {apikeys.describe_expiry(key.revoked_at)}"
    )

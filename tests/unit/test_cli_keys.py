"""`metald keys create|list|revoke` with typer's CliRunner on a real SQLite database found
the way the daemon finds it; the token it prints once is what the daemon's ApiKeyTokens
accepts (with the same pepper), and a revocation is what it then refuses. Each key made or
revoked is an audit row of the chain the daemon writes; bad input makes none."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from metald.api.auth import ApiKeyTokens, TokenRefused
from metald.cli.main import app
from metald.core.identity import Caller
from metald.store.api_keys import SqlApiKeys
from metald.store.audit_log import SqlAuditLog
from metald.store.database import Database

runner = CliRunner()
PEPPER = b"cli-test-pepper-0123456789"


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    async def make() -> None:
        database = Database(f"sqlite+aiosqlite:///{tmp_path / 'metald.db'}")
        await database.migrate()
        await database.close()

    asyncio.run(make())
    (tmp_path / "pepper").write_bytes(PEPPER)
    return tmp_path


def audit_rows(data_dir: Path) -> list[tuple[str, str, str | None, str]]:
    """(actor's kind, role, customer, method) of every audit row; the chain checked."""

    async def read() -> list[tuple[str, str, str | None, str]]:
        database = Database(f"sqlite+aiosqlite:///{data_dir / 'metald.db'}")
        try:
            log = SqlAuditLog(database)
            assert (await log.verify()).ok
            return [
                (r.event.actor.split(":")[0], r.event.role, r.event.customer_id, r.event.method)
                for r in await log.rows()
            ]
        finally:
            await database.close()

    return asyncio.run(read())


def run(data_dir: Path, *args: str) -> Any:
    env = {
        "UNKEY_METALD_DATA_DIR": str(data_dir),
        "UNKEY_METALD_AUTH_PEPPER_FILE": str(data_dir / "pepper"),
    }
    return runner.invoke(app, ["keys", *args], env=env)


def daemon_check(data_dir: Path, token: str) -> Caller:
    async def check() -> Caller:
        database = Database(f"sqlite+aiosqlite:///{data_dir / 'metald.db'}")
        try:
            caller = await ApiKeyTokens(SqlApiKeys(database), PEPPER).authenticate(token)
            assert caller is not None
            return caller
        finally:
            await database.close()

    return asyncio.run(check())


def test_create_list_revoke(data_dir: Path) -> None:
    made = run(data_dir, "create", "--customer", "acme", "--expires", "30d", "--json")
    assert made.exit_code == 0, made.output
    key = json.loads(made.stdout)
    assert key["token"].startswith(f"mk_{key['key_id']}_")
    assert daemon_check(data_dir, key["token"]).customer_id == "acme"
    ops = run(data_dir, "create", "--role", "operator", "--description", "on call")
    assert ops.exit_code == 0, ops.output
    listed = run(data_dir, "list", "--json")
    rows = json.loads(listed.stdout)
    assert [(r["customer_id"], r["role"], r["status"]) for r in rows] == [
        ("acme", "customer", "active"),
        (None, "operator", "active"),
    ]
    assert key["token"].split("_")[-1] not in listed.stdout
    assert run(data_dir, "list").exit_code == 0  # the table
    revoked = run(data_dir, "revoke", key["key_id"])
    assert revoked.exit_code == 0, revoked.output
    with pytest.raises(TokenRefused, match="revoked"):
        daemon_check(data_dir, key["token"])
    assert json.loads(run(data_dir, "list", "--json").stdout)[0]["status"] == "revoked"
    ops_id = rows[1]["key_id"]
    assert audit_rows(data_dir) == [
        ("cli", "admin", "acme", f"metald keys create {key['key_id']}"),
        ("cli", "admin", None, f"metald keys create {ops_id}"),
        ("cli", "admin", "acme", f"metald keys revoke {key['key_id']}"),
    ]


@pytest.mark.parametrize(
    "args",
    [
        ("create",),  # a customer key without its customer
        ("create", "--customer", "a b"),
        ("create", "--customer", "acme", "--expires", "yesterday"),
        ("create", "--role", "root"),
        ("revoke", "not-a-key-id"),
        ("revoke", "a" * 16),  # no such key
    ],
)
def test_bad_input_changes_nothing(data_dir: Path, args: tuple[str, ...]) -> None:
    assert run(data_dir, *args).exit_code != 0
    assert json.loads(run(data_dir, "list", "--json").stdout) == []
    assert audit_rows(data_dir) == []


def test_no_pepper_no_key(data_dir: Path) -> None:
    (data_dir / "pepper").write_bytes(b"")
    result = run(data_dir, "create", "--customer", "acme")
    assert result.exit_code == 1 and "PEPPER_FILE" in result.output

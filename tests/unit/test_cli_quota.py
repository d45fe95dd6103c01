"""`metald quota get|set|list` with typer's CliRunner on a real SQLite database, found the way
the daemon finds it (UNKEY_METALD_DATA_DIR); what the CLI writes is what the daemon's
SqlQuotas reads, and the usage it shows is the ledger's."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from metald.cli import quota
from metald.cli.main import app
from metald.core.quotas import Claim, Resource
from metald.store.database import Database
from metald.store.quotas import SqlQuotas

R = Resource
GIB = 1024**3
runner = CliRunner()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A data dir whose database the daemon made, with one VM of acme admitted."""

    async def make() -> None:
        database = Database(f"sqlite+aiosqlite:///{tmp_path / 'metald.db'}")
        await database.migrate()
        claim = Claim(vcpus=2, memory_bytes=GIB, disk_bytes=0)
        await SqlQuotas(database).admit("acme", "vm-1", claim, lambda _: None, new=True)
        await database.close()

    asyncio.run(make())
    return tmp_path


def run(data_dir: Path, *args: str, **env: str) -> Any:
    return runner.invoke(app, ["quota", *args], env={"UNKEY_METALD_DATA_DIR": str(data_dir), **env})


def daemon_view(data_dir: Path) -> dict[str, dict[Resource, int | None]]:
    async def read() -> dict[str, dict[Resource, int | None]]:
        database = Database(f"sqlite+aiosqlite:///{data_dir / 'metald.db'}")
        try:
            return await SqlQuotas(database).all_overrides()
        finally:
            await database.close()

    return asyncio.run(read())


def test_set_then_get_as_json(data_dir: Path) -> None:
    done = run(data_dir, "set", "acme", "--vms", "3", "--memory", "4GiB", "--disk", "unlimited")
    assert done.exit_code == 0, done.output
    assert daemon_view(data_dir) == {
        "acme": {R.VMS: 3, R.MEMORY_BYTES: 4 * GIB, R.DISK_BYTES: None}
    }
    got = run(data_dir, "get", "acme", "--json", UNKEY_METALD_QUOTA_VCPUS="16")
    assert got.exit_code == 0, got.output
    rows = json.loads(got.stdout)["quotas"]
    assert rows["vms"] == {"limit": 3, "source": "override", "used": 1}
    assert rows["vcpus"] == {"limit": 16, "source": "default", "used": 2}
    assert rows["memory_bytes"] == {"limit": 4 * GIB, "source": "override", "used": GIB}
    assert rows["disk_bytes"]["limit"] is None and rows["disk_bytes"]["source"] == "override"
    assert rows["running_vms"] == {"limit": None, "source": "default", "used": 1}


def test_default_drops_one_override_and_clear_drops_all(data_dir: Path) -> None:
    assert run(data_dir, "set", "acme", "--vms", "3", "--vcpus", "8").exit_code == 0
    assert run(data_dir, "set", "acme", "--vms", "default").exit_code == 0
    assert daemon_view(data_dir) == {"acme": {R.VCPUS: 8}}
    assert run(data_dir, "set", "acme", "--clear", "--running-vms", "0").exit_code == 0
    assert daemon_view(data_dir) == {"acme": {R.RUNNING_VMS: 0}}
    assert run(data_dir, "set", "acme", "--clear").exit_code == 0
    assert daemon_view(data_dir) == {}


def test_get_and_list_as_tables(data_dir: Path) -> None:
    assert run(data_dir, "set", "globex", "--disk", "100GiB").exit_code == 0
    table = run(data_dir, "get", "acme", UNKEY_METALD_QUOTA_VMS="10")
    assert table.exit_code == 0, table.output
    assert "quotas of acme" in table.stdout
    assert any(
        ("vms" in line and "10" in line and "default" in line) for line in table.stdout.splitlines()
    )
    listed = run(data_dir, "list", UNKEY_METALD_QUOTA_VMS="10")
    assert listed.exit_code == 0, listed.output
    [globex] = [line for line in listed.stdout.splitlines() if "globex" in line]
    assert "100 GiB*" in globex and "10" in globex
    as_json = json.loads(run(data_dir, "list", "--json", UNKEY_METALD_QUOTA_VMS="10").stdout)
    assert as_json["defaults"]["vms"] == 10
    assert as_json["overrides"] == {"globex": {"disk_bytes": 100 * GIB}}


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["set", "acme", "--vcpus", "4GiB"], "--vcpus"),
        (["set", "acme", "--vms", "-1"], "--vms"),
        (["set", "acme", "--memory", "lots"], "--memory"),
        (["set", "acme"], "at least one"),
        (["set", "bad id", "--vms", "1"], "CUSTOMER_ID"),
        (["get", "x" * 200], "CUSTOMER_ID"),
    ],
)
def test_bad_input_is_a_usage_error_and_changes_nothing(
    data_dir: Path, args: list[str], problem: str
) -> None:
    result = run(data_dir, *args)
    assert result.exit_code == 2, result.output
    assert problem in result.output
    assert daemon_view(data_dir) == {}


def test_a_missing_database_is_refused_not_made(tmp_path: Path) -> None:
    result = run(tmp_path / "elsewhere", "list")
    assert result.exit_code == 1
    assert "no metald database" in result.output and "the daemon's host" in result.output
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize(
    ("resource", "text", "value"),
    [
        (R.MEMORY_BYTES, "512MiB", 512 * 1024**2),
        (R.MEMORY_BYTES, "2g", 2 * GIB),
        (R.DISK_BYTES, "1TiB", 1024**4),
        (R.DISK_BYTES, "1000", 1000),
        (R.VMS, "0", 0),
        (R.VMS, "Unlimited", None),
        (R.VCPUS, "default", quota.DEFAULT),
    ],
)
def test_parse_value(resource: Resource, text: str, value: object) -> None:
    assert quota.parse_value(resource, text) == value


def test_human() -> None:
    assert quota.human(R.MEMORY_BYTES, 4 * GIB) == "4 GiB"
    assert quota.human(R.MEMORY_BYTES, 1536 * 1024**2) == "1536 MiB"
    assert quota.human(R.DISK_BYTES, 1000) == "1000 B"
    assert quota.human(R.VMS, None) == "unlimited"

"""`metald vm console` and the SDK's get_vm_console against the real service, handlers and
interceptors over in-memory ports (tests/fakes/daemon.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fakes.daemon import FakeDaemon, serve_fake_daemon
from typer.testing import CliRunner

from metald.cli.main import app
from metald.client import MetaldClient, MetaldClientError
from metald.core.errors import NotFound
from metald.core.models import ConsoleChunk

TOKEN = "dev_customer_acme"
runner = CliRunner()


def run(daemon: FakeDaemon, *args: str) -> Any:
    env = {"METALD_ADDR": daemon.address, "METALD_TOKEN": TOKEN}
    return runner.invoke(app, ["vm", *args], env=env)


@pytest.fixture
def daemon() -> Iterator[FakeDaemon]:
    with serve_fake_daemon() as served:
        with MetaldClient(served.address, TOKEN) as client:
            client.create_vm(vm_id="v")
        yield served


def test_the_sdk_reads_follows_and_tails(daemon: FakeDaemon) -> None:
    daemon.backend.consoles["v"] = b"boot\nMETALD-GUEST READY v\n"
    with MetaldClient(daemon.address, TOKEN) as client:
        whole = client.get_vm_console("v")
        assert whole.data == b"boot\nMETALD-GUEST READY v\n" and whole.next_offset == whole.size
        tail = client.get_vm_console("v", offset=-8, max_bytes=4)
        assert (tail.data, tail.offset, tail.next_offset) == (b"READ", 18, 22)
        with pytest.raises(MetaldClientError) as err:
            client.get_vm_console("someone-elses")
    assert err.value.code == "not_found"
    with (
        MetaldClient(daemon.address, "dev_customer_other") as other,
        pytest.raises(MetaldClientError) as err,
    ):
        other.get_vm_console("v")
    assert err.value.code == "not_found"


def test_console_prints_the_tail_and_reads_past_one_response(daemon: FakeDaemon) -> None:
    daemon.backend.consoles["v"] = b"x" * (3 * 1024 * 1024) + b"\nend\n"  # > one response
    result = run(daemon, "console", "v", "--tail", "0")
    assert result.exit_code == 0, result.output
    assert result.stdout_bytes == daemon.backend.consoles["v"]
    result = run(daemon, "console", "v", "--tail", "5")
    assert result.stdout_bytes == b"\nend\n"


def test_console_follow_prints_what_comes_until_the_vm_is_gone(daemon: FakeDaemon) -> None:
    """Each read finds a line more; the fourth finds the VM deleted."""
    backend = daemon.backend
    reads = 0
    real = backend.console

    async def growing(vm_id: str, offset: int, max_bytes: int) -> ConsoleChunk:
        nonlocal reads
        reads += 1
        if reads == 4:
            raise NotFound("VM 'v' not found")
        backend.consoles[vm_id] = backend.consoles.get(vm_id, b"") + f"line {reads}\n".encode()
        return await real(vm_id, offset, max_bytes)

    backend.console = growing  # type: ignore[method-assign]
    result = run(daemon, "console", "v", "--follow", "--interval", "0.05")
    assert result.stdout_bytes == b"line 1\nline 2\nline 3\n"
    assert result.exit_code == 1 and "not_found" in result.stderr

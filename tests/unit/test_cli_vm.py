"""`metald vm ...`: argument parsing and usage errors with typer's CliRunner, formatting as pure
functions, and whole commands against the real service, handlers and interceptors over
in-memory ports (tests/fakes/daemon.py, hypercorn on a free loopback port)."""

from __future__ import annotations

import contextlib
import json
import re
import socket
from collections.abc import Iterator
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
import typer
from connectrpc.request import RequestContext
from fakes.daemon import FakeDaemon, build_fake_daemon, serve_fake_daemon
from rich.console import Console
from rich.status import Status
from rich.table import Table
from typer.testing import CliRunner

from metald.api.handlers import VmHandlers
from metald.cli import vm
from metald.cli.main import app
from metald.client import Disk, pb
from metald.core.errors import ResourceExhausted
from metald.core.states import VmState

TOKEN = "dev_customer_acme"
GENERATED_ID = re.compile(r"vm-[0-9a-f]{16}")
runner = CliRunner()


def run(*args: str, env: dict[str, str] | None = None) -> Any:
    """Invoke `metald vm ARGS` with no METALD_* from the outer environment."""
    base = {"METALD_ADDR": "", "METALD_TOKEN": ""}
    return runner.invoke(app, ["vm", *args], env={**base, **(env or {})})


def render(table: Table) -> str:
    out = StringIO()
    Console(file=out, width=200, color_system=None).print(table)
    return out.getvalue()


# --- pure helpers --------------------------------------------------------------------------


def test_parse_meta() -> None:
    assert vm.parse_meta(["a=1", "b=x=y", "c=", "a=2"]) == {"a": "2", "b": "x=y", "c": ""}
    with pytest.raises(typer.BadParameter):
        vm.parse_meta(["novalue"])
    with pytest.raises(typer.BadParameter):
        vm.parse_meta(["=v"])


def test_parse_disks_and_states() -> None:
    assert vm.parse_disks(["/r.ext4", "/d.img:ro"]) == [Disk("/r.ext4"), Disk("/d.img", True)]
    with pytest.raises(typer.BadParameter):
        vm.parse_disks([":ro"])
    assert vm.parse_states(["running", "PAUSED"]) == [pb.VM_STATE_RUNNING, pb.VM_STATE_PAUSED]
    with pytest.raises(typer.BadParameter):
        vm.parse_states(["asleep"])


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0 B"),
        (1536, "1.5 KiB"),
        (256 * 1024**2, "256 MiB"),
        (1024**3, "1 GiB"),
        (3 * 1024**5, "3072 TiB"),
    ],
)
def test_human_bytes(size: int, text: str) -> None:
    assert vm.human_bytes(size) == text


def test_human_time() -> None:
    assert vm.human_time(0) == "-"
    assert vm.human_time(1_700_000_000) == "2023-11-14 22:13:20Z"
    assert vm.human_time(10**20) == str(10**20)


def test_action_line() -> None:
    assert vm.action_line("create", "vm-1", pb.VM_STATE_CREATED) == "created vm-1: CREATED"
    assert vm.action_line("shutdown", "vm-1", pb.VM_STATE_SHUTDOWN) == "shut down vm-1: SHUTDOWN"
    assert vm.action_line("delete", "vm-1") == "deleted vm-1"
    assert (
        vm.action_line("boot", "vm-1", pb.VM_STATE_CREATED, success=False)
        == "boot vm-1 did not succeed: CREATED"
    )


def test_list_caption() -> None:
    assert vm.list_caption(1, 1, "") == "1 VM"
    assert vm.list_caption(2, 0, "") == "2 VMs"
    assert vm.list_caption(2, 5, "t") == "2 VMs of 5; more with --all-pages or --page-token t"


def test_vms_table() -> None:
    text = render(
        vm.vms_table(
            [
                pb.VmInfo(
                    vm_id="vm-a",
                    state=pb.VM_STATE_RUNNING,
                    vcpu_count=2,
                    memory_size_bytes=512 * 1024**2,
                    created_timestamp=1_700_000_000,
                    metadata={"b": "2", "a": "1"},
                )
            ]
        )
    )
    for column in ("VM ID", "STATE", "VCPUS", "MEMORY", "CREATED", "METADATA"):
        assert column in text
    row = next(line for line in text.splitlines() if "vm-a" in line)
    for cell in ("RUNNING", "2", "512 MiB", "2023-11-14 22:13:20Z", "a=1, b=2"):
        assert cell in row


def test_info_table() -> None:
    info = pb.GetVmInfoResponse(
        vm_id="vm-a",
        state=pb.VM_STATE_PAUSED,
        config=pb.VmConfig(
            cpu=pb.CpuConfig(vcpu_count=4),
            memory=pb.MemoryConfig(size_bytes=1024**3),
            boot=pb.BootConfig(kernel_path="vmlinux", kernel_args="console=ttyS0"),
            storage=[
                pb.StorageDevice(id="rootfs", path="/r.ext4", is_root_device=True, read_only=True)
            ],
            metadata={"team": "x"},
        ),
        metrics=pb.VmMetrics(cpu_usage_percent=12.34, memory_usage_bytes=2048, uptime_seconds=9),
        network_info=pb.VmNetworkInfo(
            ip_address="10.100.0.5", dns_servers=["8.8.8.8", "1.1.1.1"], ipv6_address="fd00::5"
        ),
        backend_info={"pid": "4242"},
    )
    text = render(vm.info_table(info))
    for expected in (
        "vm-a",
        "PAUSED",
        "1 GiB",
        "vmlinux",
        "console=ttyS0",
        "/r.ext4 (root, ro)",
        "team=x",
        "10.100.0.5",
        "fd00::5",
        "8.8.8.8, 1.1.1.1",
        "12.3%",
        "2 KiB",
        "9s",
        "pid",
        "4242",
    ):
        assert expected in text
    assert "Initrd" not in text  # empty fields are left out


def test_tables_show_server_text_verbatim() -> None:
    # Square brackets from the server are text, not rich markup.
    vms = render(vm.vms_table([pb.VmInfo(vm_id="[bold]x[/bold]", metadata={"k": "[red]v"})]))
    assert "[bold]x[/bold]" in vms
    assert "k=[red]v" in vms
    info = render(vm.info_table(pb.GetVmInfoResponse(vm_id="[b]y", backend_info={"[i]": "z"})))
    assert "[b]y" in info
    assert "[i]" in info


def test_info_table_minimal() -> None:
    text = render(vm.info_table(pb.GetVmInfoResponse(vm_id="x", state=pb.VM_STATE_CREATED)))
    assert "CREATED" in text
    assert "Memory" not in text


def test_spinner_only_at_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    # Under pytest stderr is not a terminal; --json never spins either.
    assert isinstance(vm._status("waiting", json_out=False), contextlib.nullcontext)
    assert isinstance(vm._status("waiting", json_out=True), contextlib.nullcontext)

    def terminal_console(**kwargs: Any) -> Console:
        return Console(force_terminal=True, file=StringIO(), **kwargs)

    monkeypatch.setattr(vm, "Console", terminal_console)
    assert isinstance(vm._status("waiting", json_out=False), Status)
    assert isinstance(vm._status("waiting", json_out=True), contextlib.nullcontext)


# --- usage errors (no server needed) -------------------------------------------------------


def test_missing_token_is_a_clear_usage_error() -> None:
    result = run("list")
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "error: unauthenticated: no API token: set METALD_TOKEN or pass --token"
    )
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["list", "--state", "asleep"], "--state"),
        (["create", "--meta", "novalue"], "--meta"),
        (["create", "--disk", ":ro"], "--disk"),
        (["create", "--vcpus", "0"], "--vcpus"),
        (["create", "--memory-mib", "lots"], "--memory-mib"),
        (["shutdown", "vm-1", "--timeout", "-1"], "--timeout"),
        (["boot"], "VM_ID"),
        (["frobnicate"], "frobnicate"),
    ],
)
def test_usage_errors_exit_2(args: list[str], needle: str) -> None:
    result = run(*args, env={"METALD_TOKEN": TOKEN})
    assert result.exit_code == 2
    assert needle in result.stderr
    assert "Traceback" not in result.output


def test_bad_address_is_a_usage_error() -> None:
    result = run("list", "--addr", " ", env={"METALD_TOKEN": TOKEN})
    assert result.exit_code == 2
    assert result.stderr.startswith("error: invalid_argument: --addr:")


def test_unreachable_server() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    address = f"http://127.0.0.1:{port}"
    result = run("info", "vm-1", "--addr", address, "--token", TOKEN)
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: unavailable: cannot reach {address}: ")
    assert result.stdout == ""


# --- whole commands against the fake server ------------------------------------------------


@pytest.fixture
def daemon() -> Iterator[FakeDaemon]:
    with serve_fake_daemon() as served:
        yield served


@pytest.fixture
def env(daemon: FakeDaemon) -> dict[str, str]:
    return {"METALD_ADDR": daemon.address, "METALD_TOKEN": TOKEN}


def test_create_and_boot(env: dict[str, str], daemon: FakeDaemon) -> None:
    result = run(
        "create",
        "--vcpus",
        "2",
        "--memory-mib",
        "512",
        "--kernel",
        "vmlinux",
        "--initrd",
        "initrd.img",
        "--kernel-args",
        "quiet loglevel=3",
        "--disk",
        "/root.ext4",
        "--disk",
        "/data.img:ro",
        "--meta",
        "team=a",
        "--meta",
        "env=dev",
        "--id",
        "web-1",
        "--boot",
        env=env,
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == "web-1\n"  # the id alone, for vm=$(metald vm create ...)
    assert result.stderr.splitlines() == ["created web-1: CREATED", "booted web-1: RUNNING"]
    (request,) = daemon.requests("CreateVm")
    config = request.config
    assert request.vm_id == "web-1"
    assert (config.cpu.vcpu_count, config.memory.size_bytes) == (2, 512 * 1024**2)
    assert (config.boot.kernel_path, config.boot.initrd_path) == ("vmlinux", "initrd.img")
    assert config.boot.kernel_args == "quiet loglevel=3"
    assert [(d.path, d.read_only, d.is_root_device) for d in config.storage] == [
        ("/root.ext4", False, True),
        ("/data.img", True, False),
    ]
    assert dict(config.metadata) == {"team": "a", "env": "dev"}
    assert daemon.store.rows["web-1"].state is VmState.RUNNING
    assert daemon.backend.vmms["web-1"].state is VmState.RUNNING


def test_create_json(env: dict[str, str]) -> None:
    result = run("create", "--json", env=env)
    assert result.exit_code == 0, result.output
    created = json.loads(result.stdout)
    assert GENERATED_ID.fullmatch(created.pop("vm_id"))
    assert created == {"state": "CREATED"}
    result = run("create", "--json", "--boot", "--id", "b", env=env)
    assert json.loads(result.stdout) == {
        "vm_id": "b",
        "success": True,
        "state": "RUNNING",
        "created": {"vm_id": "b", "state": "CREATED"},
    }


def test_create_prints_the_id_alone_for_scripts(env: dict[str, str], daemon: FakeDaemon) -> None:
    # As the README's walkthrough uses it: vm=$(metald vm create ...); metald vm boot "$vm"
    created = run("create", env=env)
    assert created.exit_code == 0, created.output
    vm_id = created.stdout.removesuffix("\n")
    assert GENERATED_ID.fullmatch(vm_id)
    assert created.stderr == f"created {vm_id}: CREATED\n"  # for people, out of $( )
    assert run("boot", vm_id, env=env).exit_code == 0
    assert daemon.store.rows[vm_id].state is VmState.RUNNING


def test_create_quiet_says_nothing_on_stderr(env: dict[str, str]) -> None:
    quiet = run("create", "-q", env=env)
    assert GENERATED_ID.fullmatch(quiet.stdout.removesuffix("\n"))
    assert quiet.stderr == ""
    booted = run("create", "-q", "--boot", "--id", "b", env=env)
    assert (booted.stdout, booted.stderr) == ("b\n", "")
    assert json.loads(run("create", "-q", "--json", "--id", "c", env=env).stdout)["vm_id"] == "c"


def test_create_boot_failure_says_the_vm_exists() -> None:
    full = build_fake_daemon()
    full.backend.faults.fail("boot", ResourceExhausted("host capacity exhausted"))
    with serve_fake_daemon(daemon=full) as daemon:
        result = run("create", "--boot", "--id", "v", "--addr", daemon.address, "--token", TOKEN)
    assert daemon.store.rows["v"].state is VmState.CREATED
    assert result.exit_code == 1
    assert result.stdout == "v\n"
    lines = result.stderr.splitlines()
    assert lines[0] == "created v: CREATED"
    assert lines[1] == "error: resource_exhausted: host capacity exhausted"
    assert "v was created but not booted" in lines[2]


def test_lifecycle_lines(env: dict[str, str]) -> None:
    assert run("create", "--id", "v", env=env).exit_code == 0
    steps = [
        (["boot", "v"], "booted v: RUNNING"),
        (["pause", "v"], "paused v: PAUSED"),
        (["resume", "v"], "resumed v: RUNNING"),
        (["reboot", "v", "--force"], "rebooted v: RUNNING"),
        (["shutdown", "v", "--timeout", "3"], "shut down v: SHUTDOWN"),
        (["delete", "v"], "deleted v"),
    ]
    for args, line in steps:
        result = run(*args, env=env)
        assert result.exit_code == 0, (args, result.output)
        assert result.stdout == line + "\n"
        assert result.stderr == ""


def test_lifecycle_json(env: dict[str, str], daemon: FakeDaemon) -> None:
    run("create", "--id", "v", env=env)
    result = run("boot", "v", "--json", env=env)
    assert json.loads(result.stdout) == {"vm_id": "v", "success": True, "state": "RUNNING"}
    result = run("shutdown", "v", "--force", "--timeout", "7", "--json", env=env)
    assert json.loads(result.stdout) == {"vm_id": "v", "success": True, "state": "SHUTDOWN"}
    (shutdown,) = daemon.requests("ShutdownVm")
    assert (shutdown.force, shutdown.timeout_seconds) == (True, 7)
    assert daemon.backend.calls[-1].args == {"timeout": 7.0, "force": True}
    result = run("delete", "v", "--json", env=env)
    assert json.loads(result.stdout) == {"vm_id": "v", "success": True}


def test_errors_print_code_and_message(env: dict[str, str]) -> None:
    result = run("pause", "ghost", env=env)
    assert result.exit_code == 1
    assert result.stderr == "error: not_found: VM 'ghost' not found\n"
    assert result.stdout == ""
    run("create", "--id", "v", "--boot", env=env)
    result = run("delete", "v", "--json", env=env)
    assert result.exit_code == 1
    assert result.stderr.startswith("error: failed_precondition: ")
    assert run("delete", "v", "--force", env=env).exit_code == 0
    result = run("list", env={**env, "METALD_TOKEN": "wrong"})
    assert result.exit_code == 1
    assert result.stderr.startswith("error: unauthenticated: ")


def test_token_option_overrides_environment(env: dict[str, str], daemon: FakeDaemon) -> None:
    run("create", "--id", "mine", env=env)
    result = run("list", "-q", "--token", "dev_customer_other", env=env)
    assert (result.exit_code, result.stdout) == (0, "")  # another customer's list
    assert daemon.calls[-1].authorization == "Bearer dev_customer_other"


class _Unsuccessful(VmHandlers):
    """An answer the real service never gives: success=false without an error."""

    async def pause_vm(self, request: Any, ctx: RequestContext[Any, Any], /) -> pb.PauseVmResponse:
        return pb.PauseVmResponse(success=False, state=pb.VM_STATE_RUNNING)


class _BootUnsuccessful(VmHandlers):
    async def boot_vm(self, request: Any, ctx: RequestContext[Any, Any], /) -> pb.BootVmResponse:
        return pb.BootVmResponse(success=False, state=pb.VM_STATE_CREATED)


def test_create_boot_unsuccessful_still_prints_the_id_and_exits_1() -> None:
    with serve_fake_daemon(_BootUnsuccessful) as daemon:
        result = run("create", "--boot", "--id", "v", "--addr", daemon.address, "--token", TOKEN)
    assert (result.exit_code, result.stdout) == (1, "v\n")
    assert result.stderr.splitlines() == ["created v: CREATED", "boot v did not succeed: CREATED"]


def test_unsuccessful_response_exits_1() -> None:
    with serve_fake_daemon(_Unsuccessful) as daemon:
        result = run("pause", "v", "--addr", daemon.address, "--token", TOKEN)
    assert result.exit_code == 1
    assert result.stdout == "pause v did not succeed: RUNNING\n"


def test_list_table_quiet_and_json(env: dict[str, str]) -> None:
    result = run("list", env=env)
    assert (result.exit_code, result.stdout) == (0, "no VMs\n")
    for name in ("a", "b", "c"):
        run("create", "--id", name, "--meta", f"name={name}", env=env)
    run("boot", "b", env=env)

    table = run("list", env=env)
    assert table.exit_code == 0
    assert "3 VMs" in table.stdout
    row = next(line for line in table.stdout.splitlines() if " b " in line)
    assert "RUNNING" in row
    assert "name=b" in row

    assert run("list", "-q", env=env).stdout == "a\nb\nc\n"
    assert run("list", "-q", "--state", "running", env=env).stdout == "b\n"
    assert run("list", "-q", "--state", "created", "--state", "RUNNING", env=env).stdout == (
        "a\nb\nc\n"
    )

    data = json.loads(run("list", "--json", "--state", "created", env=env).stdout)
    assert [v["vm_id"] for v in data["vms"]] == ["a", "c"]
    assert data["vms"][0]["state"] == "CREATED"
    assert data["vms"][0]["memory_size_bytes"] == 256 * 1024**2
    assert data["vms"][0]["metadata"] == {"name": "a"}
    assert (data["total_count"], data["next_page_token"]) == (2, "")


def test_list_pages(env: dict[str, str]) -> None:
    for name in ("a", "b", "c"):
        run("create", "--id", name, env=env)
    data = json.loads(run("list", "--json", "--page-size", "2", env=env).stdout)
    token = data["next_page_token"]
    assert [v["vm_id"] for v in data["vms"]] == ["a", "b"] and token
    page = run("list", "--page-size", "2", env=env)
    assert f"2 VMs of 3; more with --all-pages or --page-token {token}" in page.stdout
    rest = run("list", "-q", "--page-size", "2", "--page-token", token, env=env)
    assert rest.stdout == "c\n"
    everything = json.loads(
        run("list", "--json", "--all-pages", "--page-size", "1", env=env).stdout
    )
    assert [v["vm_id"] for v in everything["vms"]] == ["a", "b", "c"]
    assert (everything["total_count"], everything["next_page_token"]) == (3, "")


def test_info(env: dict[str, str]) -> None:
    created = run(
        "create",
        "--id",
        "v",
        "--vcpus",
        "3",
        "--disk",
        "/r.ext4:ro",
        "--network",
        "dual-stack",
        env=env,
    )
    assert created.exit_code == 0, created.output
    result = run("info", "v", env=env)
    assert result.exit_code == 0, result.output
    for expected in ("v", "CREATED", "3", "256 MiB", "/r.ext4 (root, ro)", "10.100.0.2"):
        assert expected in result.stdout
    data = json.loads(run("info", "v", "--json", env=env).stdout)
    assert data["vm_id"] == "v"
    assert data["state"] == "CREATED"
    assert data["config"]["cpu"]["vcpu_count"] == 3
    assert data["config"]["memory"]["size_bytes"] == 256 * 1024**2
    assert data["config"]["storage"][0]["read_only"] is True
    assert data["network_info"]["ip_address"] == "10.100.0.2"


def test_tls_options_need_an_https_address(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("")
    result = run("--ca-file", str(ca), "list", "--token", "t", "--addr", "http://127.0.0.1:1")
    assert result.exit_code == 2
    assert "https://" in result.stderr and "Traceback" not in result.output
    result = run("--cert", str(tmp_path / "c.pem"), "list", "--addr", "https://127.0.0.1:1")
    assert result.exit_code == 2 and "needs its key" in result.stderr
    result = run(
        "--cert", str(tmp_path / "c.pem"), "--key", str(tmp_path / "k.pem"), "list",
        "--addr", "https://127.0.0.1:1",
    )  # fmt: skip
    assert result.exit_code == 2 and "c.pem" in result.stderr  # no such file, no traceback
    assert "Traceback" not in result.output

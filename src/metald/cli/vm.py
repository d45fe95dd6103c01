"""`metald vm ...`: create and manage VMs through the API (with the SDK in metald.client).

Output is for people unless `--json` asks for the response as JSON (for scripts): state
changes print one line (`booted vm-1: RUNNING`), `info` and `list` print tables. `create`
prints the new VM's id alone on stdout, so `vm=$(metald vm create)` works; what it did
(`created vm-1: CREATED`, and `booted ...` with --boot) goes to stderr, unless --quiet.
Failures print `error: <code>: <message>` on stderr and exit 1 (2 for usage errors).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from metald.client import (
    DEFAULT_ADDRESS,
    STATE_CHOICES,
    Disk,
    MetaldClient,
    MetaldClientError,
    parse_state,
    pb,
    state_name,
    to_dict,
)

app = typer.Typer(no_args_is_help=True)

# --- options shared by every command ------------------------------------------------------

Addr = Annotated[
    str,
    typer.Option("--addr", envvar="METALD_ADDR", help="Server address.", show_envvar=True),
]
Token = Annotated[
    str | None,
    typer.Option(
        "--token",
        envvar="METALD_TOKEN",
        help="API token (sent as 'Authorization: Bearer <token>').",
        show_envvar=True,
        show_default=False,
    ),
]
JsonOut = Annotated[bool, typer.Option("--json", help="Print the response as JSON.")]
VmId = Annotated[str, typer.Argument(metavar="VM_ID", help="The VM's id.", show_default=False)]
Force = Annotated[bool, typer.Option("--force", help="Do it even if the guest does not agree.")]

# --- pure helpers (parsing and formatting) ------------------------------------------------


def parse_meta(items: Iterable[str]) -> dict[str, str]:
    """`["k=v", "a=b=c"]` -> `{"k": "v", "a": "b=c"}`; raises BadParameter without `=`."""
    meta: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="'--meta'")
        meta[key] = value
    return meta


def parse_disks(items: Iterable[str]) -> list[Disk]:
    try:
        return [Disk.parse(item) for item in items]
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="'--disk'") from err


def parse_states(items: Iterable[str]) -> list[pb.VmState]:
    try:
        return [parse_state(item) for item in items]
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="'--state'") from err


def human_bytes(size: int) -> str:
    """1073741824 -> "1 GiB", 268435456 -> "256 MiB", 1536 -> "1.5 KiB"."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.1f}".removesuffix(".0") + f" {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_time(timestamp: int) -> str:
    """Unix seconds -> "2023-11-14 22:13:20Z" (UTC); 0 -> "-"."""
    if timestamp <= 0:
        return "-"
    try:
        moment = datetime.fromtimestamp(timestamp, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return str(timestamp)
    return moment.strftime("%Y-%m-%d %H:%M:%SZ")


def json_text(data: Any) -> str:
    return json.dumps(data, indent=2)


_PAST = {
    "create": "created",
    "boot": "booted",
    "pause": "paused",
    "resume": "resumed",
    "reboot": "rebooted",
    "shutdown": "shut down",
    "delete": "deleted",
}


def action_line(op: str, vm_id: str, state: int | None = None, success: bool = True) -> str:
    """`created vm-1: CREATED`, `deleted vm-1`, `boot vm-1 did not succeed: CREATED`."""
    text = f"{_PAST[op]} {vm_id}" if success else f"{op} {vm_id} did not succeed"
    return text if state is None else f"{text}: {state_name(state)}"


def _kv(data: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(data.items())) or "-"


def vms_table(vms: Sequence[pb.VmInfo]) -> Table:
    table = Table()
    for column in ("VM ID", "STATE", "VCPUS", "MEMORY", "CREATED", "METADATA"):
        table.add_column(column, no_wrap=column in ("VM ID", "STATE", "CREATED"))
    for vm in vms:
        cells = (
            vm.vm_id,
            state_name(vm.state),
            str(vm.vcpu_count),
            human_bytes(vm.memory_size_bytes),
            human_time(vm.created_timestamp),
            _kv(vm.metadata),
        )
        table.add_row(*(Text(cell) for cell in cells))  # Text: no rich markup from the server
    return table


def list_caption(shown: int, total: int, next_token: str) -> str:
    caption = f"{shown} VM" + ("" if shown == 1 else "s")
    if total > shown:
        caption += f" of {total}"
    if next_token:
        caption += f"; more with --all-pages or --page-token {next_token}"
    return caption


def info_table(info: pb.GetVmInfoResponse) -> Table:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column("field", style="bold", no_wrap=True)
    table.add_column("value")
    rows: list[tuple[str, str]] = [("VM ID", info.vm_id), ("State", state_name(info.state))]
    config = info.config
    if info.HasField("config"):
        rows += [
            ("vCPUs", str(config.cpu.vcpu_count)),
            ("Memory", human_bytes(config.memory.size_bytes)),
        ]
        if config.boot.kernel_path:
            rows.append(("Kernel", config.boot.kernel_path))
        if config.boot.initrd_path:
            rows.append(("Initrd", config.boot.initrd_path))
        if config.boot.kernel_args:
            rows.append(("Kernel args", config.boot.kernel_args))
        for disk in config.storage:
            flags = [f for f, on in (("root", disk.is_root_device), ("ro", disk.read_only)) if on]
            suffix = f" ({', '.join(flags)})" if flags else ""
            rows.append((f"Disk {disk.id or '?'}", disk.path + suffix))
        if config.metadata:
            rows.append(("Metadata", _kv(config.metadata)))
    if info.HasField("network_info"):
        net = info.network_info
        for label, value in (
            ("IP address", net.ip_address),
            ("MAC address", net.mac_address),
            ("Gateway", net.gateway),
            ("IPv6 address", net.ipv6_address if net.ipv6_address != net.ip_address else ""),
            ("IPv6 gateway", net.ipv6_gateway if net.ipv6_gateway != net.gateway else ""),
            ("DNS", ", ".join(net.dns_servers)),
            ("TAP device", net.tap_device),
            ("Netns", net.network_namespace),
        ):
            if value:
                rows.append((label, value))
    if info.HasField("metrics"):
        metrics = info.metrics
        rows += [
            ("CPU usage", f"{metrics.cpu_usage_percent:.1f}%"),
            ("Memory used", human_bytes(metrics.memory_usage_bytes)),
            ("Uptime", f"{metrics.uptime_seconds}s"),
        ]
    # Backend details (pid, console_log, accelerator, ...): one row each, as the server names them.
    rows += sorted(info.backend_info.items())
    for label, value in rows:
        table.add_row(Text(label), Text(value))
    return table


# --- plumbing ------------------------------------------------------------------------------


def _fail(code: str, message: str, exit_code: int = 1) -> NoReturn:
    typer.echo(f"error: {code}: {message}", err=True)
    raise typer.Exit(exit_code)


# TLS for an https:// --addr: options of the `vm` group, so every command
# takes them (`metald vm --ca-file ca.pem list --addr https://host:8080`) or the environment.
_TLS: dict[str, Path | None] = {"ca_file": None, "cert_file": None, "key_file": None}


def _file_option(flag: str, env: str, text: str) -> Any:
    return typer.Option(flag, envvar=env, help=text, show_envvar=True, show_default=False)


@app.callback()
def tls_options(
    ca_file: Annotated[
        Path | None,
        _file_option(
            "--ca-file", "METALD_CA_FILE", "CA (PEM) of an https:// server; default: the system's."
        ),
    ] = None,
    cert_file: Annotated[
        Path | None,
        _file_option(
            "--cert",
            "METALD_CERT_FILE",
            "Client certificate (PEM) for mTLS; with it --token may be left out.",
        ),
    ] = None,
    key_file: Annotated[
        Path | None, _file_option("--key", "METALD_KEY_FILE", "The client certificate's key.")
    ] = None,
) -> None:
    """Create and manage VMs through the API (TLS options before the command)."""
    _TLS.update(ca_file=ca_file, cert_file=cert_file, key_file=key_file)


def _connect(addr: str, token: str | None) -> MetaldClient:
    if not token and _TLS["cert_file"] is None:
        # (A client certificate, `metald vm --cert`, names the caller without a token.)
        _fail("unauthenticated", "no API token: set METALD_TOKEN or pass --token", exit_code=2)
    try:
        return MetaldClient(
            addr,
            token or None,
            ca_file=_TLS["ca_file"],
            cert_file=_TLS["cert_file"],
            key_file=_TLS["key_file"],
        )
    except ValueError as err:
        _fail("invalid_argument", f"--addr: {err}", exit_code=2)
    except OSError as err:
        _fail("invalid_argument", f"TLS file {err.filename}: {err.strerror}", exit_code=2)


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Turn SDK errors into `error: <code>: <message>` and exit 1, never a traceback."""
    try:
        yield
    except MetaldClientError as err:
        _fail(err.code, err.message)


def _status(message: str, json_out: bool) -> contextlib.AbstractContextManager[Any]:
    """A spinner on stderr while waiting, only for people at a terminal."""
    console = Console(stderr=True)
    if json_out or not console.is_terminal:
        return contextlib.nullcontext()
    return console.status(Text(message))


def _out() -> Console:
    return Console(file=sys.stdout, highlight=False, soft_wrap=False)


def _state_change(
    op: str,
    waiting: str,
    vm_id: str,
    addr: str,
    token: str | None,
    json_out: bool,
    call: Callable[[MetaldClient], Any],
) -> None:
    """Shared by boot/pause/resume/reboot/shutdown: responses with success and state."""
    with _connect(addr, token) as client, _errors():
        with _status(f"{waiting} {vm_id}...", json_out):
            response = call(client)
        if json_out:
            typer.echo(json_text({"vm_id": vm_id, **to_dict(response)}))
        else:
            typer.echo(action_line(op, vm_id, response.state, response.success))
        if not response.success:
            raise typer.Exit(1)


# --- commands ------------------------------------------------------------------------------


@app.command()
def create(
    vcpus: Annotated[int, typer.Option("--vcpus", min=1, help="Number of vCPUs.")] = 1,
    memory_mib: Annotated[int, typer.Option("--memory-mib", min=1, help="Memory in MiB.")] = 256,
    kernel: Annotated[
        str | None, typer.Option("--kernel", help="Kernel path or asset id (default: server's).")
    ] = None,
    initrd: Annotated[str | None, typer.Option("--initrd", help="Initrd path or asset id.")] = None,
    kernel_args: Annotated[
        str | None, typer.Option("--kernel-args", help="Kernel command line.")
    ] = None,
    disk: Annotated[
        list[str] | None,
        typer.Option(
            "--disk",
            metavar="PATH[:ro]",
            help="Disk to attach (repeatable; the first is the root device).",
        ),
    ] = None,
    meta: Annotated[
        list[str] | None,
        typer.Option("--meta", metavar="KEY=VALUE", help="Metadata entry (repeatable)."),
    ] = None,
    vm_id: Annotated[
        str | None, typer.Option("--id", help="VM id to use (default: server-generated).")
    ] = None,
    network: Annotated[
        str | None,
        typer.Option(
            "--network",
            metavar="MODE",
            help="Give the VM a network card: dual-stack, ipv4-only or ipv6-only.",
        ),
    ] = None,
    boot: Annotated[bool, typer.Option("--boot", help="Boot the VM once it is created.")] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Only the id: nothing on stderr unless it fails.")
    ] = False,
    addr: Addr = DEFAULT_ADDRESS,
    token: Token = None,
    json_out: JsonOut = False,
) -> None:
    """Create a VM (state CREATED) and print its id; boot it too with --boot."""
    disks = parse_disks(disk or [])
    metadata = parse_meta(meta or [])

    def tell(line: str) -> None:
        if not quiet and not json_out:
            typer.echo(line, err=True)

    with _connect(addr, token) as client, _errors():
        with _status("creating VM...", json_out):
            created = client.create_vm(
                vcpus=vcpus,
                memory_mib=memory_mib,
                kernel_path=kernel,
                initrd_path=initrd,
                kernel_args=kernel_args,
                disks=disks,
                metadata=metadata,
                vm_id=vm_id,
                network=network,
            )
        if not json_out:
            typer.echo(created.vm_id)
        tell(action_line("create", created.vm_id, created.state))
        if not boot:
            if json_out:
                typer.echo(json_text(to_dict(created)))
            return
        try:
            with _status(f"booting {created.vm_id}...", json_out):
                booted = client.boot_vm(created.vm_id)
        except MetaldClientError as err:
            typer.echo(
                f"error: {err.code}: {err.message}\n"
                f"note: {created.vm_id} was created but not booted "
                f"(metald vm boot {created.vm_id})",
                err=True,
            )
            raise typer.Exit(1) from None
        if json_out:
            data = {"vm_id": created.vm_id, **to_dict(booted), "created": to_dict(created)}
            typer.echo(json_text(data))
        elif not booted.success:
            typer.echo(action_line("boot", created.vm_id, booted.state, success=False), err=True)
        else:
            tell(action_line("boot", created.vm_id, booted.state))
        if not booted.success:
            raise typer.Exit(1)


@app.command()
def boot(
    vm_id: VmId, addr: Addr = DEFAULT_ADDRESS, token: Token = None, json_out: JsonOut = False
) -> None:
    """Boot a CREATED or SHUTDOWN VM."""
    _state_change("boot", "booting", vm_id, addr, token, json_out, lambda c: c.boot_vm(vm_id))


@app.command()
def pause(
    vm_id: VmId, addr: Addr = DEFAULT_ADDRESS, token: Token = None, json_out: JsonOut = False
) -> None:
    """Pause a RUNNING VM."""
    _state_change("pause", "pausing", vm_id, addr, token, json_out, lambda c: c.pause_vm(vm_id))


@app.command()
def resume(
    vm_id: VmId, addr: Addr = DEFAULT_ADDRESS, token: Token = None, json_out: JsonOut = False
) -> None:
    """Resume a PAUSED VM."""
    _state_change("resume", "resuming", vm_id, addr, token, json_out, lambda c: c.resume_vm(vm_id))


@app.command()
def reboot(
    vm_id: VmId,
    force: Force = False,
    addr: Addr = DEFAULT_ADDRESS,
    token: Token = None,
    json_out: JsonOut = False,
) -> None:
    """Reboot a RUNNING VM."""
    _state_change(
        "reboot",
        "rebooting",
        vm_id,
        addr,
        token,
        json_out,
        lambda c: c.reboot_vm(vm_id, force=force),
    )


@app.command()
def shutdown(
    vm_id: VmId,
    force: Force = False,
    timeout: Annotated[
        int,
        typer.Option(
            "--timeout", min=0, help="Seconds for a graceful shutdown (0: the server's default)."
        ),
    ] = 0,
    addr: Addr = DEFAULT_ADDRESS,
    token: Token = None,
    json_out: JsonOut = False,
) -> None:
    """Shut down a RUNNING or PAUSED VM."""
    _state_change(
        "shutdown",
        "shutting down",
        vm_id,
        addr,
        token,
        json_out,
        lambda c: c.shutdown_vm(vm_id, force=force, timeout_seconds=timeout),
    )


@app.command()
def delete(
    vm_id: VmId,
    force: Annotated[bool, typer.Option("--force", help="Delete even a running VM.")] = False,
    addr: Addr = DEFAULT_ADDRESS,
    token: Token = None,
    json_out: JsonOut = False,
) -> None:
    """Delete a VM and everything it holds."""
    with _connect(addr, token) as client, _errors():
        with _status(f"deleting {vm_id}...", json_out):
            response = client.delete_vm(vm_id, force=force)
        if json_out:
            typer.echo(json_text({"vm_id": vm_id, **to_dict(response)}))
        else:
            typer.echo(action_line("delete", vm_id, success=response.success))
        if not response.success:
            raise typer.Exit(1)


@app.command()
def info(
    vm_id: VmId, addr: Addr = DEFAULT_ADDRESS, token: Token = None, json_out: JsonOut = False
) -> None:
    """Show a VM's configuration, state, network and metrics."""
    with _connect(addr, token) as client, _errors():
        response = client.get_vm_info(vm_id)
        if json_out:
            typer.echo(json_text(to_dict(response)))
        else:
            _out().print(info_table(response))


@app.command()
def console(
    vm_id: VmId,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing what the guest writes.")
    ] = False,
    tail: Annotated[
        int,
        typer.Option(
            "--tail",
            min=0,
            help="Start this many bytes before the end of the log (0: from its beginning).",
        ),
    ] = 64 * 1024,
    interval: Annotated[
        float, typer.Option("--interval", min=0.05, help="Seconds between reads with --follow.")
    ] = 0.5,
    addr: Addr = DEFAULT_ADDRESS,
    token: Token = None,
) -> None:
    """Print a VM's serial console output (the guest's own bytes, as they are)."""
    out = sys.stdout.buffer
    with _connect(addr, token) as client, _errors():
        offset = -tail if tail else 0
        try:
            while True:
                chunk = client.get_vm_console(vm_id, offset=offset)
                out.write(chunk.data)
                out.flush()
                offset = chunk.next_offset
                if chunk.next_offset < chunk.size:
                    continue  # more than one response holds: read on at once
                if not follow:
                    return
                time.sleep(interval)
        except KeyboardInterrupt:
            return


@app.command("list")
def list_(
    state: Annotated[
        list[str] | None,
        typer.Option(
            "--state",
            metavar="STATE",
            help=f"Only VMs in this state (repeatable): {', '.join(STATE_CHOICES)}.",
        ),
    ] = None,
    all_pages: Annotated[bool, typer.Option("--all-pages", help="Follow every page.")] = False,
    page_size: Annotated[
        int, typer.Option("--page-size", min=0, help="VMs per page (0: the server's default).")
    ] = 0,
    page_token: Annotated[
        str, typer.Option("--page-token", help="Continue from this page token.")
    ] = "",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the VM ids.")] = False,
    customer: Annotated[
        str,
        typer.Option(
            "--customer", metavar="C", help="Only this customer's VMs (operators; default: all)."
        ),
    ] = "",
    addr: Addr = DEFAULT_ADDRESS,
    token: Token = None,
    json_out: JsonOut = False,
) -> None:
    """List your VMs (an operator: every customer's, or --customer's)."""
    states = parse_states(state or [])
    with _connect(addr, token) as client, _errors():
        if all_pages:
            vms = list(client.iter_vms(states=states, page_size=page_size, customer_id=customer))
            response = pb.ListVmsResponse(vms=vms, total_count=len(vms))
        else:
            response = client.list_vms(
                states=states, page_size=page_size, page_token=page_token, customer_id=customer
            )
    if json_out:
        typer.echo(json_text(to_dict(response)))
    elif quiet:
        for vm in response.vms:
            typer.echo(vm.vm_id)
    elif not response.vms and not response.next_page_token:
        typer.echo("no VMs")
    else:
        _out().print(vms_table(response.vms))
        # A plain line under the table, never wrapped: the page token must copy whole.
        typer.echo(list_caption(len(response.vms), response.total_count, response.next_page_token))

"""`metald assets ...`: build the default guest, inspect the local asset store, and say who
may attach each asset (`owner`: shared, or one customer's; see assets/store.py)."""

from __future__ import annotations

import json
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from metald.assets.guest_builder import BuiltGuest, GuestBuildError, build_default_guest
from metald.assets.guest_builder import Progress as BuildProgress
from metald.assets.store import Asset, LocalAssetStore
from metald.core.errors import MetaldError

app = typer.Typer(no_args_is_help=True)

DEFAULT_STORE = Path("/opt/metald/assets")
STORE_ENV = "UNKEY_METALD_ASSETMANAGER_CACHE_DIR"

StoreOption = Annotated[
    Path,
    typer.Option(
        "--store",
        envvar=STORE_ENV,
        help=f"The asset store directory (env {STORE_ENV}).",
        show_default=True,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
OwnerOption = Annotated[
    str,
    typer.Option(
        "--owner",
        help="The only customer that may attach the asset (default: shared, anyone may).",
    ),
]

_STEP_TEXT = {
    "download": "downloading Debian packages",
    "extract": "extracting packages",
    "vmlinux": "extracting the ELF vmlinux",
    "modules": "collecting virtio modules",
    "initramfs": "packing the initramfs",
    "rootfs": "making the ext4 root filesystem",
    "register": "registering assets",
    "done": "done",
}


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _owner(owner: str) -> str:
    return owner or "(shared)"


def _assets_table(title: str, assets: list[tuple[str, Asset]]) -> Table:
    table = Table(title=title)
    for col in ("role", "id", "kind", "size", "name", "owner"):
        table.add_column(col, overflow="fold")
    for role, a in assets:
        table.add_row(role, a.id, a.kind, _human(a.size), a.name, _owner(a.owner))
    return table


def _guest_json(store: LocalAssetStore, guest: BuiltGuest) -> dict[str, Any]:
    def one(a: Asset | None) -> dict[str, Any] | None:
        return None if a is None else {**a.to_dict(), "path": str(a.path)}

    return {
        "store": str(store.root),
        "reused": guest.reused,
        "recipe": guest.recipe,
        "seconds": round(guest.seconds, 3),
        "kernel_package": guest.kernel_package,
        "kernel_version": guest.kernel_version,
        "modules": list(guest.modules),
        "kernel": one(guest.kernel),
        "initrd": one(guest.initrd),
        "rootfs": one(guest.rootfs),
    }


@app.command("build")
def build(
    store: StoreOption = DEFAULT_STORE,
    rootfs: Annotated[
        bool, typer.Option("--rootfs", help="Also make an ext4 root filesystem.")
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Rebuild even if the store is up to date.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Build the default guest (kernel, initramfs) from Debian packages into the store.

    A second run is a quick no-op when the store already has the current recipe's guest.
    """
    console = Console(stderr=True)
    assets = LocalAssetStore(store)
    try:
        with tempfile.TemporaryDirectory(prefix="metald-guest-build-") as tmp:
            if as_json or not console.is_terminal:
                guest = build_default_guest(
                    assets, Path(tmp), _plain_progress(console, quiet=as_json),
                    rootfs=rootfs, force=force,
                )  # fmt: skip
            else:
                with Progress(
                    TextColumn("[bold]{task.description}"),
                    BarColumn(),
                    TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(),
                    console=console,
                    transient=True,
                ) as bar:
                    task = bar.add_task("building the default guest", total=None)

                    def on_step(name: str, index: int, total: int) -> None:
                        bar.update(
                            task, description=_STEP_TEXT.get(name, name), completed=index,
                            total=total,
                        )  # fmt: skip

                    guest = build_default_guest(
                        assets, Path(tmp), on_step, rootfs=rootfs, force=force
                    )
    except (GuestBuildError, MetaldError, OSError) as exc:
        console.print(f"[red]metald assets build failed:[/red] {exc}")
        raise typer.Exit(1) from None

    if as_json:
        sys.stdout.write(json.dumps(_guest_json(assets, guest), indent=2) + "\n")
        return
    out = Console()
    rows: list[tuple[str, Asset]] = [("kernel", guest.kernel), ("initrd", guest.initrd)]
    if guest.rootfs is not None:
        rows.append(("rootfs", guest.rootfs))
    verb = "already up to date" if guest.reused else f"built in {guest.seconds:.1f} s"
    out.print(_assets_table(f"default guest: {verb}", rows))
    out.print(f"store:   {assets.root}", highlight=False)
    out.print(f"recipe:  {guest.recipe}", highlight=False)
    out.print(f"kernel:  {guest.kernel_version} ({guest.kernel_package})", highlight=False)
    out.print(f"modules: {', '.join(guest.modules)}", highlight=False)


def _plain_progress(console: Console, *, quiet: bool) -> BuildProgress:
    def on_step(name: str, index: int, total: int) -> None:
        if not quiet and name != "done":
            console.print(f"[{index + 1}/{total}] {_STEP_TEXT.get(name, name)}")

    return on_step


@app.command("list")
def list_assets(store: StoreOption = DEFAULT_STORE, as_json: JsonOption = False) -> None:
    """List the assets in the store; the default guest's are marked."""
    assets = LocalAssetStore(store)
    try:
        items = assets.list()
        default = assets.default()
    except MetaldError as exc:
        Console(stderr=True).print(f"[red]metald assets list failed:[/red] {exc.message}")
        raise typer.Exit(1) from None
    roles: dict[str, str] = {}
    if default is not None:
        for role, ref in (
            ("default kernel", default.kernel),
            ("default initrd", default.initrd),
            ("default rootfs", default.rootfs),
        ):
            if ref:
                roles[ref] = role
    if as_json:
        data = {
            "store": str(assets.root),
            "default": None
            if default is None
            else {
                "kernel": default.kernel,
                "initrd": default.initrd,
                "rootfs": default.rootfs,
                "recipe": default.recipe,
            },
            "assets": [
                {**a.to_dict(), "path": str(a.path), "role": roles.get(a.id, "")} for a in items
            ],
        }
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return
    out = Console()
    if not items:
        out.print(f"the asset store {assets.root} is empty; run `metald assets build`")
        return
    table = Table(title=f"assets in {assets.root}")
    for col in ("id", "kind", "size", "name", "owner", "created", "default"):
        table.add_column(col, overflow="fold")
    for a in items:
        created = datetime.fromtimestamp(a.created_at, UTC).strftime("%Y-%m-%d %H:%M:%S")
        table.add_row(
            a.id, a.kind, _human(a.size), a.name, _owner(a.owner), created, roles.get(a.id, "")
        )
    out.print(table)


@app.command("add")
def add(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
    kind: Annotated[str, typer.Option("--kind", help="kernel, initrd, rootfs or disk")],
    name: Annotated[str | None, typer.Option("--name", help="Defaults to the file name.")] = None,
    owner: OwnerOption = "",
    store: StoreOption = DEFAULT_STORE,
    as_json: JsonOption = False,
) -> None:
    """Copy a file into the store; prints its asset id (the same content gives the same id)."""
    assets = LocalAssetStore(store)
    try:
        asset = assets.add_file(file, kind, name or file.name, owner=owner)
    except (MetaldError, OSError) as exc:
        Console(stderr=True).print(f"[red]metald assets add failed:[/red] {exc}")
        raise typer.Exit(1) from None
    if as_json:
        sys.stdout.write(json.dumps({**asset.to_dict(), "path": str(asset.path)}) + "\n")
    else:
        Console().print(_assets_table("added", [("", asset)]))


@app.command("owner")
def owner(
    asset_id: Annotated[str, typer.Argument(help="The asset's id (sha256-...).")],
    customer: Annotated[
        str | None,
        typer.Option("--set", help="Make the asset this customer's alone."),
    ] = None,
    shared: Annotated[
        bool, typer.Option("--shared", help="Make the asset shared (anyone may attach it).")
    ] = False,
    store: StoreOption = DEFAULT_STORE,
    as_json: JsonOption = False,
) -> None:
    """Show who may attach an asset, or change it (--set CUSTOMER or --shared).

    Another customer's CreateVm naming the asset gets not_found. VMs created before a change
    keep the file they were given.
    """
    err = Console(stderr=True)
    if customer is not None and shared:
        err.print("[red]metald assets owner:[/red] give --set CUSTOMER or --shared, not both")
        raise typer.Exit(2)
    assets = LocalAssetStore(store)
    try:
        if customer is not None:
            asset = assets.set_owner(asset_id, customer)
        elif shared:
            asset = assets.set_owner(asset_id, "")
        else:
            asset = assets.get(asset_id)
    except MetaldError as exc:
        err.print(f"[red]metald assets owner failed:[/red] {exc.message}")
        raise typer.Exit(1) from None
    if as_json:
        sys.stdout.write(json.dumps({"id": asset.id, "owner": asset.owner}) + "\n")
    else:
        Console().print(f"{asset.id}: {_owner(asset.owner)}", highlight=False)

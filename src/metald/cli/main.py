"""The `metald` command: `serve`, `vm ...`, `assets ...`, `quota ...`, `keys ...`, `billing-sink`,
`billing ...`, `audit ...`."""

from __future__ import annotations

import typer

from metald.cli import assets, audit, billing, keys, quota, serve, vm

app = typer.Typer(no_args_is_help=True, add_completion=False, help="metald: a microVM manager.")
app.command("serve")(serve.serve)
app.add_typer(vm.app, name="vm", help="Create and manage VMs through the API.")
app.add_typer(assets.app, name="assets", help="Build and inspect the local asset store.")
app.add_typer(
    quota.app,
    name="quota",
    help="Per-customer quotas, in the daemon's database (run on its host, as its user).",
)
app.add_typer(
    keys.app,
    name="keys",
    help="API keys, in the daemon's database (run on its host, as its user: operators only).",
)
app.command("billing-sink")(billing.sink)
app.add_typer(
    billing.app,
    name="billing",
    help="What the billing sink received (reads its SQLite file: run it where the sink runs).",
)
app.add_typer(
    audit.app,
    name="audit",
    help="The audit log, from the daemon's database (run on its host, as its user).",
)

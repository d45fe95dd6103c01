"""Fake Assets: a fixed set of references that resolve, everything else refused by field;
`owners` makes some of them one customer's (NotYours, a NotFound, for the others, as the
real store)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from metald.core.errors import InvalidArgument, NotYours

from .faults import Faults

ROOT = Path("/fake-assets")
DEFAULT_KERNEL = ROOT / "default" / "vmlinux"
DEFAULT_INITRD = ROOT / "default" / "initrd"


class FakeAssets:
    """`files`: the references (paths or asset ids) that are in the store."""

    def __init__(self, files: Iterable[str] = (), owners: dict[str, str] | None = None) -> None:
        self.files = set(files)
        self.owners = dict(owners or {})
        self.resolved: list[tuple[str, str]] = []
        self.customers: list[str] = []  # the customer of each resolve
        self.faults = Faults()

    def resolve(self, field: str, reference: str, *, customer: str) -> Path:
        self.resolved.append((field, reference))
        self.customers.append(customer)
        self.faults.check("resolve")
        if self.owners.get(reference, customer) != customer:
            raise NotYours(f"{field}: no asset {reference!r} in the asset store")
        if reference not in self.files:
            raise InvalidArgument(field, f"{reference!r} is not a file in the asset store")
        return ROOT / reference.lstrip("/")

    def default_boot(self) -> tuple[Path, Path | None]:
        self.faults.check("default_boot")
        return DEFAULT_KERNEL, DEFAULT_INITRD

    def ping(self) -> None:
        self.faults.check("ping")

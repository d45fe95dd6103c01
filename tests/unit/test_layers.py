"""The layers of DESIGN §2, checked on the import graph of src/metald (parsed with ast, not
imported), so a new import that points the wrong way fails here:

- core imports nothing of metald outside core;
- service imports only core;
- host/ imports nothing of metald outside host (the stdlib-only floor), and host/ and jailer/
  import no adapter and nothing above them (api, service, app, cli, client);
- api imports no adapter;
- adapters (backends, store, network, assets, billing, observability) do not import one
  another, nor anything above them (billing_sink, the `metald billing-sink` program, is
  above them as cli is: it may use the billing codec and api's server). backends.vmm (the
  shared runtime; today also the modules directly in backends/) with its drivers
  backends.qemu and backends.firecracker is one family: a driver may import the runtime,
  not another driver, and the runtime no driver;
- core.ids and the jailer helper's start-up imports are standard library only (the helper
  runs them before it builds the jail).

Imports under `if TYPE_CHECKING:` count: they are coupling all the same (the module cannot be
understood, type-checked or moved without the other), and a type a layer needs from above
is a sign the type lives in the wrong place. They are left out only of the helper's
start-up closure, which is about what runs, and they do not run.

ALLOWED lists violations that are tolerated for now, each with its reason (today: none).
The test fails for a violation that is not on it, and for an entry that no longer occurs,
so the list only shrinks: remove an entry when you remove its import.
"""

from __future__ import annotations

import ast
import functools
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import metald

SRC = Path(metald.__file__).parent
ADAPTERS = ("backends", "store", "network", "assets", "billing", "observability")
ABOVE = ("api", "service", "app", "cli", "client", "billing_sink")
DRIVERS = ("backends.qemu", "backends.firecracker")
# What the jailer helper process imports before it becomes the VMM.
HELPER = "metald.jailer.helper"

# (importer, imported): why it is still there. Shrink only.
ALLOWED: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int
    type_checking: bool


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_files() -> dict[str, Path]:
    return {
        module_name(p): p
        for p in sorted(SRC.rglob("*.py"))
        if "gen" not in p.relative_to(SRC).parts[:1]
    }


MODULES = source_files()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _statements(tree: ast.AST, guarded: bool = False) -> Iterator[tuple[ast.stmt, bool]]:
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                yield child, True
                yield from _statements(child, True)
            for child in node.orelse:
                yield child, guarded
                yield from _statements(child, guarded)
        elif isinstance(node, ast.stmt):
            yield node, guarded
            yield from _statements(node, guarded)
        else:
            yield from _statements(node, guarded)


@functools.cache
def imports_of(module: str) -> tuple[Import, ...]:
    """Every import in the module, wherever it is (functions, TYPE_CHECKING blocks)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node, guarded in _statements(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from metald.core import paging` imports the module metald.core.paging.
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names
            ]
        found += [Import(module, t, node.lineno, guarded) for t in dict.fromkeys(targets)]
    return tuple(found)


def layer(module: str) -> str:
    """core, service, api, host, jailer, an adapter family, or the rest (app, cli, ...)."""
    parts = module.split(".")[1:]
    if not parts:
        return "metald"
    if parts[0] == "backends":
        if len(parts) > 1 and f"backends.{parts[1]}" in DRIVERS:
            return f"backends.{parts[1]}"
        return "backends.vmm"  # backends/vmm/ and, until the move, backends/*.py
    return parts[0]


def family(name: str) -> str:
    return "backends" if name.startswith("backends.") else name


def is_adapter(name: str) -> bool:
    return family(name) in ADAPTERS


def rule_broken(imp: Import) -> str | None:
    """The rule this import breaks, or None."""
    if not imp.imported.startswith("metald.") and imp.imported != "metald":
        return None
    src, dst = layer(imp.importer), layer(imp.imported)
    if src == dst:
        return None
    if src == "core":
        return "core imports nothing of metald outside core"
    if src == "service" and dst != "core":
        return "service imports only core"
    if src == "host":
        return "host imports nothing of metald outside host"
    if src == "jailer" and (is_adapter(dst) or dst in ABOVE):
        return "jailer imports no adapter and nothing above it"
    if src == "api" and is_adapter(dst):
        return "api imports no adapter"
    if is_adapter(src):
        if dst in ABOVE:
            return "adapters import nothing above them"
        if is_adapter(dst):
            if family(src) != family(dst):
                return "adapters do not import one another"
            if not (src in DRIVERS and dst == "backends.vmm"):
                return "a VMM driver imports only the shared runtime (backends.vmm)"
    return None


def violations() -> dict[tuple[str, str], str]:
    found: dict[tuple[str, str], str] = {}
    for module in MODULES:
        for imp in imports_of(module):
            rule = rule_broken(imp)
            if rule is not None:
                where = f"{MODULES[module].relative_to(SRC.parent)}:{imp.line}"
                found.setdefault((imp.importer, imp.imported), f"{rule} ({where})")
    return found


def startup_closure(root: str) -> set[str]:
    """The metald modules importing `root` runs (with their packages' __init__), leaving out
    TYPE_CHECKING blocks, which do not run."""
    seen: set[str] = set()
    todo = [root]
    while todo:
        module = todo.pop()
        if module in seen or module not in MODULES:
            continue
        seen.add(module)
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages
        todo += [i.imported for i in imports_of(module) if not i.type_checking]
    return seen


def non_stdlib_imports(modules: set[str], allowed_metald: set[str]) -> list[str]:
    problems = []
    for module in sorted(modules):
        for imp in imports_of(module):
            if imp.type_checking:
                continue
            top = imp.imported.split(".")[0]
            if top == "metald":
                if imp.imported not in allowed_metald:
                    problems.append(f"{module} imports {imp.imported}")
            elif top not in sys.stdlib_module_names and top != "__future__":
                problems.append(f"{module} imports {imp.imported} (not the standard library)")
    return problems


# --- the tests -----------------------------------------------------------------------------


def test_the_scan_sees_the_whole_package() -> None:
    assert {"metald.core.ports", "metald.service.vm_service", "metald.app"} <= set(MODULES)
    assert not any(m.startswith("metald.gen") for m in MODULES)  # generated code: not ours
    edges = {(i.importer, i.imported) for m in MODULES for i in imports_of(m)}
    assert ("metald.service.vm_service", "metald.core.paging") in edges  # from pkg import mod
    assert ("metald.jailer", "metald.jailer.launch") in edges  # a TYPE_CHECKING import


def test_no_new_layer_violation() -> None:
    new = {edge: why for edge, why in violations().items() if edge not in ALLOWED}
    assert not new, "imports against the layers (DESIGN §2):\n" + "\n".join(
        f"  {a} -> {b}: {why}" for (a, b), why in sorted(new.items())
    )


def test_the_allowed_list_only_shrinks() -> None:
    gone = sorted(set(ALLOWED) - set(violations()))
    assert not gone, "no longer violations, remove them from ALLOWED:\n" + "\n".join(
        f"  {a} -> {b}" for a, b in gone
    )


def test_core_ids_is_standard_library_only() -> None:
    # The jailer helper may check VM ids with core's rule only because of this.
    assert non_stdlib_imports({"metald.core.ids"}, allowed_metald=set()) == []


def test_the_jailer_helper_starts_on_the_standard_library_alone() -> None:
    closure = startup_closure(HELPER)
    assert "metald.jailer.spec" in closure
    allowed = {
        m
        for m in closure
        if m.startswith(("metald.jailer", "metald.host"))
        or m in ("metald", "metald.core", "metald.core.ids")
    }
    assert closure == allowed, f"the helper's start-up imports {sorted(closure - allowed)}"
    assert non_stdlib_imports(closure, allowed_metald=allowed) == []


def test_the_rules_catch_what_they_should() -> None:
    def broken(importer: str, imported: str) -> str | None:
        return rule_broken(Import(importer, imported, 1, False))

    assert broken("metald.core.models", "metald.store.schema")
    assert broken("metald.service.vm_service", "metald.api.auth")
    assert broken("metald.service.vm_service", "metald.backends.qemu.backend")
    assert broken("metald.host.tap", "metald.core.errors")
    assert broken("metald.jailer.launch", "metald.network.netns")
    assert broken("metald.api.handlers", "metald.store.sqlite")
    assert broken("metald.store.sqlite", "metald.network.manager")
    assert broken("metald.network.manager", "metald.service.vm_service")
    assert broken("metald.backends.qemu.backend", "metald.backends.firecracker.api")
    assert broken("metald.backends.vmm.runtime", "metald.backends.qemu.qmp")
    assert broken("metald.backends.jail", "metald.backends.qemu.command")
    assert broken("metald.core.ids", "metald.core.errors") is None  # within a layer
    assert broken("metald.backends.firecracker.driver", "metald.backends.vmm.runtime") is None
    assert broken("metald.backends.qemu.backend", "metald.backends.process") is None
    assert broken("metald.backends.qemu.backend", "metald.jailer.launch") is None
    assert broken("metald.backends.qemu.backend", "metald.host.pidfd") is None
    assert broken("metald.api.handlers", "metald.service.vm_service") is None
    assert broken("metald.app", "metald.store.sqlite") is None  # app wires everything
    assert broken("metald.core.models", "dataclasses") is None

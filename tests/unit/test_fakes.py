"""The fakes in tests/fakes implement the ports exactly: every member of each Protocol, with
the same parameters (names, kinds, defaults, types) and the same sync/async nature.

mypy checks src/ only, so without this a port could change and the service tests would go on
passing against a fake of the old port.
"""

from __future__ import annotations

import inspect
import typing
from typing import Any

import pytest
from fakes import FakeAssets, FakeBackend, FakeNetwork, MemoryQuotas, MemoryStore

from metald.core import ports

PAIRS = [
    (ports.Backend, FakeBackend),
    (ports.Store, MemoryStore),
    (ports.Assets, FakeAssets),
    (ports.Network, FakeNetwork),
    (ports.Quotas, MemoryQuotas),
]


def protocol_members(protocol: type) -> tuple[set[str], set[str]]:
    """(method names, attribute names) the Protocol declares itself."""
    methods = {
        name
        for name, value in vars(protocol).items()
        if inspect.isfunction(value) and not name.startswith("_")
    }
    attributes = set(vars(protocol).get("__annotations__", {}))
    attributes |= {name for name, value in vars(protocol).items() if isinstance(value, property)}
    return methods, attributes


def mismatches(protocol: type, implementation: type) -> list[str]:
    problems = []
    methods, attributes = protocol_members(protocol)
    instance = implementation()  # every fake can be built with no arguments
    for name in sorted(attributes):
        if not hasattr(instance, name):
            problems.append(f"{name}: attribute missing")
    for name in sorted(methods):
        wanted = getattr(protocol, name)
        got = getattr(implementation, name, None)
        if got is None or not callable(got):
            problems.append(f"{name}: method missing")
            continue
        if inspect.iscoroutinefunction(wanted) != inspect.iscoroutinefunction(got):
            problems.append(f"{name}: async in one, not in the other")
        want_sig, got_sig = inspect.signature(wanted), inspect.signature(got)
        want_hints = typing.get_type_hints(wanted)
        got_hints = typing.get_type_hints(got)
        want_params = [_describe(p, want_hints) for p in want_sig.parameters.values()]
        got_params = [_describe(p, got_hints) for p in got_sig.parameters.values()]
        if want_params != got_params:
            problems.append(f"{name}: parameters {got_params} instead of {want_params}")
        if want_hints.get("return") != got_hints.get("return"):
            problems.append(
                f"{name}: returns {got_hints.get('return')} instead of {want_hints.get('return')}"
            )
    return problems


def _describe(param: inspect.Parameter, hints: dict[str, Any]) -> tuple[Any, ...]:
    return (param.name, param.kind, param.default, hints.get(param.name))


@pytest.mark.parametrize(("protocol", "fake"), PAIRS, ids=lambda x: x.__name__)
def test_fake_implements_its_port_exactly(protocol: type, fake: type) -> None:
    methods, _ = protocol_members(protocol)
    assert methods, f"found no methods on {protocol.__name__}"
    assert mismatches(protocol, fake) == []


def test_the_check_finds_a_wrong_fake() -> None:
    class Wrong:
        async def start(self) -> None: ...
        def stop(self) -> None: ...  # not async
        def check(self, interface: Any) -> None: ...  # renamed parameter
        async def setup(self, vm_id: str, customer_id: str, interfaces: Any) -> None: ...

    problems = mismatches(ports.Network, Wrong)
    assert any(p.startswith("stop: async") for p in problems)
    assert any(p.startswith("check: parameters") for p in problems)
    assert any(p.startswith("setup: parameters") for p in problems)  # a type differs
    assert any(p.startswith("setup: returns") for p in problems)
    assert "teardown: method missing" in problems
    assert mismatches(ports.Backend, Wrong)[0] == "name: attribute missing"

"""The tracing port: what the layers say about the work they do, without knowing who listens.

Traces cross every layer (the API's RPC span, the service's store and network steps, the
runtime's jailer and VMM steps), but only one adapter (observability/tracing.py, over
OpenTelemetry) knows how to export them. So the layers talk to this port, and app.py installs
the adapter when UNKEY_METALD_OTEL_ENABLED is on. Without one every call here is a test of a
module global and nothing else: tracing that is off costs nothing measurable.

The step timers (core/timing.py) open their spans through this port, so every timed step of
a create is also a child span of the RPC's, with the same names as on /metrics.

Standard library only.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Protocol

AttributeValue = str | int | float | bool
Attributes = Mapping[str, AttributeValue]


class RpcSpan(Protocol):
    """The server span of one RPC, current from `start_rpc` until `end`."""

    def end(self, code: str | None) -> None:
        """End it with the call's Connect code (None: ok) and make the caller's context
        current again."""


class Tracer(Protocol):
    def start_rpc(
        self,
        service: str,
        method: str,
        headers: Mapping[str, str],
        client_address: str | None,
    ) -> RpcSpan:
        """Open the server span of an RPC, a child of the caller's W3C `traceparent` when the
        headers hold one, and make it current (in this task and what it starts)."""

    def span(self, name: str, attributes: Attributes | None = None) -> AbstractContextManager[None]:
        """A child span of the current one around a block."""

    def record(
        self, name: str, start_ns: int, end_ns: int, attributes: Attributes | None = None
    ) -> None:
        """A child span of the current one measured elsewhere (wall clock, ns)."""

    def set_attributes(self, attributes: Attributes) -> None:
        """Attributes of the current span (the VM and customer ids once they are known)."""

    def current_ids(self) -> tuple[str, str] | None:
        """The current span's (trace id, span id) in hex, if there is one (for log lines)."""

    def shutdown(self) -> None:
        """Export what is pending and stop."""


_tracer: Tracer | None = None


def install(tracer: Tracer | None) -> None:
    """Make `tracer` the one every layer reports to (None: tracing off)."""
    global _tracer
    _tracer = tracer


def active() -> Tracer | None:
    return _tracer


def span(name: str, attributes: Attributes | None = None) -> AbstractContextManager[None]:
    tracer = _tracer
    if tracer is None:
        return nullcontext()
    return tracer.span(name, attributes)


def record(name: str, start_ns: int, end_ns: int, attributes: Attributes | None = None) -> None:
    tracer = _tracer
    if tracer is not None:
        tracer.record(name, start_ns, end_ns, attributes)


def set_attributes(attributes: Attributes) -> None:
    tracer = _tracer
    if tracer is not None:
        tracer.set_attributes(attributes)


def current_ids() -> tuple[str, str] | None:
    tracer = _tracer
    return None if tracer is None else tracer.current_ids()


@contextmanager
def installed(tracer: Tracer | None) -> Iterator[None]:
    """`tracer` installed for the block (tests, and a daemon's lifetime)."""
    before = _tracer
    install(tracer)
    try:
        yield
    finally:
        install(before)

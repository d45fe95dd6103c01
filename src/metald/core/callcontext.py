"""What every log line of one call says about it: the VM, the customer, the trace.

A log line deep in the runtime ("VM x: jailed pid 123") is only useful to an operator who
can tie it to the call and the tenant that caused it. Passing ids down every port just for
logging would burden each signature, so the API layer (the customer, the request's VM id,
the caller's trace id) and the service (the id it picked for a new VM) bind them here, in a
context variable that tasks and threads started from the call inherit, and the log formatter
(observability/logs.py) reads them. `bind` also puts the ids on the current span.

Standard library only.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar, Token
from types import MappingProxyType

from metald.core import tracing

_EMPTY: Mapping[str, str] = MappingProxyType({})
_fields: ContextVar[Mapping[str, str]] = ContextVar("metald_call_fields", default=_EMPTY)

# The ids also go on the current span, under these attribute names.
SPAN_ATTRIBUTES = {"vm_id": "metald.vm_id", "customer_id": "metald.customer_id"}


def bind(**fields: str) -> Token[Mapping[str, str]]:
    """Add the non-empty `fields` (vm_id, customer_id, trace_id) to this call's context;
    `reset` with the token undoes it."""
    merged = dict(_fields.get())
    for key, value in fields.items():
        if value:
            merged[key] = value
    token = _fields.set(MappingProxyType(merged))
    if tracing.active() is not None:
        on_span = {SPAN_ATTRIBUTES[k]: v for k, v in fields.items() if v and k in SPAN_ATTRIBUTES}
        if on_span:
            tracing.set_attributes(on_span)
    return token


def reset(token: Token[Mapping[str, str]]) -> None:
    _fields.reset(token)


def fields() -> Mapping[str, str]:
    """What is bound for the running call (empty outside one)."""
    return _fields.get()


@contextmanager
def scope() -> Iterator[None]:
    """What is bound inside the block is gone after it."""
    token = _fields.set(_fields.get())
    try:
        yield
    finally:
        _fields.reset(token)

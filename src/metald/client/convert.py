"""Conversions between API values and what people read and type: state names, plain dicts."""

from __future__ import annotations

import re
from typing import Any, cast

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message

from metald.gen.vmprovisioner.v1 import vm_pb2

VmStateLike = int | str
"""A VmState given as its number (2), short name ("RUNNING", "running") or full name
("VM_STATE_RUNNING")."""

_STATE_PREFIX = "VM_STATE_"

STATE_NAMES: dict[int, str] = {
    number: name.removeprefix(_STATE_PREFIX) for name, number in vm_pb2.VmState.items()
}
"""VmState number -> short name: {0: "UNSPECIFIED", 1: "CREATED", 2: "RUNNING", ...}."""

_STATE_NUMBERS: dict[str, int] = {name: number for number, name in STATE_NAMES.items()}

STATE_CHOICES: tuple[str, ...] = tuple(
    name for number, name in sorted(STATE_NAMES.items()) if number != 0
)
"""The short names a user may filter by: CREATED, RUNNING, PAUSED, SHUTDOWN."""


def state_name(state: int) -> str:
    """Short display name of a VmState number: 2 -> "RUNNING"; unknown -> "UNKNOWN(7)"."""
    return STATE_NAMES.get(state, f"UNKNOWN({state})")


def parse_state(value: VmStateLike) -> vm_pb2.VmState:
    """VmState number from 2, "running", "RUNNING" or "VM_STATE_RUNNING".

    Raises ValueError (naming the valid choices) for anything else, including UNSPECIFIED.
    """
    if isinstance(value, bool):
        number = -1
    elif isinstance(value, int):
        number = value
    else:
        key = value.strip().upper().removeprefix(_STATE_PREFIX)
        number = _STATE_NUMBERS.get(key, -1)
    if number not in STATE_NAMES or number == 0:
        choices = ", ".join(STATE_CHOICES)
        raise ValueError(f"invalid VM state {value!r} (choose from {choices})")
    return cast(vm_pb2.VmState, number)


def _enum_prefix(enum: EnumDescriptor | None) -> str:
    """The prefix of an enum's value names, by the protobuf style rule: VmState -> VM_STATE_."""
    if enum is None:
        return ""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"


def _short_enum(field: FieldDescriptor, value: Any) -> Any:
    if isinstance(value, str):
        return value.removeprefix(_enum_prefix(field.enum_type))
    return value  # a number the descriptor does not know: leave it as it is


def _shorten(data: dict[str, Any], descriptor: Descriptor) -> dict[str, Any]:
    for field in descriptor.fields:
        if field.name not in data:
            continue
        value = data[field.name]
        is_map = field.message_type is not None and field.message_type.GetOptions().map_entry
        if field.type == FieldDescriptor.TYPE_ENUM:
            if isinstance(value, list):
                data[field.name] = [_short_enum(field, v) for v in value]
            else:
                data[field.name] = _short_enum(field, value)
        elif field.message_type is not None and not is_map:
            if isinstance(value, list):
                data[field.name] = [_shorten(v, field.message_type) for v in value]
            elif isinstance(value, dict):
                data[field.name] = _shorten(value, field.message_type)
    return data


def to_dict(message: Message) -> dict[str, Any]:
    """A response as plain JSON-ready data.

    Proto field names, every field present (zeros included), 64-bit integers as numbers and
    enums as short names ("RUNNING", "DUAL_STACK") rather than "VM_STATE_RUNNING".
    """
    data: dict[str, Any] = json_format.MessageToDict(
        message,
        always_print_fields_with_no_presence=True,
        preserving_proto_field_name=True,
        unquote_int64_if_possible=True,
    )
    return _shorten(data, cast(Descriptor, message.DESCRIPTOR))

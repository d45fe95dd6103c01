"""Python SDK for metald's VmService: `MetaldClient` (blocking) and `AsyncMetaldClient`.

Both speak the Connect protocol with binary protobuf over plain HTTP, send
`Authorization: Bearer <token>` on every call, return the generated response messages
(`metald.client.pb` is the generated `vm_pb2` module) and raise `MetaldClientError` with the
Connect code name on failure.
"""

from __future__ import annotations

from metald.client._async import AsyncMetaldClient
from metald.client._build import DEFAULT_ADDRESS, Disk
from metald.client._sync import MetaldClient
from metald.client.convert import (
    STATE_CHOICES,
    STATE_NAMES,
    VmStateLike,
    parse_state,
    state_name,
    to_dict,
)
from metald.client.errors import MetaldClientError
from metald.gen.vmprovisioner.v1 import vm_pb2 as pb

__all__ = [
    "DEFAULT_ADDRESS",
    "STATE_CHOICES",
    "STATE_NAMES",
    "AsyncMetaldClient",
    "Disk",
    "MetaldClient",
    "MetaldClientError",
    "VmStateLike",
    "parse_state",
    "pb",
    "state_name",
    "to_dict",
]

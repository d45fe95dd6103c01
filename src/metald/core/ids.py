"""VM ids: caller-chosen (checked elsewhere) or generated here."""

from __future__ import annotations

import secrets


def new_vm_id() -> str:
    # "vm-" + 16 hex: matches the vm_id pattern, and its last 8 characters make short,
    # unique-enough interface names (Linux allows 15) when networking arrives.
    return "vm-" + secrets.token_hex(8)

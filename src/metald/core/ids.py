"""VM ids: the one rule every layer checks, and the ids metald generates.

A VM id names a directory, a jail, a cgroup, a network namespace and part of interface
names, and appears in VMM options and on the guest's kernel command line. So the rule is
narrow: 1-64 of a-z, 0-9 and '-'. That alphabet has no '/', no '.', no whitespace, no ',' (a
QEMU option separator) and no upper case (file systems that fold case), so an id is a safe
path component and option value everywhere it goes.

This module is standard library only and imports nothing else of metald, so the jailer
helper (which runs before the VMM with nothing but the standard library) can check ids with
the same rule as the API. tests/unit/test_layers.py holds it to that.
"""

from __future__ import annotations

import re
import secrets

MAX_VM_ID_LENGTH = 64
VM_ID = re.compile(r"[a-z0-9-]{1,64}")
# The rule in words, for error messages.
VM_ID_RULE = "1-64 characters of a-z, 0-9 and '-'"


def is_vm_id(text: str) -> bool:
    return VM_ID.fullmatch(text) is not None


def new_vm_id() -> str:
    # "vm-" + 16 hex: matches VM_ID, and its last 8 characters make short, unique-enough
    # interface names (Linux allows 15).
    return "vm-" + secrets.token_hex(8)

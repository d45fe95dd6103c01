"""nftables from Python without a fork: libnftables (the library behind the ``nft``
command, Debian package ``nftables``) through ctypes, one context per call.

Why libnftables and not the ``nft`` command: the network manager does its work in worker
threads that step into a namespace with setns(2) for a moment (metald.network.netns); the
library opens its netlink socket in the calling thread's namespace, so a ruleset lands in
the namespace the thread is in, with no child process and no ``ip netns exec``. A ruleset
given as one buffer is one netlink transaction: it replaces a table atomically, so there is
never a moment without rules.

Why not pyroute2: its nftables support does not cover the bridge family's expressions we
need (ARP fields, raw transport-header payloads) in a form worth maintaining; the ruleset
text is what an operator reads with ``nft list ruleset`` too.

Blocking; call from a worker thread.
"""

from __future__ import annotations

import ctypes
import functools
import re
from typing import Any

from metald.core.errors import Unavailable
from metald.host import named_netns as netns

LIBRARY = "libnftables.so.1"
# enum nft_ctx_output_flags in nftables/libnftables.h
NFT_CTX_OUTPUT_HANDLE = 1 << 3
NFT_CTX_OUTPUT_JSON = 1 << 4
_COMMENT = re.compile(r'comment "([^"]*)"')


class NftError(Exception):
    """nftables refused a command (the message is libnftables' own)."""


@functools.cache
def _lib() -> Any:
    try:
        lib = ctypes.CDLL(LIBRARY, use_errno=True)
    except OSError as exc:
        raise Unavailable(
            f"network: {LIBRARY} is missing ({exc}); install the Debian package nftables "
            "(make deps does): the guest port filters need it"
        ) from None
    lib.nft_ctx_new.restype = ctypes.c_void_p
    lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
    lib.nft_ctx_free.restype = None
    lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
    for name in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
        getattr(lib, name).restype = ctypes.c_int
        getattr(lib, name).argtypes = [ctypes.c_void_p]
    for name in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
        getattr(lib, name).restype = ctypes.c_char_p
        getattr(lib, name).argtypes = [ctypes.c_void_p]
    lib.nft_ctx_output_set_flags.restype = None
    lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
    lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
    lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    return lib


def available() -> bool:
    try:
        _lib()
    except Unavailable:
        return False
    return True


def run(ns: str | None, commands: str, *, as_json: bool = False) -> str:
    """Run nft commands (the ``nft -f`` syntax; one buffer is one transaction) in the named
    namespace (None: the calling thread's own); what nft printed. NftError on refusal."""
    lib = _lib()
    with netns.entered(ns):
        ctx = lib.nft_ctx_new(0)
        if not ctx:
            raise NftError("nft_ctx_new failed")
        try:
            lib.nft_ctx_buffer_output(ctx)
            lib.nft_ctx_buffer_error(ctx)
            if as_json:
                lib.nft_ctx_output_set_flags(ctx, NFT_CTX_OUTPUT_JSON)
            rc = lib.nft_run_cmd_from_buffer(ctx, commands.encode())
            out = (lib.nft_ctx_get_output_buffer(ctx) or b"").decode(errors="replace")
            err = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace")
        finally:
            lib.nft_ctx_free(ctx)
    if rc != 0:
        raise NftError(err.strip() or f"nft failed ({rc})")
    return out


def table_comment(ns: str | None, family: str, table: str) -> str | None:
    """The comment of a table, "" for a table without one, None if there is no such table.
    (Read from the text listing: libnftables 1.0.6 leaves table comments out of its JSON.)"""
    try:
        out = run(ns, f"list table {family} {table}")
    except NftError as exc:
        if "No such file or directory" in str(exc):
            return None
        raise
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    # The first line is "table <family> <name> {"; a table's comment comes right after it.
    if len(lines) > 1:
        m = _COMMENT.fullmatch(lines[1])
        if m is not None:
            return m.group(1)
    return ""


def replace_table(ns: str | None, family: str, table: str, body: str) -> None:
    """Make the table hold exactly `body` (its chains and comment), atomically."""
    run(
        ns,
        f"add table {family} {table}\n"
        f"delete table {family} {table}\n"
        f"table {family} {table} {{\n{body}\n}}\n",
    )


def delete_table(ns: str | None, family: str, table: str) -> bool:
    """Delete a table; whether there was one."""
    try:
        run(ns, f"delete table {family} {table}")
    except NftError as exc:
        if "No such file or directory" in str(exc):
            return False
        raise
    return True

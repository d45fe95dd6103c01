"""What a tenant is shown of text that metald did not write itself, and of the host.

A VMM's exit reason carries what the VMM said (QEMU's shutdown event, the first line of its
stderr), and a compromised VMM says what it likes: that text is bounded (length, one line of
printable characters) before it is stored or shown. Text shown to a tenant, in error
messages and in GetVmInfo's backend_info, must not hold host paths, host pids or host
software versions: operators find those in the logs (and, on development hosts, through
`UNKEY_METALD_EXPOSE_HOST_DETAILS`). backend_info is cut to the keys a tenant may see;
free text has every absolute path cut to its last component (the file name still says what
was wrong: "vmlinux: not an ELF file").

Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

# Stored exit reasons and shown error messages, in UTF-8 bytes.
MAX_REASON_BYTES = 512
MAX_MESSAGE_BYTES = 1024
# backend_info keys a tenant is shown; the rest (pid, sockets, console path, VMM version)
# are host details.
TENANT_INFO_KEYS = frozenset({"accelerator", "exit_reason"})

_NON_PRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")
# An absolute path: a '/' that does not continue a word, a number or a URL scheme
# ("10.0.0.2/24", "bytes/s" and "http://" are not paths), up to a space or punctuation.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])/[^\s'\"`,;()\[\]{}<>]*")


def one_line(text: str, max_bytes: int = MAX_REASON_BYTES) -> str:
    """Control characters (newlines included) as single spaces, trimmed, at most
    `max_bytes` of UTF-8 (cut on a character boundary, marked with "...")."""
    flat = _NON_PRINTABLE.sub(" ", text).strip()
    raw = flat.encode()
    if len(raw) <= max_bytes:
        return flat
    return raw[: max_bytes - 3].decode(errors="ignore").rstrip() + "..."


def without_host_paths(text: str) -> str:
    """Every absolute path cut to its last component ("/srv/jail/x/vmlinux" -> "vmlinux")."""

    def last(match: re.Match[str]) -> str:
        whole = match.group(0)
        path = whole.rstrip("/.:")
        if not path:
            return whole  # a lone "/"
        return path.rsplit("/", 1)[-1] + whole[len(path) :]

    return _ABSOLUTE_PATH.sub(last, text)


def vmm_text(text: str) -> str:
    """Text a VMM controls (an exit reason), as it may be stored and shown."""
    return one_line(without_host_paths(text), MAX_REASON_BYTES)


def tenant_message(text: str) -> str:
    """An error message as a tenant is shown it."""
    return one_line(without_host_paths(text), MAX_MESSAGE_BYTES)


def tenant_backend_info(info: Mapping[str, str]) -> dict[str, str]:
    """backend_info without host details; what is left is cleaned like a VMM's text."""
    return {k: vmm_text(v) for k, v in info.items() if k in TENANT_INFO_KEYS}

"""The guest kernel command line, within the kernel's budget (any VMM).

x86's COMMAND_LINE_SIZE is 2048 including the NUL; a longer line makes a guest die silently
before its first console line (measured under QEMU microvm: 2047 bytes boot, 2048 do not).
metald's own arguments come first and always fit (console, panic, reboot, the TCG timer fix,
the `metald.*` contract, the NIC's addresses); the caller's follow (the kernel lets a later
one win, which is why validation refuses callers' arguments that would shadow ours), and
those that do not fit are dropped whole, never cut in half.

The API refuses a caller's argument that names one of metald's in any spelling
(core/guest.py). A spec saved before that rule existed may still hold one: such a word is
left out here with all the caller's other arguments (and logged), so no spelling reaches a
guest whatever the spec says.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from metald.core.guest import (
    GuestArgs,
    kernel_arg_problem,
    kernel_command_line,
    split_kernel_args,
)
from metald.core.models import LaunchSpec

log = logging.getLogger(__name__)

MAX_KERNEL_CMDLINE = 2047
# The guest agent's serial port: a second ISA UART, ttyS1 in the guest.
AGENT_TTY = "ttyS1"


@dataclass(frozen=True)
class GuestBoot:
    """How a VMM boots the default guest: the kernel's reboot= mode (QEMU microvm: t;
    Firecracker: k), what the init does at the end (Firecracker exits on a guest reset, so
    its guests reboot instead of powering off), the accelerator and, under TCG, the host's TSC
    rate; whether the guest agent's port is there."""

    reboot: str = "t"
    on_shutdown: str = "poweroff"
    accelerator: str = "tcg"
    tsc_khz: int | None = None
    agent: bool = False


def kernel_cmdline_and_dropped(spec: LaunchSpec, boot: GuestBoot) -> tuple[str, list[str]]:
    """The whole command line and the caller's arguments left out (those that did not fit,
    and any a caller may not give). ValueError when metald's own arguments alone do not
    fit."""
    guest = GuestArgs(
        vm_id=spec.vm_id, on_shutdown=boot.on_shutdown, agent=AGENT_TTY if boot.agent else ""
    )
    timer_tsc = boot.tsc_khz if boot.accelerator == "tcg" else None
    args = kernel_command_line(
        guest, accel=boot.accelerator, reboot=boot.reboot, tsc_khz=timer_tsc
    ).split()
    if spec.nic is not None:
        args += spec.nic.guest_args.split()
    size = len(" ".join(args).encode())
    if size > MAX_KERNEL_CMDLINE:
        raise ValueError(
            f"metald's own kernel arguments take {size} bytes, more than the kernel's "
            f"{MAX_KERNEL_CMDLINE}"
        )
    caller = split_kernel_args(spec.kernel_args)
    refused = [w for w in caller if kernel_arg_problem(w) is not None]
    if refused:
        # Not what the API lets through today: none of the caller's arguments is used.
        log.warning(
            "VM %s: its saved kernel arguments hold %d the API refuses; all %d left out",
            spec.vm_id,
            len(refused),
            len(caller),
        )
        return " ".join(args), caller
    dropped: list[str] = []
    for word in caller:
        extra = 1 + len(word.encode())
        if dropped or size + extra > MAX_KERNEL_CMDLINE:
            dropped.append(word)  # keep the caller's order: nothing after a dropped word
            continue
        args.append(word)
        size += extra
    return " ".join(args), dropped

"""The guest contract: the kernel arguments metald gives every guest, and the ``metald.*``
arguments the default guest's init honours (assets/guest-init.sh prints the console lines
`METALD-GUEST READY ...`, `HEARTBEAT n` and `SHUTDOWN` that tests and operators read).

Pure: every backend builds its guests' command lines from here (backends/vmm/cmdline.py
keeps them within the kernel's budget), and the network manager fills in the addresses.

Under TCG the guest's TSC ticks at the host's TSC rate, but Debian's kernel calibrates it
against the PIT with busy loops that are far too slow when emulated: under any load the
calibration fails ("tsc: Unable to calibrate against PIT", "Marking TSC unstable due to could
not calculate TSC khz") and the kernel then hangs for good. Measured on the development
machines: 4 of 4 and 6 of 6 guests booted in parallel hung, and about half of single boots.
``tsc_early_khz=<host TSC kHz>`` skips the calibration; with it 4 of 4 parallel boots came up.
Under KVM the kernel uses kvm-clock and needs none of this.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# sysctl.kernel.ctrl-alt-del=0: Ctrl-Alt-Del (how metald asks a guest to stop) becomes a
# SIGINT to init from the moment the kernel applies its sysctl arguments, just before init
# starts, instead of an immediate reboot. Without it a key press that reaches a guest still
# booting resets it; metald repeats the keys every 2 s until the VMM exits, so on a loaded host
# whose guests take longer than that to reach their init (TCG), a shutdown right after a boot
# or reboot kept resetting the guest until the timeout and then killed it (measured: 8 of 8
# such shutdowns forced with guests taking 8 s to READY). Until the init traps SIGINT, PID 1
# ignores it, so early presses are lost harmlessly and the next one is taken.
BASE_ARGS = "console=ttyS0 panic=-1 quiet sysctl.kernel.ctrl-alt-del=0"

# -- the caller's kernel arguments ------------------------------------------------------------
#
# A caller's arguments follow metald's on the line, and the kernel lets a later one win, so
# none may name a parameter metald sets or the guest contract relies on. The kernel is lenient
# about spelling, the default guest's init (a shell loop over `$(cat /proc/cmdline)`) is
# naive, and VMMs append their own arguments after the caller's (virtio_mmio.device=...), so
# only one plain spelling is let through:
#
# - words separated by single ASCII spaces (the kernel also splits on tabs, newlines and, in
#   its Latin-1 ctype table, on 0xA0, the NBSP; the init's shell loop on tabs and newlines);
# - ASCII only, no quotes of either kind (the kernel takes `"init"=/x` as init=, and a quoted
#   value with spaces is one argument to the kernel but several words to the shell loop), no
#   backslash, backtick or dollar, no glob characters (the loop is unquoted: `*` expands);
# - a name of letters, digits, `_ - . /` starting with a letter, digit or `_`;
# - no `--` (what follows it goes to init as its arguments: the VMM's own arguments too).
#
# Names are compared case-insensitively and without their `-`, `_`, `.` and `/`: the kernel
# treats `-` and `_` as one in parameter names, sysctl.* takes `.` or `/` as separator, and a
# case or separator variant the kernel would ignore today (`rd_init`, `Console`) is still
# refused: it reads as metald's, and a later kernel or init may read it so too.
RESERVED_NAMES = frozenset(
    {
        "console",
        "panic",
        "reboot",
        "init",
        "rdinit",
        "initrd",
        "tsc_early_khz",
        "tsc",
        "sysctl.kernel.ctrl-alt-del",
        "sysctl.kernel.panic",
    }
)
# Every name that starts with one of these (the metald.* contract, in any spelling).
RESERVED_PREFIXES = ("metald",)
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./-]*")
# Printable ASCII without space, quotes, backslash, backtick, dollar and glob characters.
_VALUE = re.compile(r"[!#%&()+,./0-9:;<=>@A-Z^_a-z{|}~-]*")
_SEPARATORS = str.maketrans("", "", "-_./")


def canonical_arg_name(name: str) -> str:
    """The form names are compared in: lower case, without `-` `_` `.` `/`."""
    return name.lower().translate(_SEPARATORS)


_RESERVED_CANONICAL = frozenset(canonical_arg_name(n) for n in RESERVED_NAMES)


def kernel_arg_problem(word: str) -> str | None:
    """Why one space-separated word may not be a caller's kernel argument (None: it may)."""
    if word.strip("-") == "":
        return "must not contain '--' (what follows would go to init)"
    name, eq, value = word.partition("=")
    if not _NAME.fullmatch(name):
        return (
            f"argument names must be ASCII letters, digits, _ - . / (got {_shown(name)}; no quotes)"
        )
    if eq and not _VALUE.fullmatch(value):
        return (
            f"the value of {name} must be printable ASCII without spaces, quotes, "
            "backslashes, $, ` or glob characters"
        )
    canonical = canonical_arg_name(name)
    if canonical in _RESERVED_CANONICAL or canonical.startswith(RESERVED_PREFIXES):
        return f"{name} is set by metald (in any spelling)"
    return None


def split_kernel_args(args: str) -> list[str]:
    """A caller's arguments as the words the kernel will see (only ' ' separates them)."""
    return [w for w in args.split(" ") if w]


def _shown(text: str) -> str:
    return ascii(text[:40])


def tcg_timer_args(tsc_khz: int | None) -> str:
    """Kernel arguments a guest under TCG needs to boot reliably (empty if the rate is unknown)."""
    khz = tsc_khz
    # tsc=reliable: the clocksource watchdog would otherwise distrust the TSC under TCG.
    return f"tsc_early_khz={khz} tsc=reliable" if khz else ""


@dataclass(frozen=True)
class GuestArgs:
    """The ``metald.*`` kernel arguments the default guest's init honours."""

    vm_id: str = ""
    on_shutdown: str = "poweroff"  # or "reboot" (Firecracker: it exits on a guest reset)
    ip4: str = ""  # address/prefix
    gw4: str = ""
    ip6: str = ""  # address/prefix
    gw6: str = ""
    dns: tuple[str, ...] = ()
    mac: str = ""
    root: str = ""  # e.g. /dev/vda: mount that ext4 device and switch_root into it
    agent: str = ""  # e.g. ttyS1: a shell on that serial port for the host (tests)

    def render(self) -> str:
        args = []
        for key in ("vm_id", "ip4", "gw4", "ip6", "gw6", "mac", "root", "agent"):
            value = getattr(self, key)
            if value:
                args.append(f"metald.{key}={_check(key, value)}")
        if self.dns:
            args.append("metald.dns=" + ",".join(_check("dns", d) for d in self.dns))
        if self.on_shutdown not in ("poweroff", "reboot"):
            raise ValueError("on_shutdown must be poweroff or reboot")
        if self.on_shutdown == "reboot":
            args.append("metald.on_shutdown=reboot")
        return " ".join(args)


def _check(key: str, value: str) -> str:
    if not value or any(c.isspace() or c in "\"'\\" or not c.isprintable() for c in value):
        raise ValueError(f"metald.{key} must be one printable word without quotes")
    return value


def kernel_command_line(
    guest: GuestArgs,
    *,
    accel: str = "tcg",
    reboot: str = "t",
    tsc_khz: int | None = None,
    extra: str = "",
) -> str:
    """A whole command line: console and panic settings, ``reboot=<reboot>`` (``t`` for QEMU
    microvm, ``k`` for Firecracker), the TCG timer fix when ``accel`` is tcg, the guest's
    ``metald.*`` arguments and ``extra``."""
    parts = [BASE_ARGS, f"reboot={reboot}"]
    if accel == "tcg":
        parts.append(tcg_timer_args(tsc_khz))
    parts.append(guest.render())
    parts.append(extra)
    return " ".join(p for p in parts if p)

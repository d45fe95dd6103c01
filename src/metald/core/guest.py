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

"""Host CPU facts a guest needs: the TSC rate a TCG guest is told (see core/guest.py
for why a guest under TCG must not calibrate its TSC itself)."""

from __future__ import annotations

import re
from pathlib import Path

_CPU_MHZ_RE = re.compile(r"^cpu MHz\s*:\s*([0-9.]+)\s*$", re.M)


def host_tsc_khz(cpuinfo: Path = Path("/proc/cpuinfo")) -> int | None:
    """The host's TSC frequency in kHz (what a TCG guest's TSC runs at), or None if unknown.

    Read from /proc/cpuinfo's "cpu MHz" of the first CPU, which is the TSC rate on hosts
    without cpufreq (virtual machines: the hosts where guests have to run under TCG). With a
    cpufreq driver that field is the current clock, so None is returned there.
    """
    if Path("/sys/devices/system/cpu/cpu0/cpufreq").exists():
        return None
    try:
        m = _CPU_MHZ_RE.search(cpuinfo.read_text())
    except OSError:
        return None
    if m is None:
        return None
    khz = round(float(m.group(1)) * 1000)
    return khz if khz > 0 else None

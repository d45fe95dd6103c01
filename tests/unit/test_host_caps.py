"""host/caps.py: the effective set by name, from a status file (ours, and made-up ones)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from metald.host import caps


def _status(tmp_path: Path, mask: int) -> Path:
    path = tmp_path / "status"
    path.write_text(f"Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t{mask:016x}\n")
    return path


def test_names_follow_the_kernels_numbers() -> None:
    assert caps.NUMBERS["CAP_CHOWN"] == 0 and caps.NUMBERS["CAP_NET_ADMIN"] == 12
    assert caps.NUMBERS["CAP_SYS_ADMIN"] == 21 and caps.NUMBERS["CAP_MKNOD"] == 27
    assert caps.NUMBERS["CAP_CHECKPOINT_RESTORE"] == 40


def test_the_effective_set_is_read_by_name(tmp_path: Path) -> None:
    mask = 1 << 12 | 1 << 21
    assert caps.effective(_status(tmp_path, mask)) == {"CAP_NET_ADMIN", "CAP_SYS_ADMIN"}
    assert caps.effective(_status(tmp_path, 0)) == frozenset()
    (tmp_path / "status").write_text("Name:\tx\n")
    with pytest.raises(OSError, match="no CapEff"):
        caps.effective(tmp_path / "status")


def test_this_process() -> None:
    held = caps.effective()
    mask = int(
        next(
            line.split()[1]
            for line in Path("/proc/self/status").read_text().splitlines()
            if line.startswith("CapEff:")
        ),
        16,
    )
    assert held == {name for name, n in caps.NUMBERS.items() if mask >> n & 1}
    assert caps.missing(sorted(held)) == []
    absent = [name for name in caps.NUMBERS if name not in held]
    assert caps.missing(absent) == absent
    assert caps.privileged([]) and caps.privileged(sorted(held))
    if os.geteuid() != 0 and absent:
        assert not caps.privileged(absent)

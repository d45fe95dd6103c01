"""Trimming logs in place, on this machine's filesystem and on tmpfs (no collapse there)."""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

import pytest

from metald.host.logtrim import NotALog, trim_log


@pytest.fixture(params=["disk", "tmpfs"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    if request.param == "disk":
        return tmp_path
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm")
    return Path(tempfile.mkdtemp(dir=shm))


def test_a_log_past_its_cap_keeps_its_newest_part_and_appends_go_on(where: Path) -> None:
    log = where / "console.log"
    lines = [f"line {i:07d}\n".encode() for i in range(200_000)]  # 2.6 MB
    writer = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(writer, b"".join(lines))
        dropped = trim_log(log, 1 << 20)
        size = log.stat().st_size
        assert dropped > 0 and size <= 1 << 20
        assert size >= (1 << 19) - 8192  # about half the cap is kept
        text = log.read_bytes()
        assert text.endswith(lines[-1])  # the newest output stays
        os.write(writer, b"after\n")  # the writer's O_APPEND goes to the new end
        assert log.read_bytes() == text + b"after\n"
        assert trim_log(log, 1 << 20) == 0  # under the cap: untouched
    finally:
        os.close(writer)


def test_what_a_vmm_put_in_the_logs_place_is_left_alone(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"x" * 10_000)
    (tmp_path / "link").symlink_to(victim)
    os.link(victim, tmp_path / "hard")
    for name in ("link", "hard"):
        with pytest.raises(NotALog):
            trim_log(tmp_path / name, 4096)
    with pytest.raises(NotALog):
        trim_log(victim, 4096, owner=12345)  # not the VMM's file
    assert victim.stat().st_size == 10_000
    assert trim_log(tmp_path / "absent", 4096) == 0


async def test_the_capper_trims_every_file_it_is_given(tmp_path: Path) -> None:
    from metald.backends.vmm.logcaps import CappedFile, LogCapper

    big, small, foreign = tmp_path / "big", tmp_path / "small", tmp_path / "foreign"
    big.write_bytes(b"b" * 100_000)
    small.write_bytes(b"s" * 100)
    foreign.write_bytes(b"f" * 100_000)
    me = os.getuid()
    capper = LogCapper(
        lambda: [
            CappedFile(big, 16_384, me),
            CappedFile(small, 16_384, me),
            CappedFile(foreign, 16_384, me + 1),  # not the VMM's: left alone, logged
            CappedFile(tmp_path / "gone", 16_384, me),
        ],
        interval=0.01,
    )
    assert await capper.check_once() > 0
    assert big.stat().st_size <= 16_384
    assert small.stat().st_size == 100 and foreign.stat().st_size == 100_000
    big.write_bytes(b"b" * 100_000)
    capper.start()
    for _ in range(3000):  # the loop gets to it
        if big.stat().st_size <= 16_384:
            break
        await asyncio.sleep(0.01)
    await capper.stop()
    assert big.stat().st_size <= 16_384

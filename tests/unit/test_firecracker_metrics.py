"""Summing Firecracker's resetting metrics lines, read from a real FIFO."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from metald.backends.firecracker.metrics import MAX_LINE, MetricsReader
from metald.host.sockets import open_fifo_for_reading


def line(ts: int, block: dict[str, int] | None = None, net: dict[str, int] | None = None) -> bytes:
    """One flush in Firecracker's shape: the timestamp first, then groups of counters
    (including per-device groups and others metald does not sum)."""
    obj: dict[str, Any] = {"utc_timestamp_ms": ts, "api_server": {"process_startup_time_us": 0}}
    obj["block"] = {"read_bytes": 0, "write_bytes": 0, "read_count": 0, "write_count": 0}
    obj["block"].update(block or {})
    obj["block_rootfs"] = dict(obj["block"])  # per-drive: not summed again
    obj["net"] = {
        "rx_bytes_count": 0,
        "tx_bytes_count": 0,
        "rx_packets_count": 0,
        "tx_packets_count": 0,
    }
    obj["net"].update(net or {})
    obj["net_eth0"] = dict(obj["net"])
    obj["vcpu"] = {"exit_io_in": 3}
    return json.dumps(obj).encode() + b"\n"


class Fifo:
    def __init__(self, path: Path) -> None:
        os.mkfifo(path, 0o600)
        self.path = path
        self.read_fd = open_fifo_for_reading(path, os.getuid())
        self.write_fd: int | None = None
        self.open_writer()
        self.reader = MetricsReader(self.read_fd)

    def open_writer(self) -> None:
        self.write_fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)

    def close_writer(self) -> None:
        if self.write_fd is not None:
            os.close(self.write_fd)
            self.write_fd = None

    def write(self, data: bytes) -> None:
        assert self.write_fd is not None
        assert os.write(self.write_fd, data) == len(data)

    def close(self) -> None:
        self.close_writer()
        os.close(self.read_fd)


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[Fifo]:
    f = Fifo(tmp_path / "metrics.fifo")
    yield f
    f.close()


def test_resetting_flushes_are_summed(fifo: Fifo) -> None:
    fifo.write(line(1, block={"read_bytes": 4096, "read_count": 1}, net={"rx_bytes_count": 98}))
    fifo.write(line(2))  # nothing happened between these two flushes
    fifo.write(
        line(
            3,
            block={"read_bytes": 8192, "read_count": 2, "write_bytes": 512, "write_count": 1},
            net={"rx_bytes_count": 2, "tx_bytes_count": 70, "rx_packets_count": 1},
        )
    )
    t = fifo.reader.drain()
    assert (t.disk_read_bytes, t.disk_read_ops) == (12288, 3)
    assert (t.disk_write_bytes, t.disk_write_ops) == (512, 1)
    assert (t.net_rx_bytes, t.net_tx_bytes, t.net_rx_packets, t.net_tx_packets) == (100, 70, 1, 0)
    assert (t.lines, t.dropped_lines) == (3, 0)
    # Later flushes keep adding.
    fifo.write(line(4, block={"read_bytes": 1}, net={"tx_packets_count": 5}))
    t = fifo.reader.drain()
    assert (t.disk_read_bytes, t.net_tx_packets, t.lines) == (12289, 5, 4)


def test_a_torn_line_waits_for_its_rest(fifo: Fifo) -> None:
    data = line(1, block={"write_bytes": 1000, "write_count": 2})
    cut = len(data) // 2
    fifo.write(data[:cut])
    t = fifo.reader.drain()
    assert (t.disk_write_bytes, t.lines, t.dropped_lines) == (0, 0, 0)
    fifo.write(data[cut:] + line(2, block={"write_bytes": 24}))
    t = fifo.reader.drain()
    assert (t.disk_write_bytes, t.disk_write_ops, t.lines, t.dropped_lines) == (1024, 2, 2, 0)


def test_a_lost_line_only_misses_its_own_increments(fifo: Fifo) -> None:
    flushes = [
        line(i, block={"read_bytes": 100 * i}, net={"rx_packets_count": i}) for i in (1, 2, 3)
    ]
    fifo.write(flushes[0])
    # flushes[1] was lost (the FIFO was full, or nobody read it)
    fifo.write(flushes[2])
    t = fifo.reader.drain()
    assert (t.disk_read_bytes, t.net_rx_packets, t.lines) == (400, 4, 2)


def test_a_short_write_keeps_the_next_object(fifo: Fifo) -> None:
    # Firecracker gave up half-way through one object; the next follows on the same line.
    partial = line(1, block={"read_bytes": 7})[:40]
    fifo.write(partial + line(2, block={"read_bytes": 5}))
    t = fifo.reader.drain()
    assert (t.disk_read_bytes, t.lines, t.dropped_lines) == (5, 1, 1)


def test_garbage_is_dropped_and_counted(fifo: Fifo) -> None:
    fifo.write(b"not json at all\n")
    fifo.write(b"[1, 2, 3]\n")
    fifo.write(b"\xff\xfe\n")
    fifo.write(b"\n")  # an empty line is nothing
    # Values that are not non-negative integers are ignored; the rest of the object counts.
    fifo.write(
        json.dumps(
            {
                "block": {
                    "read_bytes": -5,
                    "write_bytes": "7",
                    "read_count": True,
                    "write_count": 1,
                },
                "net": [1],
            }
        ).encode()
        + b"\n"
    )
    fifo.write(line(9, block={"read_bytes": 10}))
    t = fifo.reader.drain()
    assert (t.disk_read_bytes, t.disk_write_bytes, t.disk_read_ops, t.disk_write_ops) == (
        10,
        0,
        0,
        1,
    )
    assert (t.lines, t.dropped_lines) == (2, 3)


def test_no_writer_is_eof_and_the_fd_is_kept(fifo: Fifo) -> None:
    fifo.write(line(1, block={"read_bytes": 1}))
    fifo.close_writer()
    assert fifo.reader.drain().disk_read_bytes == 1
    assert fifo.reader.drain().disk_read_bytes == 1  # EOF again: nothing changes
    fifo.open_writer()  # the same VMM's FIFO, written again
    fifo.write(line(2, block={"read_bytes": 2}))
    assert fifo.reader.drain().disk_read_bytes == 3


def test_a_line_longer_than_the_bound_is_dropped(fifo: Fifo) -> None:
    reader = fifo.reader
    chunk = b'{"utc_timestamp_ms": 1, "pad": "' + b"x" * (64 * 1024)
    fed = 0
    while fed <= MAX_LINE:
        reader.feed(chunk)
        fed += len(chunk)
    assert len(reader._pending) <= MAX_LINE
    reader.feed(b'", "block": {"read_bytes": 99}}\n' + line(2, block={"read_bytes": 1}))
    t = reader.totals
    assert (t.disk_read_bytes, t.lines, t.dropped_lines) == (1, 1, 1)

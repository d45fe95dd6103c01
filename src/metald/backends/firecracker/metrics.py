"""Running disk and network totals from Firecracker's metrics FIFO.

Firecracker writes one JSON object per flush (each FlushMetrics, and once a minute by
itself) and its counters reset at every flush: each line holds the increments since the
previous one. metald wants totals since the process started, so a `MetricsReader` sums the
increments as it reads them. What it must survive, since the FIFO is written by a VMM that
metald does not trust and that may be killed at any moment:

- a torn line: a read ends in the middle of a line; the partial line waits for its rest;
- a short write: Firecracker gave up half-way, and the next object follows the partial one
  on the same line; the last complete object on such a line is still used;
- a lost line (the FIFO was full, or nobody was reading): its increments are simply missing.
  Totals only ever grow, so they stay consistent, never negative;
- garbage, and values that are not non-negative integers: dropped (and counted);
- an unbounded line: a line longer than `MAX_LINE` bytes is dropped whole;
- no writer (the VMM exited, or has not opened the FIFO yet): EOF, and the descriptor is
  kept, so a later writer (after a restart of metald, the same VMM) is read again.

The reader does not own the descriptor: the control opens it
(metald.host.sockets.open_fifo_for_reading, non-blocking) and closes it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

MAX_LINE = 1024 * 1024
_READ_SIZE = 64 * 1024
_MAX_READ_PER_DRAIN = 16 * 1024 * 1024  # one drain never spins forever on a busy writer
# Every Firecracker metrics object starts with its timestamp: where a new one begins after a
# short write.
_OBJECT_START = b'{"utc_timestamp_ms"'

# (group, counter) -> total name
BLOCK_COUNTERS = {
    "read_bytes": "disk_read_bytes",
    "write_bytes": "disk_write_bytes",
    "read_count": "disk_read_ops",
    "write_count": "disk_write_ops",
}
NET_COUNTERS = {
    "rx_bytes_count": "net_rx_bytes",
    "tx_bytes_count": "net_tx_bytes",
    "rx_packets_count": "net_rx_packets",
    "tx_packets_count": "net_tx_packets",
}
GROUPS = {"block": BLOCK_COUNTERS, "net": NET_COUNTERS}


@dataclass
class MetricsTotals:
    """Sums of every increment read so far."""

    disk_read_bytes: int = 0
    disk_write_bytes: int = 0
    disk_read_ops: int = 0
    disk_write_ops: int = 0
    net_rx_bytes: int = 0
    net_tx_bytes: int = 0
    net_rx_packets: int = 0
    net_tx_packets: int = 0
    lines: int = 0  # objects summed
    dropped_lines: int = 0  # lines (or cut-off objects) that never parsed, or too long


class MetricsReader:
    """Reads what is in the FIFO behind `fd` and keeps running totals."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.totals = MetricsTotals()
        self._pending = bytearray()
        self._discarding = False  # inside a line longer than MAX_LINE

    def drain(self) -> MetricsTotals:
        """Read everything available now (never blocks) and sum the complete lines."""
        read = 0
        while read < _MAX_READ_PER_DRAIN:
            try:
                chunk = os.read(self.fd, _READ_SIZE)
            except BlockingIOError:
                break  # a writer, but nothing more for now
            except InterruptedError:
                continue
            if not chunk:
                break  # no writer: keep the fd (and any partial line) for a later one
            read += len(chunk)
            self.feed(chunk)
        return self.totals

    def feed(self, data: bytes) -> None:
        """Take bytes as read from the FIFO (also what tests use directly)."""
        while data:
            newline = data.find(b"\n")
            if newline < 0:
                self._append(data)
                return
            self._append(data[:newline])
            data = data[newline + 1 :]
            if self._discarding:
                self._discarding = False
            else:
                self._line(bytes(self._pending))
            self._pending.clear()

    def _append(self, data: bytes) -> None:
        if self._discarding:
            return
        if len(self._pending) + len(data) > MAX_LINE:
            self._pending.clear()
            self._discarding = True
            self.totals.dropped_lines += 1
            return
        self._pending += data

    def _line(self, line: bytes) -> None:
        line = line.strip()
        if not line:
            return
        data = _parse(line)
        if data is None:
            # A short write followed by the next object: use the last object that parses.
            start = line.rfind(_OBJECT_START)
            data = _parse(line[start:]) if start > 0 else None
            self.totals.dropped_lines += 1  # the cut-off object (or the whole line)
        if data is None:
            return
        self._add(data)

    def _add(self, data: dict[str, Any]) -> None:
        totals = self.totals
        for group, counters in GROUPS.items():
            values = data.get(group)
            if not isinstance(values, dict):
                continue
            for key, total in counters.items():
                value = values.get(key)
                if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                    setattr(totals, total, getattr(totals, total) + value)
        totals.lines += 1


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None

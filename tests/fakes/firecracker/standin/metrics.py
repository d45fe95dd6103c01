"""Metrics and log output the way Firecracker writes them.

Firecracker writes one JSON object per line to its metrics file or FIFO, on FlushMetrics and
every 60 s; its counters (SharedIncMetric) are deltas: each line holds what happened since the
previous line. Writes to a FIFO never block the VMM: a line that cannot be written is dropped
(and a FIFO without a reader is opened again at the next write). Block numbers here come from
QEMU (query-blockstats), network numbers from the TAP's own counters via rtnetlink (no /sys in
a jail). A TAP's tx is what the guest receives, so Firecracker's rx_* is the TAP's tx_*.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import stat
import struct
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


class Sink:
    """A log or metrics destination that metald made: a FIFO (opened O_WRONLY|O_NONBLOCK,
    retried while it has no reader) or a regular file (appended to)."""

    def __init__(self, path: Path) -> None:
        st = os.stat(path)  # FileNotFoundError: the caller answers 400
        self.path = path
        self.fifo = stat.S_ISFIFO(st.st_mode)
        if not (self.fifo or stat.S_ISREG(st.st_mode)):
            raise OSError(errno.EINVAL, f"{path} is neither a named pipe nor a regular file")
        self._fd: int | None = None
        self._open()
        if not self.fifo and self._fd is None:
            raise OSError(errno.EACCES, f"cannot open {path} for writing")

    def _open(self) -> None:
        flags = os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if self.fifo else os.O_APPEND)
        try:
            self._fd = os.open(self.path, flags)
        except OSError:  # ENXIO: a FIFO with no reader yet
            self._fd = None

    def write_line(self, line: str) -> bool:
        """True if the whole line was written; otherwise it is dropped, as Firecracker does."""
        if self._fd is None:
            self._open()
        if self._fd is None:
            return False
        data = (line.rstrip("\n") + "\n").encode()
        try:
            return os.write(self._fd, data) == len(data)
        except OSError:  # EAGAIN (full), EPIPE (the reader went away)
            os.close(self._fd)
            self._fd = None
            return False

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# --- TAP counters through rtnetlink (stdlib only) -------------------------------------------

_RTM_GETLINK, _RTM_NEWLINK, _NLMSG_ERROR, _IFLA_STATS64 = 18, 16, 2, 23
_NLM_F_REQUEST = 1


def tap_counters(ifname: str) -> dict[str, int]:
    """rx/tx bytes and packets of a link in this network namespace (RTM_GETLINK, IFLA_STATS64)."""
    index = socket.if_nametoindex(ifname)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as s:
        ifinfo = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, index, 0, 0)
        s.send(struct.pack("=IHHII", 16 + len(ifinfo), _RTM_GETLINK, _NLM_F_REQUEST, 1, 0) + ifinfo)
        data = s.recv(65536)
    length, kind = struct.unpack_from("=IH", data)
    if kind == _NLMSG_ERROR:
        raise OSError(-struct.unpack_from("=i", data, 16)[0], f"RTM_GETLINK {ifname}")
    offset = 16 + 16  # nlmsghdr + ifinfomsg
    while offset + 4 <= length:
        rta_len, rta_type = struct.unpack_from("=HH", data, offset)
        if rta_len < 4:
            break
        if rta_type == _IFLA_STATS64:
            rx_packets, tx_packets, rx_bytes, tx_bytes = struct.unpack_from("=4Q", data, offset + 4)
            return {"rx_bytes": rx_bytes, "tx_bytes": tx_bytes, "rx_packets": rx_packets,
                    "tx_packets": tx_packets}  # fmt: skip
        offset += (rta_len + 3) & ~3
    raise OSError(errno.ENODATA, f"no IFLA_STATS64 for {ifname}")


# --- the metrics line ------------------------------------------------------------------------


def _names(text: str) -> tuple[str, ...]:
    return tuple(text.split())


# Field names as in Firecracker's metrics (BlockDeviceMetrics, NetDeviceMetrics, ...).
_BLOCK = _names(
    "activate_fails cfg_fails no_avail_buffer event_fails execute_fails invalid_reqs_count "
    "flush_count queue_event_count rate_limiter_event_count update_count update_fails "
    "read_bytes write_bytes read_count write_count rate_limiter_throttled_events "
    "io_engine_throttled_events remaining_reqs_count"
)
_NET = _names(
    "activate_fails cfg_fails mac_address_updates no_rx_avail_buffer no_tx_avail_buffer "
    "event_fails rx_queue_event_count rx_event_rate_limiter_count rx_rate_limiter_throttled "
    "rx_tap_event_count rx_bytes_count rx_packets_count rx_fails rx_count tap_read_fails "
    "tap_write_fails tx_bytes_count tx_malformed_frames tx_fails tx_count tx_packets_count "
    "tx_partial_reads tx_queue_event_count tx_rate_limiter_event_count "
    "tx_rate_limiter_throttled tx_spoofed_mac_count tx_remaining_reqs_count"
)
_STATIC = {
    "api_server": "process_startup_time_us process_startup_time_cpu_us sync_response_fails "
    "sync_vmm_send_timeout_count",
    "vcpu": "exit_io_in exit_io_out exit_mmio_read exit_mmio_write failures",
    "vmm": "panic_count",
    "uart": "error_count flush_count missed_read_count missed_write_count read_count write_count",
    "seccomp": "num_faults",
    "signals": "sigbus sigsegv sigxfsz sigxcpu sigpipe sighup sigill",
    "latencies_us": "full_create_snapshot diff_create_snapshot load_snapshot pause_vm resume_vm",
    "logger": "missed_metrics_count metrics_fails missed_log_count log_fails",
    "get_api_requests": "instance_info_count machine_cfg_count mmds_count vmm_version_count",
    "put_api_requests": "actions_count actions_fails boot_source_count boot_source_fails "
    "drive_count drive_fails logger_count logger_fails machine_cfg_count machine_cfg_fails "
    "cpu_cfg_count cpu_cfg_fails metrics_count metrics_fails network_count network_fails "
    "mmds_count mmds_fails vsock_count vsock_fails balloon_count balloon_fails "
    "serial_count serial_fails entropy_count entropy_fails pmem_count pmem_fails "
    "hotplug_memory_count hotplug_memory_fails",
    "patch_api_requests": "drive_count drive_fails network_count network_fails "
    "machine_cfg_count machine_cfg_fails mmds_count mmds_fails balloon_count balloon_fails",
}


def _latency() -> dict[str, int]:
    return {"min_us": 0, "max_us": 0, "sum_us": 0}  # Firecracker's LatencyAggregateMetrics


class Metrics:
    """Counters since the last flush. `counters` are bumped by the API (group, field);
    block and net numbers are differences of running totals read at each flush."""

    def __init__(self, sink: Sink | None = None) -> None:
        self.sink = sink  # set by PUT /metrics
        self.counters: dict[tuple[str, str], int] = {}
        self._last: dict[str, dict[str, int]] = {}  # running totals at the previous flush

    def bump(self, group: str, field: str, by: int = 1) -> None:
        self.counters[(group, field)] = self.counters.get((group, field), 0) + by

    def _delta(self, key: str, totals: Mapping[str, int]) -> dict[str, int]:
        last = self._last.get(key, {})
        self._last[key] = dict(totals)
        return {k: v - last.get(k, 0) for k, v in totals.items()}

    def line(
        self,
        blockstats: Mapping[str, Mapping[str, int] | None],
        taps: Mapping[str, str],
        read_tap: Callable[[str], dict[str, int]] = tap_counters,
    ) -> dict[str, Any]:
        """One metrics object. blockstats: drive_id -> QEMU blockstats (None: not known now);
        taps: iface_id -> TAP."""
        out: dict[str, Any] = {"utc_timestamp_ms": int(time.time() * 1000)}
        for name, fields in _STATIC.items():
            out[name] = {f: self.counters.get((name, f), 0) for f in _names(fields)}
        block_total = dict.fromkeys(_BLOCK, 0)
        for drive_id, st in sorted(blockstats.items()):
            key = f"block_{drive_id}"
            totals = self._last.get(key, {})  # QEMU did not answer (gone): no new I/O
            if st is not None:
                totals = {
                    "read_bytes": st.get("rd_bytes", 0),
                    "write_bytes": st.get("wr_bytes", 0),
                    "read_count": st.get("rd_operations", 0),
                    "write_count": st.get("wr_operations", 0),
                    "flush_count": st.get("flush_operations", 0),
                }
            delta = self._delta(key, totals)
            block = {f: delta.get(f, 0) for f in _BLOCK}
            for f in _BLOCK:
                block_total[f] += block[f]
            out[key] = block | {"read_agg": _latency(), "write_agg": _latency()}
        out["block"] = block_total | {"read_agg": _latency(), "write_agg": _latency()}
        net_total = dict.fromkeys(_NET, 0)
        for iface_id, tap in sorted(taps.items()):
            key = f"net_{iface_id}"
            totals = self._last.get(key, {})  # the TAP is gone: no new traffic
            with contextlib.suppress(OSError):
                c = read_tap(tap)  # the TAP's tx is the guest's rx
                totals = {
                    "rx_bytes_count": c["tx_bytes"],
                    "rx_packets_count": c["tx_packets"],
                    "rx_count": c["tx_packets"],
                    "tx_bytes_count": c["rx_bytes"],
                    "tx_packets_count": c["rx_packets"],
                    "tx_count": c["rx_packets"],
                }
            delta = self._delta(key, totals)
            net = {f: delta.get(f, 0) for f in _NET}
            for f in _NET:
                net_total[f] += net[f]
            out[key] = net | {"tap_write_agg": _latency()}
        out["net"] = net_total | {"tap_write_agg": _latency()}
        self.counters.clear()  # SharedIncMetric: reset at every flush
        return out

    def flush(
        self, blockstats: Mapping[str, Mapping[str, int] | None], taps: Mapping[str, str]
    ) -> bool:
        if self.sink is None:
            return False
        ok = self.sink.write_line(json.dumps(self.line(blockstats, taps), separators=(",", ":")))
        if not ok:
            self.bump("logger", "missed_metrics_count")
        return ok


class Logger:
    """Firecracker's human-readable log: one line per API request, level-filtered."""

    LEVELS = ("Off", "Error", "Warning", "Info", "Debug", "Trace")

    def __init__(self, sink: Sink, instance_id: str, cfg: Mapping[str, Any]) -> None:
        self.sink, self.instance_id = sink, instance_id
        self.level = self.LEVELS.index(str(cfg.get("level", "Info")).capitalize())
        self.show_level = bool(cfg.get("show_level", False))
        self.show_origin = bool(cfg.get("show_log_origin", False))

    def log(self, level: str, message: str) -> None:
        if self.LEVELS.index(level) > self.level:
            return
        now = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
        parts = [f"{now}.{int(time.time() * 1e9) % 1_000_000_000:09d}Z",
                 f"[{self.instance_id}:fc_api]"]  # fmt: skip
        if self.show_level:
            parts.append(f":{level.upper()}")
        if self.show_origin:
            parts.append("[firecracker-api-standin]")
        self.sink.write_line(" ".join(parts) + " " + message)

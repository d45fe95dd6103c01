"""Usage records: what metering measures of one VM at one instant, and what billing bills.

Every counter is cumulative for the life of the VM (across reboots, VMM restarts and metald
restarts): the billing service (the existing billaged, or `metald billing-sink`) bills the
positive deltas between successive records of a VM, so records of one VM must reach it in
order, and a record delivered twice changes nothing. Memory is a level, not a counter: it is
billed as a maximum (and as GiB-hours by the sink).

Times are wall-clock Unix nanoseconds: that is what the billing wire format carries
(google.protobuf.Timestamp for samples, int64 nanoseconds for start/stop/gap notices).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class UsageRecord:
    """One sample of one VM, as stored in `vm_metrics` and sent to billing."""

    vm_id: str
    customer_id: str
    timestamp_ns: int  # wall clock, Unix nanoseconds
    cpu_time_ns: int = 0  # the vCPU threads' CPU time on the host, cumulative
    memory_bytes: int = 0  # the VMM's resident memory (a level)
    disk_read_bytes: int = 0
    disk_write_bytes: int = 0
    network_rx_bytes: int = 0  # received by the guest
    network_tx_bytes: int = 0  # sent by the guest


@dataclass
class MeteringStats:
    """Running totals of metering and delivery, for /metrics (no VM or customer in them).

    The metering service owns one and updates it; the metrics adapter reads it at scrape
    time, so neither imports the other."""

    samples_total: int = 0  # samples taken (one per running VM per tick)
    sample_errors_total: int = 0  # samples that failed (the VM's tick is skipped)
    tick_lag_seconds: float = 0.0  # how late the last tick started against its schedule
    backlog_records: int = 0  # records stored and not yet delivered
    backlog_limit: int = 0  # the configured bound
    backlog_full_total: int = 0  # samples that found the backlog full
    batches_sent_total: int = 0
    records_sent_total: int = 0
    send_retries_total: int = 0  # calls repeated after a failure
    send_failures_total: int = 0  # calls that failed (unreachable or refused)
    notices_sent_total: int = 0  # started, stopped, gap and heartbeat calls delivered
    last_delivery_unix: float = 0.0


# What the billing sink bills (`metald billing usage`), computed the way the existing billaged
# does: per VM, the sum of the positive deltas between successive samples in timestamp order
# (a counter that went back -- a VMM that lost its count -- bills nothing for that step, then
# bills again from its new value); a VM's first sample is the baseline. Memory, a level, is
# billed as the integral of memory over time between successive samples (the trapezoid
# rule: exact for a level that changes linearly between samples), except over a span that
# holds a stop notice of the VM (it held no memory while stopped), and as its maximum.

GIB_HOUR_BYTE_NS = 2**30 * 3600 * 1_000_000_000  # one GiB held for one hour, in byte-ns

_COUNTERS = (
    "cpu_time_ns",
    "disk_read_bytes",
    "disk_write_bytes",
    "network_rx_bytes",
    "network_tx_bytes",
)


@dataclass(frozen=True)
class VmUsage:
    """What one VM of one customer used over its samples."""

    vm_id: str
    customer_id: str
    samples: int = 0
    first_ns: int = 0  # the first and last sample's instants (0 without samples)
    last_ns: int = 0
    cpu_time_ns: int = 0
    memory_byte_ns: int = 0  # the integral of memory over time (bytes x nanoseconds)
    memory_max_bytes: int = 0
    disk_read_bytes: int = 0
    disk_write_bytes: int = 0
    network_rx_bytes: int = 0
    network_tx_bytes: int = 0

    @property
    def cpu_seconds(self) -> float:
        return self.cpu_time_ns / 1e9

    @property
    def memory_gib_hours(self) -> float:
        return self.memory_byte_ns / GIB_HOUR_BYTE_NS


def vm_usage(
    vm_id: str,
    customer_id: str,
    samples: Iterable[UsageRecord],
    stops_ns: Iterable[int] = (),
) -> VmUsage:
    """The usage of one VM from its samples (any order; one per instant: of several at the
    same instant the first given counts, as the sink keeps the first it received).
    `stops_ns`: the instants the VM was reported stopped (NotifyVmStopped)."""
    by_time: dict[int, UsageRecord] = {}
    for sample in samples:
        by_time.setdefault(sample.timestamp_ns, sample)
    ordered = [by_time[t] for t in sorted(by_time)]
    if not ordered:
        return VmUsage(vm_id, customer_id)
    stops = sorted(stops_ns)
    totals = dict.fromkeys(_COUNTERS, 0)
    memory_byte_ns = 0
    for before, after in itertools.pairwise(ordered):
        for name in _COUNTERS:
            totals[name] += max(0, getattr(after, name) - getattr(before, name))
        if not _stopped_between(stops, before.timestamp_ns, after.timestamp_ns):
            span = after.timestamp_ns - before.timestamp_ns
            memory_byte_ns += (max(0, before.memory_bytes) + max(0, after.memory_bytes)) * span // 2
    return VmUsage(
        vm_id=vm_id,
        customer_id=customer_id,
        samples=len(ordered),
        first_ns=ordered[0].timestamp_ns,
        last_ns=ordered[-1].timestamp_ns,
        memory_byte_ns=memory_byte_ns,
        memory_max_bytes=max(0, *(s.memory_bytes for s in ordered)),
        **totals,
    )


def usage_by_vm(
    samples: Iterable[UsageRecord], stops_ns: Mapping[str, Iterable[int]] | None = None
) -> list[VmUsage]:
    """The usage of every (VM, customer) the samples name, ordered by customer then VM."""
    groups: dict[tuple[str, str], list[UsageRecord]] = {}
    for sample in samples:
        groups.setdefault((sample.customer_id, sample.vm_id), []).append(sample)
    stops = stops_ns or {}
    return [
        vm_usage(vm_id, customer_id, groups[customer_id, vm_id], stops.get(vm_id, ()))
        for customer_id, vm_id in sorted(groups)
    ]


def _stopped_between(stops: Sequence[int], start_ns: int, end_ns: int) -> bool:
    """A stop notice in [start, end): the VM stopped before the span's end (a stop at the
    instant of the span's last sample -- the final sample taken as it stopped -- leaves
    the span running)."""
    i = bisect.bisect_left(stops, start_ns)
    return i < len(stops) and stops[i] < end_ns

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

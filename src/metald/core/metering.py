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

"""Turning raw readings into counters cumulative for the life of a VM (the rebase rule).

What the host reports restarts from zero more often than a VM lives: a VMM started again
after a shutdown (or a Firecracker reboot, which is a new process) counts its CPU time and
disk bytes from zero, and a VM network rebuilt after a restart counts its traffic from zero.
Billing bills the positive deltas between successive records of a VM, so a counter that
fell back would bill nothing until it passed its old value: the usage in between would be
lost. So each record's counters are the last record's plus what the sources counted since.

The rule, per counter: while the source is the one of the last reading (the same VMM
process, by pid and start time, for CPU and disk; the network's counters carry no identity
and are judged by value alone) and the value has not gone down, the delta is the difference
of the raw values; otherwise the source restarted from zero, and the delta is the whole raw
value. Memory is a level, not a counter: the record carries the latest value.

The state carried from one sample to the next (`Meter`) is the last raw reading and the
last record: the store keeps it, so the rule continues across a metald restart.
"""

from __future__ import annotations

from dataclasses import dataclass

from metald.core.metering import UsageRecord


@dataclass(frozen=True)
class RawUsage:
    """One reading of a VM's sources, as the host reports them now."""

    vmm: str  # the VMM process's identity ("pid:start_time"): CPU and disk counters' source
    cpu_time_ns: int = 0  # the vCPU threads' CPU time since the VMM started
    memory_bytes: int = 0
    disk_read_bytes: int = 0
    disk_write_bytes: int = 0
    network_rx_bytes: int = 0  # since the VM's network was made
    network_tx_bytes: int = 0


@dataclass(frozen=True)
class Meter:
    """A VM's metering state: the last raw reading and the cumulative record made of it."""

    raw: RawUsage
    record: UsageRecord


def _delta(now: int, before: int, same_source: bool) -> int:
    if now < 0:
        return 0
    return now - before if same_source and now >= before else now


def advance(meter: Meter | None, raw: RawUsage, vm_id: str, customer_id: str, at_ns: int) -> Meter:
    """The VM's next state after reading `raw` at wall-clock `at_ns`. A first reading
    (`meter` None) counts everything the sources counted. Records of a VM are strictly
    ordered in time: a clock that stepped back still yields a later timestamp."""
    if meter is None:
        zero = RawUsage(vmm="")
        last = UsageRecord(vm_id=vm_id, customer_id=customer_id, timestamp_ns=0)
        before = zero
    else:
        last, before = meter.record, meter.raw
    vmm_same = meter is not None and raw.vmm == before.vmm
    net_same = meter is not None
    record = UsageRecord(  # (not dataclasses.replace: a tick makes one per VM)
        vm_id=vm_id,
        customer_id=customer_id,
        timestamp_ns=max(at_ns, last.timestamp_ns + 1),
        cpu_time_ns=last.cpu_time_ns + _delta(raw.cpu_time_ns, before.cpu_time_ns, vmm_same),
        memory_bytes=max(0, raw.memory_bytes),
        disk_read_bytes=last.disk_read_bytes
        + _delta(raw.disk_read_bytes, before.disk_read_bytes, vmm_same),
        disk_write_bytes=last.disk_write_bytes
        + _delta(raw.disk_write_bytes, before.disk_write_bytes, vmm_same),
        network_rx_bytes=last.network_rx_bytes
        + _delta(raw.network_rx_bytes, before.network_rx_bytes, net_same),
        network_tx_bytes=last.network_tx_bytes
        + _delta(raw.network_tx_bytes, before.network_tx_bytes, net_same),
    )
    return Meter(raw=raw, record=record)

"""The rebase rule (core/counters.py): counters cumulative for the life of a VM."""

from __future__ import annotations

from metald.core.counters import Meter, RawUsage, advance


def step(meter: Meter | None, at: int, **raw: int | str) -> Meter:
    vmm = str(raw.pop("vmm", "1:1"))
    return advance(meter, RawUsage(vmm=vmm, **raw), "vm1", "acme", at)  # type: ignore[arg-type]


def test_first_reading_counts_everything_the_sources_counted() -> None:
    m = step(None, 10, cpu_time_ns=500, disk_write_bytes=7, network_rx_bytes=3, memory_bytes=9)
    r = m.record
    assert (r.cpu_time_ns, r.disk_write_bytes, r.network_rx_bytes, r.memory_bytes) == (500, 7, 3, 9)
    assert (r.vm_id, r.customer_id, r.timestamp_ns) == ("vm1", "acme", 10)


def test_same_process_adds_the_difference() -> None:
    m = step(None, 10, cpu_time_ns=500, disk_read_bytes=100)
    m = step(m, 20, cpu_time_ns=800, disk_read_bytes=150)
    assert (m.record.cpu_time_ns, m.record.disk_read_bytes) == (800, 150)


def test_a_new_vmm_process_is_rebased_on_the_last_record_even_when_its_counters_are_higher() -> (
    None
):
    m = step(None, 10, cpu_time_ns=500, disk_write_bytes=40)
    # A VMM started again (shutdown + boot, or a Firecracker reboot): counts from zero, and
    # may already have counted more than the old one by its first sample.
    m = step(m, 20, vmm="2:9", cpu_time_ns=900, disk_write_bytes=10)
    assert (m.record.cpu_time_ns, m.record.disk_write_bytes) == (1400, 50)
    m = step(m, 30, vmm="2:9", cpu_time_ns=1000, disk_write_bytes=12)
    assert (m.record.cpu_time_ns, m.record.disk_write_bytes) == (1500, 52)


def test_a_counter_that_went_back_restarted_from_zero() -> None:
    m = step(None, 10, network_rx_bytes=1000, network_tx_bytes=50)
    # The VM's network was rebuilt (after a metald restart): its counters start again.
    m = step(m, 20, network_rx_bytes=30, network_tx_bytes=60)
    assert (m.record.network_rx_bytes, m.record.network_tx_bytes) == (1030, 60)


def test_counters_never_decrease_and_memory_is_a_level() -> None:
    m = step(None, 10, cpu_time_ns=100, memory_bytes=1000)
    m = step(m, 20, vmm="3:3", cpu_time_ns=0, memory_bytes=200)
    assert m.record.cpu_time_ns == 100
    assert m.record.memory_bytes == 200


def test_records_of_a_vm_are_strictly_ordered_in_time_when_the_clock_steps_back() -> None:
    m = step(None, 1000, cpu_time_ns=1)
    m = step(m, 400, cpu_time_ns=2)
    assert m.record.timestamp_ns == 1001
    assert m.raw.cpu_time_ns == 2


def test_a_paused_vm_accrues_nothing() -> None:
    m = step(None, 10, cpu_time_ns=700)
    m = step(m, 20, cpu_time_ns=700)
    assert m.record.cpu_time_ns == 700

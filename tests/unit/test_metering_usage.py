"""Billing the samples (core/metering.py): positive deltas, memory GiB-hours, stops."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from metald.core.metering import GIB_HOUR_BYTE_NS, UsageRecord, VmUsage, usage_by_vm, vm_usage

GIB = 2**30
HOUR = 3600 * 10**9
S = 10**9


def sample(t: int, cpu: int = 0, mem: int = 0, **rest: int) -> UsageRecord:
    return UsageRecord("vm-1", "acme", t, cpu_time_ns=cpu, memory_bytes=mem, **rest)


def test_counters_bill_the_growth_after_the_first_sample() -> None:
    u = vm_usage(
        "vm-1",
        "acme",
        [
            sample(0, cpu=5 * S, disk_read_bytes=100, network_tx_bytes=7),
            sample(1 * S, cpu=6 * S, disk_read_bytes=150, network_tx_bytes=7),
            sample(2 * S, cpu=9 * S, disk_read_bytes=400, network_tx_bytes=10),
        ],
    )
    assert (u.cpu_time_ns, u.disk_read_bytes, u.network_tx_bytes) == (4 * S, 300, 3)
    assert u.cpu_seconds == 4.0
    assert (u.samples, u.first_ns, u.last_ns) == (3, 0, 2 * S)


def test_a_counter_that_goes_back_bills_nothing_for_that_step_then_bills_again() -> None:
    u = vm_usage(
        "vm-1", "acme", [sample(0, cpu=100), sample(1, cpu=300), sample(2, cpu=50),
                         sample(3, cpu=80)],
    )  # fmt: skip
    assert u.cpu_time_ns == 200 + 0 + 30


def test_order_of_arrival_does_not_matter() -> None:
    ordered = [sample(t * S, cpu=t * t, mem=GIB) for t in range(10)]
    shuffled = ordered[:]
    random.Random(7).shuffle(shuffled)
    assert vm_usage("vm-1", "acme", shuffled) == vm_usage("vm-1", "acme", ordered)


def test_a_duplicate_instant_counts_once_first_copy_wins() -> None:
    u = vm_usage("vm-1", "acme", [sample(0), sample(S, cpu=10), sample(S, cpu=99)])
    assert (u.samples, u.cpu_time_ns) == (2, 10)


def test_one_gib_for_one_hour_is_one_gib_hour() -> None:
    u = vm_usage("vm-1", "acme", [sample(0, mem=GIB), sample(HOUR // 2, mem=GIB),
                                  sample(HOUR, mem=GIB)])  # fmt: skip
    assert u.memory_byte_ns == GIB_HOUR_BYTE_NS
    assert u.memory_gib_hours == 1.0
    assert u.memory_max_bytes == GIB


def test_memory_between_samples_is_the_trapezoid() -> None:
    u = vm_usage("vm-1", "acme", [sample(0, mem=0), sample(HOUR, mem=2 * GIB)])
    assert u.memory_gib_hours == 1.0
    assert u.memory_max_bytes == 2 * GIB


def test_no_memory_is_billed_across_a_stop() -> None:
    samples = [sample(0, mem=GIB), sample(HOUR, mem=GIB), sample(3 * HOUR, mem=GIB),
               sample(4 * HOUR, mem=GIB)]  # fmt: skip
    # Stopped a little after the second sample, booted again before the third.
    u = vm_usage("vm-1", "acme", samples, stops_ns=[HOUR + 5])
    assert u.memory_gib_hours == 2.0
    # The final sample taken at the stop's instant: the span before it ran, the next did not.
    assert vm_usage("vm-1", "acme", samples, stops_ns=[HOUR]).memory_gib_hours == 2.0
    # A stop at the first sample's instant stops the span that starts there.
    assert vm_usage("vm-1", "acme", samples, stops_ns=[0]).memory_gib_hours == 3.0
    # A stop before every sample or after every sample changes nothing.
    assert vm_usage("vm-1", "acme", samples, stops_ns=[-1, 5 * HOUR]).memory_gib_hours == 4.0


def test_no_samples_and_one_sample_bill_nothing() -> None:
    assert vm_usage("vm-1", "acme", []) == VmUsage("vm-1", "acme")
    u = vm_usage("vm-1", "acme", [sample(5, cpu=10**12, mem=GIB)])
    assert (u.samples, u.cpu_time_ns, u.memory_byte_ns, u.memory_max_bytes) == (1, 0, 0, GIB)


def test_usage_by_vm_groups_by_customer_and_vm() -> None:
    samples = [
        UsageRecord("vm-b", "globex", 0, cpu_time_ns=1),
        UsageRecord("vm-a", "acme", 0, cpu_time_ns=1),
        UsageRecord("vm-b", "globex", 1, cpu_time_ns=11),
        UsageRecord("vm-a", "acme", 1, cpu_time_ns=3),
        UsageRecord("vm-c", "acme", 0, memory_bytes=GIB),
        UsageRecord("vm-c", "acme", HOUR, memory_bytes=GIB),
    ]
    got = usage_by_vm(samples, {"vm-c": [HOUR // 2]})
    assert [(u.customer_id, u.vm_id, u.cpu_time_ns, u.memory_byte_ns) for u in got] == [
        ("acme", "vm-a", 2, 0),
        ("acme", "vm-c", 0, 0),
        ("globex", "vm-b", 10, 0),
    ]


# Properties over arbitrary sample sequences of one VM.
COUNTER = st.integers(min_value=0, max_value=2**40)
SAMPLES = st.lists(
    st.tuples(st.integers(min_value=0, max_value=10**15), COUNTER, COUNTER),
    min_size=0,
    max_size=30,
    unique_by=lambda s: s[0],
).map(lambda xs: [sample(t, cpu=c, mem=m) for t, c, m in xs])


@given(SAMPLES)
def test_usage_is_never_negative_and_memory_is_bounded_by_its_maximum(
    samples: list[UsageRecord],
) -> None:
    u = vm_usage("vm-1", "acme", samples)
    assert u.cpu_time_ns >= 0 and u.memory_byte_ns >= 0
    assert u.memory_byte_ns <= u.memory_max_bytes * (u.last_ns - u.first_ns)


@given(SAMPLES)
def test_growing_counters_bill_last_minus_first(samples: list[UsageRecord]) -> None:
    by_time = sorted(samples, key=lambda s: s.timestamp_ns)
    monotone = [
        sample(s.timestamp_ns, cpu=c)
        for s, c in zip(by_time, sorted(s.cpu_time_ns for s in by_time), strict=True)
    ]
    u = vm_usage("vm-1", "acme", monotone)
    expected = monotone[-1].cpu_time_ns - monotone[0].cpu_time_ns if monotone else 0
    assert u.cpu_time_ns == expected


@given(SAMPLES, st.integers(min_value=0, max_value=30))
def test_billing_two_halves_that_share_a_sample_bills_the_whole(
    samples: list[UsageRecord], cut: int
) -> None:
    """Delivered in two parts (a batch, an outage, the next batch), a VM costs the same."""
    ordered = sorted(samples, key=lambda s: s.timestamp_ns)
    cut = min(cut, max(0, len(ordered) - 1))
    whole = vm_usage("vm-1", "acme", ordered)
    first = vm_usage("vm-1", "acme", ordered[: cut + 1])
    second = vm_usage("vm-1", "acme", ordered[cut:])
    assert first.cpu_time_ns + second.cpu_time_ns == whole.cpu_time_ns
    assert first.memory_byte_ns + second.memory_byte_ns == whole.memory_byte_ns


@given(SAMPLES, st.randoms())
def test_resending_any_samples_changes_nothing(
    samples: list[UsageRecord], rnd: random.Random
) -> None:
    """At-least-once delivery: duplicates (same VM, same instant) are harmless."""
    again = samples + [s for s in samples if rnd.random() < 0.5]
    rnd.shuffle(again)
    assert vm_usage("vm-1", "acme", again) == vm_usage("vm-1", "acme", samples)

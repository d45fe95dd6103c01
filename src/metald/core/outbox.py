"""The usage outbox: what metering stores before billing is told, in the order it is told.

Every usage record and every notice (the VM started, stopped, or may have a gap in its
records) is an entry of one log, numbered in the order it was stored (`seq`). Billing must
see a VM's records in order (it bills the deltas between successive samples), and a
notice between records belongs there: a stop after the final record, a gap before the
records that follow it. So entries are delivered per VM in `seq` order, samples grouped in
batches and each notice on its own, and an entry counts as delivered only once the call
carrying it returned; an entry may be sent twice (at-least-once), never skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from metald.core.metering import UsageRecord


class EntryKind(StrEnum):
    SAMPLE = "sample"
    STARTED = "started"
    STOPPED = "stopped"
    GAP = "gap"  # records may be missing between gap_from_ns and at_ns


@dataclass(frozen=True)
class Notice:
    """A notice to store: the VM started or stopped at `at_ns`, or its records may have a
    gap from `gap_from_ns` to `at_ns` (a metald restart)."""

    kind: EntryKind
    vm_id: str
    customer_id: str
    at_ns: int
    gap_from_ns: int = 0


@dataclass(frozen=True)
class Entry:
    """One stored entry not delivered yet: a sample (`record`) or a notice."""

    seq: int
    kind: EntryKind
    vm_id: str
    customer_id: str
    at_ns: int
    record: UsageRecord | None = None  # samples only
    gap_from_ns: int = 0  # gap notices only


def send_units(entries: Sequence[Entry], max_batch: int) -> list[list[Entry]]:
    """A VM's pending entries (in seq order) as the calls that carry them, in order: runs
    of samples cut into batches of at most `max_batch`, each notice alone."""
    if max_batch < 1:
        raise ValueError("max_batch must be at least 1")
    units: list[list[Entry]] = []
    for entry in entries:
        last = units[-1] if units else None
        if (
            entry.kind is EntryKind.SAMPLE
            and last is not None
            and last[0].kind is EntryKind.SAMPLE
            and len(last) < max_batch
        ):
            last.append(entry)
        else:
            units.append([entry])
    return units

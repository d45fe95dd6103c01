"""The audit log's hash chain: what a row's hash covers, and the walk that checks a chain.

Each row's hash is SHA-256 over a canonical encoding of the row: its seq, the hash of the
row before it (`prev_hash`; GENESIS for the first) and every field of its AuditEvent.
Changing any field of a row changes its hash; deleting or inserting a row breaks the next
row's `prev_hash` and the seq numbering (seqs are consecutive: 1, 2, 3, ...). The encoding
is JSON with sorted keys, no whitespace and ASCII escapes, so any language can recompute it.

What a hash chain does not do: someone who can write the database can rewrite every row
after the one they changed, hashes included (there is no key). The chain makes an edit
detectable to whoever kept a later hash elsewhere (the head row, the security log lines
shipped off the host); store/audit_log.py says what metald keeps.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from metald.core.audit import AuditEvent

GENESIS = "0" * 64
FIELDS = tuple(AuditEvent.__dataclass_fields__)


@dataclass(frozen=True)
class ChainedRow:
    seq: int
    event: AuditEvent
    prev_hash: str
    hash: str


def canonical(seq: int, prev_hash: str, event: AuditEvent) -> bytes:
    body = {"seq": seq, "prev_hash": prev_hash, **asdict(event)}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def row_hash(seq: int, prev_hash: str, event: AuditEvent) -> str:
    return hashlib.sha256(canonical(seq, prev_hash, event)).hexdigest()


def chain(head_seq: int, head_hash: str, events: Iterable[AuditEvent]) -> list[ChainedRow]:
    """The rows that append `events` after the row (head_seq, head_hash)."""
    rows = []
    seq, prev = head_seq, head_hash
    for event in events:
        seq += 1
        digest = row_hash(seq, prev, event)
        rows.append(ChainedRow(seq, event, prev, digest))
        prev = digest
    return rows


@dataclass(frozen=True)
class Verdict:
    ok: bool
    rows: int  # rows walked
    bad_seq: int | None = None  # the first row that does not hold (None: all do)
    problem: str = ""


class Walk:
    """The chain check one row at a time (so a log of any length is checked in pages):
    `step` each row in seq order until it returns a bad Verdict, then `end`."""

    def __init__(self) -> None:
        self.expected_seq, self.prev, self.count = 1, GENESIS, 0

    def step(self, row: ChainedRow) -> Verdict | None:
        """None while the chain holds; else the Verdict naming the first bad seq."""
        self.count += 1
        expected = self.expected_seq
        if row.seq != expected:
            if row.seq > expected:
                return Verdict(
                    False,
                    self.count,
                    expected,
                    f"seq {expected} expected, found {row.seq} (rows missing)",
                )
            return Verdict(
                False,
                self.count,
                row.seq,
                f"seq {expected} expected, found {row.seq} (out of order)",
            )
        if row.prev_hash != self.prev:
            return Verdict(
                False,
                self.count,
                row.seq,
                "prev_hash is not the previous row's hash (a row deleted, "
                "inserted or edited before it)",
            )
        if row_hash(row.seq, row.prev_hash, row.event) != row.hash:
            return Verdict(False, self.count, row.seq, "hash does not match the row (edited)")
        self.prev = row.hash
        self.expected_seq += 1
        return None

    def end(self, head: tuple[int, str] | None = None) -> Verdict:
        """After the last row: `head` is the (seq, hash) the writer recorded as the chain's
        last; rows missing after the last row are a truncated tail (named by the first
        missing seq), rows after the head were added behind the writer's back."""
        last = self.expected_seq - 1
        if head is not None:
            head_seq, head_hash = head
            if head_seq > last:
                return Verdict(
                    False,
                    self.count,
                    last + 1,
                    f"the chain head says seq {head_seq}, the log ends at {last} (tail truncated)",
                )
            if head_seq < last:
                return Verdict(
                    False,
                    self.count,
                    head_seq + 1,
                    f"rows after the chain head (seq {head_seq}) were added",
                )
            if head_seq and head_hash != self.prev:
                return Verdict(
                    False, self.count, head_seq, "the chain head's hash is not the last row's"
                )
        return Verdict(True, self.count)


def verify(rows: Iterable[ChainedRow], head: tuple[int, str] | None = None) -> Verdict:
    """Walk `rows` in seq order. The first bad seq: a row whose hash is not its contents'
    (edited), whose prev_hash is not the previous row's hash, or whose seq is not the
    previous one plus one (a row deleted or inserted before it); then the head (Walk.end)."""
    walk = Walk()
    for row in rows:
        bad = walk.step(row)
        if bad is not None:
            return bad
    return walk.end(head)

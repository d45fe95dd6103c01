"""The Audit port in memory: the events, in order (and a switch to make recording fail)."""

from __future__ import annotations

from metald.core.audit import AuditEvent


class MemoryAudit:
    def __init__(self) -> None:
        self.events: list[AuditEvent] = []
        self.fail = False

    async def record(self, event: AuditEvent) -> None:
        if self.fail:
            raise OSError("audit store unavailable")
        self.events.append(event)

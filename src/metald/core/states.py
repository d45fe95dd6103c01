"""The VM state machine: one table that the service consults for every operation."""

from __future__ import annotations

from enum import StrEnum

from metald.core.errors import FailedPrecondition


class VmState(StrEnum):
    CREATED = "CREATED"
    RUNNING = "RUNNING"
    PAUSED = "PAUSED"
    SHUTDOWN = "SHUTDOWN"


class Operation(StrEnum):
    BOOT = "boot"
    PAUSE = "pause"
    RESUME = "resume"
    REBOOT = "reboot"
    SHUTDOWN = "shutdown"
    DELETE = "delete"


S = VmState
# operation -> {state it may start from: state it ends in}
TRANSITIONS: dict[Operation, dict[VmState, VmState]] = {
    Operation.BOOT: {S.CREATED: S.RUNNING, S.SHUTDOWN: S.RUNNING},
    Operation.PAUSE: {S.RUNNING: S.PAUSED},
    Operation.RESUME: {S.PAUSED: S.RUNNING},
    Operation.REBOOT: {S.RUNNING: S.RUNNING},
    Operation.SHUTDOWN: {S.RUNNING: S.SHUTDOWN, S.PAUSED: S.SHUTDOWN},
    # Delete is allowed from every state; running ones need force (checked separately).
    Operation.DELETE: {s: s for s in VmState},
}

# States in which a VMM process is (or should be) alive.
LIVE_STATES = frozenset({S.CREATED, S.RUNNING, S.PAUSED})
# States whose delete needs force, because a guest is executing or could resume.
DELETE_NEEDS_FORCE = frozenset({S.RUNNING, S.PAUSED})


def next_state(op: Operation, current: VmState) -> VmState:
    """The state `op` leads to from `current`, or FailedPrecondition naming the current state."""
    allowed = TRANSITIONS[op]
    if current not in allowed:
        starts = ", ".join(sorted(allowed))
        raise FailedPrecondition(
            f"cannot {op.value} a VM in state {current.value} (allowed from: {starts})"
        )
    return allowed[current]

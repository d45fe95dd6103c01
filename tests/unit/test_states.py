import pytest

from metald.core.errors import FailedPrecondition
from metald.core.states import DELETE_NEEDS_FORCE, TRANSITIONS, Operation, VmState, next_state

S = VmState


@pytest.mark.parametrize(
    ("op", "start", "end"),
    [
        (Operation.BOOT, S.CREATED, S.RUNNING),
        (Operation.BOOT, S.SHUTDOWN, S.RUNNING),
        (Operation.PAUSE, S.RUNNING, S.PAUSED),
        (Operation.RESUME, S.PAUSED, S.RUNNING),
        (Operation.REBOOT, S.RUNNING, S.RUNNING),
        (Operation.SHUTDOWN, S.RUNNING, S.SHUTDOWN),
        (Operation.SHUTDOWN, S.PAUSED, S.SHUTDOWN),
    ],
)
def test_allowed_transitions(op: Operation, start: VmState, end: VmState) -> None:
    assert next_state(op, start) is end


@pytest.mark.parametrize(
    ("op", "start"),
    [
        (Operation.PAUSE, S.CREATED),
        (Operation.PAUSE, S.PAUSED),
        (Operation.RESUME, S.RUNNING),
        (Operation.BOOT, S.RUNNING),
        (Operation.BOOT, S.PAUSED),
        (Operation.REBOOT, S.PAUSED),
        (Operation.REBOOT, S.CREATED),
        (Operation.SHUTDOWN, S.CREATED),
        (Operation.SHUTDOWN, S.SHUTDOWN),
    ],
)
def test_refused_transitions_name_the_current_state(op: Operation, start: VmState) -> None:
    with pytest.raises(FailedPrecondition, match=start.value):
        next_state(op, start)


def test_delete_is_allowed_from_every_state_and_needs_force_only_while_live() -> None:
    assert set(TRANSITIONS[Operation.DELETE]) == set(VmState)
    assert {S.RUNNING, S.PAUSED} == DELETE_NEEDS_FORCE

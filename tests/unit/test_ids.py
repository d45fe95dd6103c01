"""The one VM-id rule (metald.core.ids): what it accepts, that generated ids follow it, and
that every layer below the API accepts every id the API accepts (an id taken at CreateVm
must never be refused later by the VMM backend or the jailer)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from metald.backends.vmm.layout import check_vm_id as layout_check_vm_id
from metald.core.errors import InvalidArgument
from metald.core.ids import MAX_VM_ID_LENGTH, VM_ID, VM_ID_RULE, is_vm_id, new_vm_id
from metald.core.validation import check_vm_id
from metald.jailer import JailSpec


@pytest.mark.parametrize("good", ["a", "-", "vm-1", "0" * MAX_VM_ID_LENGTH, "abc-def-123"])
def test_good_ids(good: str) -> None:
    assert is_vm_id(good)


@pytest.mark.parametrize(
    "bad", ["", "A", "vm_1", "vm.1", ".", "..", "a/b", "a,b", "a b", "a\nb", "é", "x" * 65]
)
def test_bad_ids(bad: str) -> None:
    assert not is_vm_id(bad)
    with pytest.raises(InvalidArgument) as caught:
        check_vm_id(bad)
    assert caught.value.message == f"vm_id: must be {VM_ID_RULE}"


def test_generated_ids_follow_the_rule() -> None:
    ids = {new_vm_id() for _ in range(100)}
    assert len(ids) == 100 and all(is_vm_id(i) for i in ids)


@given(st.from_regex(VM_ID, fullmatch=True))
def test_every_layer_accepts_every_api_id(vm_id: str) -> None:
    check_vm_id(vm_id)
    layout_check_vm_id(vm_id)
    JailSpec(vm_id=vm_id, uid=5, gid=6, argv=("/vmm",)).validate()

import pytest
from hypothesis import given
from hypothesis import strategies as st

from metald.core import paging
from metald.core.errors import InvalidArgument


def test_page_size_defaults_and_caps() -> None:
    assert paging.page_size(0) == 50
    assert paging.page_size(7) == 7
    assert paging.page_size(5000) == 1000
    with pytest.raises(InvalidArgument, match="page_size"):
        paging.page_size(-1)


@given(st.floats(min_value=0, max_value=4e9, allow_nan=False), st.text(max_size=64))
def test_tokens_round_trip(created_at: float, vm_id: str) -> None:
    assert paging.decode_token(paging.encode_token(created_at, vm_id)) == (created_at, vm_id)


@pytest.mark.parametrize("token", ["garbage!", "e30", "W10", "WzEsMl0", "bnVsbA"])
def test_foreign_tokens_are_invalid_argument(token: str) -> None:
    with pytest.raises(InvalidArgument, match="page_token"):
        paging.decode_token(token)


def test_empty_token_is_the_first_page() -> None:
    assert paging.decode_token("") is None

import pytest
from hypothesis import given
from hypothesis import strategies as st

from metald.core import paging
from metald.core.errors import InvalidArgument
from metald.core.ids import VM_ID


def test_page_size_defaults_and_caps() -> None:
    assert paging.page_size(0) == 50
    assert paging.page_size(7) == 7
    assert paging.page_size(5000) == 1000
    with pytest.raises(InvalidArgument, match="page_size"):
        paging.page_size(-1)


@given(st.floats(min_value=0, max_value=4e9, allow_nan=False), st.from_regex(VM_ID, fullmatch=True))
def test_tokens_round_trip(created_at: float, vm_id: str) -> None:
    assert paging.decode_token(paging.encode_token(created_at, vm_id)) == (created_at, vm_id)


def _token(raw: bytes) -> str:
    return paging.encode_raw(raw)


@pytest.mark.parametrize(
    "token",
    [
        "garbage!",
        "e30",
        "W10",
        "WzEsMl0",
        "bnVsbA",
        _token(b'[NaN,"vm-1"]'),
        _token(b'[Infinity,"vm-1"]'),
        _token(b'[-1,"vm-1"]'),
        _token(b'[true,"vm-1"]'),
        _token(b'[1,"../etc"]'),
        _token(b'[1,"VM-1"]'),
        _token(b'[1,"vm-1",3]'),
        _token(b'{"a":1,"b":"vm-1"}'),
        _token(b"[" * 5000),
        _token(b"\xff\xfe"),
        paging.encode_token(1.0, "vm-1") + "!!",  # junk the lenient decoder would skip
        paging.encode_token(1.0, "vm-1") + "=",
        "é" + paging.encode_token(1.0, "vm-1"),
        "A" * 10_000,
    ],
)
def test_malformed_tokens_are_invalid_argument(token: str) -> None:
    with pytest.raises(InvalidArgument, match="page_token"):
        paging.decode_token(token)


@given(st.text(max_size=300))
def test_any_text_is_a_cursor_or_invalid_argument(token: str) -> None:
    try:
        cursor = paging.decode_token(token)
    except InvalidArgument:
        return
    assert cursor is None or paging.decode_token(paging.encode_token(*cursor)) == cursor


def test_empty_token_is_the_first_page() -> None:
    assert paging.decode_token("") is None

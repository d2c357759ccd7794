"""Structure of untrusted JSON without decoding it: depth, and the elements of an array."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from operators.jsonscan import array_elements, nesting_depth

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='ab"\\[]{},'),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(alphabet="ab[{"), kids, max_size=4),
    max_leaves=20,
)


def depth(v: object) -> int:
    if isinstance(v, list):
        return 1 + max(map(depth, v), default=0)
    if isinstance(v, dict):
        return 1 + max(map(depth, v.values()), default=0)
    return 0


@given(JSON)
def test_depth_matches_the_decoded_value_whatever_the_strings_hold(v):
    assert nesting_depth(json.dumps(v).encode()) == depth(v)


@given(st.lists(JSON, min_size=1, max_size=6))
def test_elements_of_a_valid_array_are_its_items(items):
    raw = json.dumps(items).encode()
    assert [json.loads(e) for e in array_elements(raw)] == items


def test_broken_strings_inside_elements_do_not_sink_the_array():
    raw = b'[{"a":"ok"}, {"a":"s\xff"}, {"a":"\\ud800"}, 3]'
    assert array_elements(raw) == [b'{"a":"ok"}', b'{"a":"s\xff"}', b'{"a":"\\ud800"}', b"3"]


@pytest.mark.parametrize("raw", [b"[1,", b"[1,]", b"[,1]", b"[1] 2", b'["open]', b"[1]]", b"{}", b"[[1]"])
def test_unreadable_arrays_are_none(raw):
    assert array_elements(raw) is None


def test_deep_input_is_scanned_without_recursion():
    assert nesting_depth(b"[" * 100_000 + b"]" * 100_000) == 100_000

"""The canonical codec on its own: one byte form per value, strict decoding."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import canonical, errors
from protocol.errors import AemError
from tests import wirekit

canonical_values = st.recursive(
    st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.binary(max_size=40)
    | st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=6), inner, max_size=4),
    max_leaves=16,
)


def _code(fn, *a):
    with pytest.raises(AemError) as exc:
        fn(*a)
    return exc.value.code


@settings(max_examples=200, deadline=None)
@given(v=canonical_values)
def test_encode_decode_encode(v):
    b = canonical.encode(v)
    assert canonical.encode(canonical.decode(b, len(b))) == b


@settings(max_examples=300, deadline=None)
@given(junk=st.binary(max_size=200))
def test_random_bytes(junk):
    try:
        v = canonical.decode(junk, 1000)
    except AemError:
        return
    assert canonical.encode(v) == junk


@settings(max_examples=300, deadline=None)
@given(v=wirekit.msgpack_values)
def test_random_msgpack_values(v):
    data = msgpack.packb(v, use_bin_type=True)
    try:
        back = canonical.decode(data, 1 << 16)
    except AemError:
        return
    assert canonical.encode(back) == data


def test_specific_refusals():
    assert _code(canonical.decode, msgpack.packb(1.5), 100) == errors.FLOAT_FORBIDDEN
    assert _code(canonical.decode, msgpack.packb(None), 100) == errors.BAD_TYPE
    assert _code(canonical.decode, msgpack.packb(1) + b"\x01", 100) == errors.TRAILING_BYTES
    assert _code(canonical.decode, b"\xcd\x00\x05", 100) == errors.NOT_CANONICAL   # uint16 for 5
    unsorted = b"\x82\xa1b\x01\xa1a\x02"
    assert _code(canonical.decode, unsorted, 100) == errors.NOT_CANONICAL
    dup = b"\x82\xa1a\x01\xa1a\x02"
    assert _code(canonical.decode, dup, 100) == errors.NOT_CANONICAL
    assert _code(canonical.decode, b"\xa2\xff\xfe", 100) == errors.BAD_ENCODING    # bad UTF-8
    assert _code(canonical.decode, msgpack.packb({1: 2}), 100) in (errors.BAD_ENCODING, errors.BAD_TYPE)
    assert _code(canonical.decode, b"\x91" * 40 + b"\x01", 100) == errors.TOO_DEEP
    assert _code(canonical.decode, b"\x00" * 101, 100) == errors.TOO_LARGE
    assert _code(canonical.decode, b"", 100) == errors.BAD_ENCODING
    # A huge declared length never allocates or hangs.
    assert _code(canonical.decode, b"\xdb\xff\xff\xff\xff", 100) == errors.BAD_ENCODING
    assert _code(canonical.decode, b"\xdd\xff\xff\xff\xff", 100) == errors.BAD_ENCODING


def test_map_keys_sort_by_utf8_bytes():
    # "é" (0xc3 0xa9) sorts after "z" bytewise.
    b = canonical.encode({"é": 1, "z": 2, "a": 3})
    assert b == b"\x83\xa1a\x03\xa1z\x02\xa2\xc3\xa9\x01"

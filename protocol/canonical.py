"""Canonical msgpack: the only byte form of an aem value.

A value is canonical when it is built from these types only: int (signed 64-bit
range), bytes, str (UTF-8), bool, list, and dict with str keys. No float, no
nil, no ext types. Maps are written with keys sorted by their UTF-8 bytes, and
every int and length in its shortest msgpack form (msgpack-python already
does that). So there is exactly one byte string per value, and signatures and
ids computed over it agree across implementations.

Decoding is strict: the size limit is checked before msgpack sees a byte, and
the decoded value is encoded again and compared with the input. Any difference
(key order, duplicate keys, a wider integer than needed, str8 where fixstr
fits, ...) is refused as NOT_CANONICAL. That one comparison replaces a long list
of special cases and cannot drift from the encoder.
"""

from __future__ import annotations

from typing import Any

import msgpack

from protocol import errors
from protocol.errors import AemError

MAX_DEPTH = 16
INT_MIN = -(2**63)
INT_MAX = 2**64 - 1


def _scan(value: Any, depth: int) -> bool:
    """Refuse what has no canonical form (raising AemError on the first
    offending item, depth first, in the value's own order) and report whether
    every map's keys are already in canonical order.

    Key order is compared on the str values: for Unicode scalar values, code
    point order is UTF-8 byte order. (A str holding a lone surrogate has no
    UTF-8 form, and msgpack refuses it when packing, whatever its position.)
    """
    if depth > MAX_DEPTH:
        raise AemError(errors.TOO_DEEP, f"nesting deeper than {MAX_DEPTH}")
    t = type(value)
    if t is bytes or t is str or t is bool:
        return True
    if t is int:
        if not INT_MIN <= value <= INT_MAX:
            raise AemError(errors.BAD_VALUE, "integer outside the 64-bit range")
        return True
    in_order = True
    if t is dict:
        prev = None
        for key, item in value.items():
            if type(key) is not str:
                raise AemError(errors.BAD_TYPE, "map keys must be strings")
            if prev is not None and key <= prev:
                in_order = False
            prev = key
            ti = type(item)
            if depth < MAX_DEPTH:
                # Leaves within the depth limit, checked here rather than by a call.
                if ti is bytes or ti is str or ti is bool:
                    continue
                if ti is int:
                    if not INT_MIN <= item <= INT_MAX:
                        raise AemError(errors.BAD_VALUE, "integer outside the 64-bit range")
                    continue
            if not _scan(item, depth + 1):
                in_order = False
        return in_order
    if t is list:
        for item in value:
            if not _scan(item, depth + 1):
                in_order = False
        return in_order
    if t is float:
        raise AemError(errors.FLOAT_FORBIDDEN, "floats are not allowed")
    raise AemError(errors.BAD_TYPE, f"type {t.__name__} has no canonical form")


def _sorted(value: Any) -> Any:
    t = type(value)
    if t is dict:
        # Sort by the UTF-8 bytes of the key, which is what a second
        # implementation in any language can reproduce exactly.
        return {k: _sorted(value[k]) for k in sorted(value, key=lambda k: k.encode())}
    if t is list:
        return [_sorted(v) for v in value]
    return value


def encode(value: Any) -> bytes:
    """Return the canonical bytes of ``value`` or raise AemError."""
    if _scan(value, 0):
        return msgpack.packb(value, use_bin_type=True)
    return msgpack.packb(_sorted(value), use_bin_type=True)


def encode_decoded(value: Any) -> bytes:
    """The canonical bytes of a value that :func:`decode` returned, or of a
    copy of one of its maps with keys removed: such a value is already
    checked and in canonical order, so this only packs it (the same bytes as
    :func:`encode`, without walking the value again)."""
    return msgpack.packb(value, use_bin_type=True)


def decode(data: bytes, max_size: int) -> Any:
    """Decode canonical bytes of at most ``max_size`` bytes, or raise AemError.

    Only AemError ever leaves this function, whatever ``data`` holds.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise AemError(errors.BAD_TYPE, "input is not bytes")
    data = bytes(data)
    if len(data) > max_size:
        raise AemError(errors.TOO_LARGE, f"{len(data)} bytes > limit {max_size}")
    if not data:
        raise AemError(errors.BAD_ENCODING, "empty input")
    try:
        value = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            unicode_errors="strict",
        )
    except msgpack.ExtraData:
        raise AemError(errors.TRAILING_BYTES, "bytes after the value") from None
    except Exception as exc:  # msgpack raises several unrelated types
        raise AemError(errors.BAD_ENCODING, f"not msgpack: {type(exc).__name__}") from None
    # Equivalent to comparing encode(value) with the input, without building
    # a sorted copy: a map out of order can only re-encode differently.
    try:
        in_order = _scan(value, 0)
    except RecursionError:
        raise AemError(errors.TOO_DEEP, "nesting too deep") from None
    if not in_order or msgpack.packb(value, use_bin_type=True) != data:
        raise AemError(errors.NOT_CANONICAL, "re-encoding gives different bytes")
    return value

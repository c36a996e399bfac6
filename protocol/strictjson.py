"""The one strict JSON reader for the documents aem loads from files a
stranger wrote (eval sets, patch fixture sets, runner specs): a size limit
before decoding, UTF-8 only, no duplicate keys, no floats, no NaN or
Infinity, bounded nesting, and only ``AemError`` out."""

from __future__ import annotations

import json
from typing import Any

from protocol.errors import (BAD_ENCODING, BAD_TYPE, BAD_VALUE, MISSING_FIELD, TOO_DEEP, TOO_LARGE,
                             UNKNOWN_FIELD, AemError)


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise AemError(BAD_ENCODING, f"duplicate key {k[:32]!r}")
        out[k] = v
    return out


def loads(data: bytes, *, max_bytes: int, what: str, integers: bool = True) -> Any:
    """The JSON value in ``data``, or a typed AemError naming ``what``.
    ``integers=False``: the document holds no numbers at all."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise AemError(BAD_TYPE, f"{what} is bytes")
    if len(data) > max_bytes:
        raise AemError(TOO_LARGE, f"{what} of {len(data)} bytes > {max_bytes}")
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        raise AemError(BAD_ENCODING, f"{what} is not UTF-8") from None

    def no_float(s: str) -> None:
        raise AemError(BAD_TYPE, f"{what}: numbers must be integers")

    def no_number(s: str) -> None:
        raise AemError(BAD_TYPE, f"{what} holds no numbers")

    def no_constant(s: str) -> None:
        raise AemError(BAD_ENCODING, f"{what}: {s} is not JSON")
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates,
                          parse_float=no_float if integers else no_number,
                          parse_int=None if integers else no_number, parse_constant=no_constant)
    except RecursionError:
        raise AemError(TOO_DEEP, f"{what}: JSON nested too deep") from None
    except ValueError as e:      # JSONDecodeError, and ints beyond Python's digit limit
        raise AemError(BAD_ENCODING, f"{what} is not JSON: {str(e)[:80]}") from None


def fields(obj: object, want: frozenset, where: str) -> dict:
    """``obj`` as a JSON object with exactly the keys ``want``."""
    if type(obj) is not dict:
        raise AemError(BAD_TYPE, f"{where} must be an object")
    extra = set(obj) - want
    if extra:
        raise AemError(UNKNOWN_FIELD, f"{where}: unknown field {sorted(extra)[0][:32]!r}")
    missing = want - set(obj)
    if missing:
        raise AemError(MISSING_FIELD, f"{where}: missing field {sorted(missing)[0]!r}")
    return obj


def text(v: object, where: str, max_bytes: int, *, empty: bool = False, blank: bool = True,
         controls: str = "\t\n") -> str:
    """A JSON string of at most ``max_bytes`` UTF-8 bytes with no control
    characters but ``controls``; ``empty``: "" is allowed; ``blank``: only
    whitespace is allowed (when not empty)."""
    if type(v) is not str:
        raise AemError(BAD_TYPE, f"{where} must be a string")
    try:
        n = len(v.encode("utf-8"))
    except UnicodeEncodeError:
        raise AemError(BAD_VALUE, f"{where} is not valid Unicode (lone surrogate)") from None
    if n > max_bytes:
        raise AemError(TOO_LARGE, f"{where} is longer than {max_bytes} bytes")
    if (not empty and n == 0) or (n and not blank and not v.strip()):
        raise AemError(BAD_VALUE, f"{where} is empty")
    if any((ord(c) < 0x20 and c not in controls) or ord(c) == 0x7F for c in v):
        raise AemError(BAD_VALUE, f"{where} holds a control character")
    return v

"""The one length-prefixed frame: a 4-byte big-endian length, then that many bytes.

    +----------------+-------------------+
    | n (u32, BE)    | n payload bytes   |
    +----------------+-------------------+

The same byte format carries the sessions on libp2p streams
(:mod:`aemd.framing`, which adds the async reading, deadlines and byte
budgets), the control socket between ``aemctl`` and ``aemd``
(:mod:`aemd.control`), and the records of an exported log file
(:mod:`ledger.logfile`, where a zero length ends the records). This module is
the codec only: bytes in, bytes or a length out, no I/O. Each reader checks
the announced length against its own limit *before* reading the body, so a
hostile prefix such as ``2**31`` is refused without allocating anything.
"""

from __future__ import annotations

import struct

from protocol.errors import BAD_ENCODING, BAD_VALUE, TOO_LARGE, AemError

__all__ = ["HEADER_LEN", "MAX_FRAME_LEN", "decode_header", "encode_frame", "encode_header"]

#: Size of the length prefix in bytes.
HEADER_LEN = 4

#: Absolute ceiling for any frame (what a u32 prefix can express, and more than
#: any aem object may be). Readers pass their own, much smaller, limit.
MAX_FRAME_LEN = 2**32 - 1

_HEADER = struct.Struct(">I")


def check_limit(max_len: int) -> None:
    """BAD_VALUE unless ``max_len`` is a limit a u32 prefix can express."""
    if not isinstance(max_len, int) or max_len < 0 or max_len > MAX_FRAME_LEN:
        raise AemError(BAD_VALUE, f"max_len must be 0..{MAX_FRAME_LEN}, got {max_len!r}")


def encode_header(length: int) -> bytes:
    """The 4-byte prefix announcing a ``length``-byte payload."""
    if not 0 <= length <= MAX_FRAME_LEN:
        raise AemError(TOO_LARGE, f"frame of {length} bytes cannot be framed")
    return _HEADER.pack(length)


def encode_frame(data: bytes, max_len: int = MAX_FRAME_LEN, what: str = "frame") -> bytes:
    """``data`` with its prefix; longer than ``max_len``: AemError(TOO_LARGE)."""
    check_limit(max_len)
    if len(data) > max_len:
        raise AemError(TOO_LARGE, f"{what} of {len(data)} bytes, limit is {max_len}")
    return _HEADER.pack(len(data)) + bytes(data)


def decode_header(header: bytes, max_len: int, what: str = "frame") -> int:
    """The length a 4-byte prefix announces, checked against ``max_len``.

    Raises AemError: BAD_ENCODING (not 4 bytes), TOO_LARGE (over ``max_len``).
    """
    if len(header) != HEADER_LEN:
        raise AemError(BAD_ENCODING, f"{what} header of {len(header)} bytes, not {HEADER_LEN}")
    (length,) = _HEADER.unpack(header)
    if length > max_len:
        raise AemError(TOO_LARGE, f"{what} of {length} bytes announced, limit is {max_len}")
    return length

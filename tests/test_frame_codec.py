"""The one frame format (protocol.frame) and the one atomic write
(ledger.atomicfile), as the stream framing, the control socket and the log
file all use them."""

from __future__ import annotations

import os
import stat

import pytest

from ledger.atomicfile import AtomicFile, atomic_write
from protocol.errors import BAD_ENCODING, BAD_VALUE, TOO_LARGE, AemError
from protocol.frame import HEADER_LEN, MAX_FRAME_LEN, decode_header, encode_frame, encode_header


def _code(fn, *args) -> str:
    with pytest.raises(AemError) as e:
        fn(*args)
    return e.value.code


def test_header_is_a_big_endian_u32_and_round_trips():
    assert HEADER_LEN == 4
    assert encode_header(0) == b"\0\0\0\0"
    assert encode_header(0x01020304) == b"\x01\x02\x03\x04"
    assert encode_frame(b"abc") == b"\0\0\0\x03abc"
    for n in (0, 1, 255, 65536, MAX_FRAME_LEN):
        assert decode_header(encode_header(n), MAX_FRAME_LEN) == n


def test_limits_are_checked_before_any_body():
    assert _code(decode_header, encode_header(11), 10) == TOO_LARGE
    assert _code(decode_header, b"\0\0\0", 10) == BAD_ENCODING
    assert _code(encode_frame, b"x" * 11, 10) == TOO_LARGE
    assert _code(encode_frame, b"", -1) == BAD_VALUE
    assert _code(encode_header, MAX_FRAME_LEN + 1) == TOO_LARGE


def test_the_three_users_share_the_codec():
    # The stream framing, the control socket and the log file write the same bytes.
    import aemd.control as control
    import aemd.framing as framing
    import ledger.logfile as logfile
    assert framing.HEADER_LEN == HEADER_LEN and framing.MAX_FRAME_LEN == MAX_FRAME_LEN
    assert control._pack({"a": 1})[:4] == encode_header(len(control._pack({"a": 1})) - 4)
    for mod in (framing, control, logfile):
        assert "decode_header" in vars(mod) and "encode_header" in vars(mod)


def test_atomic_write_replaces_whole_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "f"
    atomic_write(p, b"one")
    atomic_write(p, b"two", 0o600)
    assert p.read_bytes() == b"two"
    assert os.listdir(tmp_path) == ["f"]
    # The mode is the new file's, never wider on the way (umask permitting).
    assert stat.S_IMODE(os.stat(p).st_mode) & 0o077 == 0


def test_an_aborted_or_failed_atomic_file_leaves_the_old_one(tmp_path):
    p = tmp_path / "f"
    atomic_write(p, b"old")
    with pytest.raises(RuntimeError):
        with AtomicFile(p) as f:
            f.write(b"half")
            raise RuntimeError("crash while writing")
    assert p.read_bytes() == b"old" and os.listdir(tmp_path) == ["f"]
    d = tmp_path / "dir"
    d.mkdir()
    with pytest.raises(OSError):
        atomic_write(d, b"x")                       # cannot replace a directory
    assert sorted(os.listdir(tmp_path)) == ["dir", "f"]

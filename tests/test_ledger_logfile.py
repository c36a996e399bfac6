"""The exported log file format (specs/ledger.md section 9)."""

from __future__ import annotations

import pytest

from crypto.hashing import H
from ledger.logfile import MAGIC, read_log_all, write_log
from protocol import errors
from protocol.errors import AemError
from tests.ledgerkit import TestNet


@pytest.fixture
def log(tmp_path):
    net = TestNet(n_users=2)
    a, b = net.users
    entries = [net.append(a, net.transfer(a, b, i + 1)).encode() for i in range(5)]
    path = tmp_path / "x.log"
    assert write_log(path, net.net, entries) == 5
    return net, entries, path


def _code(fn, *a) -> str:
    with pytest.raises(AemError) as exc:
        fn(*a)
    return exc.value.code


def test_layout_and_round_trip(log):
    net, entries, path = log
    data = path.read_bytes()
    assert data[:8] == MAGIC and data[8:40] == net.net
    assert read_log_all(path, net.net) == entries
    tail = data[-44:]
    assert tail[:4] == b"\0\0\0\0" and int.from_bytes(tail[4:12], "big") == 5
    assert tail[12:] == H(b"".join(H(e) for e in entries))
    assert not list(path.parent.glob(".*.part"))


def test_refusals(log, tmp_path):
    net, entries, path = log
    data = path.read_bytes()
    bad = tmp_path / "bad.log"
    cases = {
        errors.WRONG_OBJECT: b"NOTALOG!" + data[8:],
        errors.BAD_ENCODING: data[:-10],                          # truncated trailer
        errors.TRAILING_BYTES: data + b"\0",
        errors.TOO_LARGE: data[:40] + (70_000).to_bytes(4, "big") + b"\0" * 16,
    }
    for code, blob in cases.items():
        bad.write_bytes(blob)
        assert _code(read_log_all, bad, net.net) == code, code
    bad.write_bytes(data[:50])                                    # ends inside a record
    assert _code(read_log_all, bad, net.net) == errors.BAD_ENCODING
    swapped = bytearray(data)
    swapped[-1] ^= 1
    bad.write_bytes(bytes(swapped))
    assert _code(read_log_all, bad, net.net) == errors.BAD_ENCODING
    assert _code(read_log_all, path, H(b"other net")) == errors.WRONG_NETWORK
    assert _code(read_log_all, tmp_path / "missing.log") == errors.NOT_FOUND

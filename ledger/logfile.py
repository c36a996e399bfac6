"""The exported log file: a stream of entries that any peer can import or
replay (``aemctl ledger-export``, ``ledger-import``, ``ledger-replay --log``).

Layout (``specs/ledger.md`` section 9), all integers big-endian:

    magic    8 bytes   "AEMLOG" 0x00 0x01   (format version 1)
    net     32 bytes   network id (the genesis id)
    record*            u32 length (1..65536) || the entry's canonical bytes
                       (the one frame format, protocol/frame.py)
    end      4 bytes   u32 0
    count    8 bytes   u64 number of records
    digest  32 bytes   H(id_1 || id_2 || ... || id_count), id_i = H(record i bytes)

Readers stream it record by record, check each length before reading, and
refuse a file that ends early, has bytes after the digest, or whose count or
digest do not match (a truncated or corrupted export). The entries
themselves are verified by whoever consumes them, exactly as if they had
arrived from a peer.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

from crypto.hashing import H
from ledger.atomicfile import AtomicFile
from protocol import errors
from protocol.entry import MAX_ENTRY
from protocol.errors import AemError
from protocol.frame import HEADER_LEN, decode_header, encode_header

MAGIC = b"AEMLOG\x00\x01"
_U64 = struct.Struct(">Q")


class LogWriter:
    """Write a log file: ``with LogWriter(path, net) as w: w.add(entry_bytes)``.
    The file appears complete or not at all (:class:`ledger.atomicfile.AtomicFile`:
    written aside, fsynced, then renamed)."""

    def __init__(self, path: str | Path, net: bytes) -> None:
        self.path = Path(path)
        self._fh = AtomicFile(self.path)
        self._fh.write(MAGIC + net)
        self._ids: list[bytes] = []

    def add(self, data: bytes) -> None:
        if not 1 <= len(data) <= MAX_ENTRY:
            raise AemError(errors.TOO_LARGE, f"entry of {len(data)} bytes cannot be exported")
        self._fh.write(encode_header(len(data)))
        self._fh.write(data)
        self._ids.append(H(data))

    @property
    def count(self) -> int:
        return len(self._ids)

    def close(self) -> None:
        self._fh.write(encode_header(0) + _U64.pack(len(self._ids)) + H(b"".join(self._ids)))
        self._fh.commit()

    def abort(self) -> None:
        self._fh.abort()

    def __enter__(self) -> LogWriter:
        return self

    def __exit__(self, typ: object, exc: object, tb: object) -> None:
        if typ is None:
            self.close()
        else:
            self.abort()


def write_log(path: str | Path, net: bytes, entries: Iterable[bytes]) -> int:
    with LogWriter(path, net) as w:
        for e in entries:
            w.add(e)
        return w.count


def _read_exact(fh: BinaryIO, n: int, what: str) -> bytes:
    b = fh.read(n)
    if len(b) != n:
        raise AemError(errors.BAD_ENCODING, f"log file ends inside {what} (truncated?)")
    return b


def read_log(path: str | Path, net: bytes | None = None) -> Iterator[bytes]:
    """Yield the entries of a log file as they are read, checking the
    framing as it goes and the count and digest at the end: a corrupt file
    raises AemError only once its bad part is reached. A consumer that must
    not act on part of a corrupt file collects first (:func:`read_log_all`);
    importing as it reads is safe, since every entry is verified on its own."""
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise AemError(errors.NOT_FOUND, f"cannot read {path}: {exc.strerror}") from None
    with fh:
        head = _read_exact(fh, len(MAGIC) + 32, "the header")
        if head[:len(MAGIC)] != MAGIC:
            raise AemError(errors.WRONG_OBJECT, f"{path} is not an aem log file (version 1)")
        if net is not None and head[len(MAGIC):] != net:
            raise AemError(errors.WRONG_NETWORK, f"{path} is a log of another network")
        ids: list[bytes] = []
        while True:
            n = decode_header(_read_exact(fh, HEADER_LEN, "a record length"), MAX_ENTRY, "record")
            if n == 0:
                break
            data = _read_exact(fh, n, "a record")
            ids.append(H(data))
            yield data
        (count,) = _U64.unpack(_read_exact(fh, 8, "the trailer"))
        digest = _read_exact(fh, 32, "the trailer")
        if fh.read(1):
            raise AemError(errors.TRAILING_BYTES, "bytes after the log trailer")
        if count != len(ids) or digest != H(b"".join(ids)):
            raise AemError(errors.BAD_ENCODING, "log trailer does not match its records (corrupt file)")


def read_log_all(path: str | Path, net: bytes | None = None) -> list[bytes]:
    """Every entry of a log file, only if the whole file is intact."""
    return list(read_log(path, net))

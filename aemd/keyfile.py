"""The keystore file on disk: where :mod:`crypto.keystore`'s documents are read and written.

The format (and the sealing with the passphrase) is :mod:`crypto.keystore`,
pure; this module owns the file: created 0600 and replaced atomically
(:class:`ledger.atomicfile.AtomicFile`), never read if group or others can
access it, not a FIFO or other special file, and bounded in size.
"""

from __future__ import annotations

import os
import stat

from crypto.keys import SigningKey
from crypto.keystore import MAX_FILE_BYTES, decode_keystore, encode_keystore, is_encrypted
from ledger.atomicfile import atomic_write
from protocol.errors import KEYSTORE, AemError

__all__ = ["keystore_is_encrypted", "read_keystore", "write_keystore"]


def write_keystore(path: str | os.PathLike[str], key: SigningKey, passphrase: str | None) -> None:
    """Write ``key`` to ``path``, encrypted when ``passphrase`` is given.

    Atomic: a reader sees the old file or the new one, never a torn one, and
    the file is never visible with a mode wider than 0600. An existing file at
    ``path`` is replaced.
    """
    if not isinstance(key, SigningKey):
        raise AemError(KEYSTORE, "write_keystore needs a SigningKey")
    data = encode_keystore(key, passphrase)
    try:
        path = os.fspath(path)
    except TypeError:
        raise AemError(KEYSTORE, "keystore path must be a path") from None
    try:
        atomic_write(path, data, 0o600)
    except OSError as e:
        raise AemError(KEYSTORE, f"cannot write keystore {path}: {e.strerror}") from None


def _load(path: str | os.PathLike[str]) -> bytes:
    """Read and permission-check a keystore file: its bytes (the format is checked by the caller)."""
    try:
        path = os.fspath(path)
    except TypeError:
        raise AemError(KEYSTORE, "keystore path must be a path") from None
    try:
        # O_NONBLOCK so that a FIFO at the path fails the regular-file check
        # below instead of hanging the open; it changes nothing for a file.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise AemError(KEYSTORE, f"no keystore at {path}") from None
    except OSError as e:
        raise AemError(KEYSTORE, f"cannot open keystore {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise AemError(KEYSTORE, f"keystore {path} is not a regular file")
        if os.name == "posix" and st.st_mode & 0o077:
            raise AemError(
                KEYSTORE,
                f"keystore {path} is accessible by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}",
            )
        if st.st_size > MAX_FILE_BYTES:
            raise AemError(KEYSTORE, f"keystore {path} is too large to be a keystore")
        chunks = []
        total = 0
        while total <= MAX_FILE_BYTES:
            chunk = os.read(fd, MAX_FILE_BYTES + 1 - total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        raw = b"".join(chunks)
    except OSError as e:
        raise AemError(KEYSTORE, f"cannot read keystore {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    if len(raw) > MAX_FILE_BYTES:
        raise AemError(KEYSTORE, f"keystore {path} is too large to be a keystore")
    return raw



def read_keystore(path: str | os.PathLike[str], passphrase: str | None = None) -> SigningKey:
    """Load the signing key stored at ``path``.

    Raises AemError KEYSTORE for a missing, unreadable, over-permissive or
    malformed file, BAD_PASSPHRASE when the file is encrypted and the
    passphrase is missing or wrong. A passphrase given for an unencrypted file
    is ignored.
    """
    raw = _load(path)
    return decode_keystore(raw, passphrase, os.fspath(path))


def keystore_is_encrypted(path: str | os.PathLike[str]) -> bool:
    """Whether the keystore at ``path`` needs a passphrase (KEYSTORE if unreadable)."""
    return is_encrypted(_load(path), os.fspath(path))

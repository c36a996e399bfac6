"""The one atomic file write: a whole file or nothing, durable once it returns.

Every file aem writes whole (log exports, keystores, config, genesis, the
peer list, capsule settings) goes through :class:`AtomicFile`: written aside
in the same directory, flushed and fsynced, renamed over the target, and the
directory fsynced so the rename itself survives a crash. A reader sees the
old file or the new one, never a torn one. It lives in ``ledger/`` because the
log export (:mod:`ledger.logfile`) needs it and the ledger never imports the
daemon; ``aemd`` uses it from here.

The temporary file is created with ``O_EXCL | O_NOFOLLOW`` and the final
mode, under a random name: never visible with a wider mode than asked for
(keystores: 0600), never a symlink planted at a predictable name, and two
writers of one path do not share a temporary file.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import BinaryIO

__all__ = ["AtomicFile", "atomic_write", "fsync_dir"]


class AtomicFile:
    """``f = AtomicFile(path); f.write(...); f.commit()`` (or :meth:`abort`).

    As a context manager it commits on success and aborts on an exception.
    OSError propagates; callers that speak AemError translate it.
    """

    def __init__(self, path: str | os.PathLike[str], mode: int = 0o644) -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(6)}.part")
        fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
        self._fh: BinaryIO = os.fdopen(fd, "wb")
        self._done = False

    def write(self, data: bytes) -> None:
        self._fh.write(data)

    def commit(self) -> None:
        """Make the written bytes the file at ``path``, durably."""
        try:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        self._done = True
        fsync_dir(self.path.parent)

    def abort(self) -> None:
        """Drop the temporary file; ``path`` is left as it was."""
        if self._done:
            return
        self._done = True
        try:
            self._fh.close()
        except OSError:
            pass
        try:
            os.unlink(self.tmp)
        except OSError:
            pass

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, typ: object, exc: object, tb: object) -> None:
        if typ is None:
            self.commit()
        else:
            self.abort()


def atomic_write(path: str | os.PathLike[str], data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` as the whole file at ``path`` (see :class:`AtomicFile`)."""
    with AtomicFile(path, mode) as f:
        f.write(data)


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    # The rename is only durable once the directory entry is; some platforms
    # (Windows) cannot open a directory, and there the rename is all we get.
    try:
        dfd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)

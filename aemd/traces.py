"""RouteTraces: why this node sent each task where it did, in
``<home>/traces.sqlite`` (signed, canonical bytes, keyed by task id)."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from protocol import errors
from protocol.errors import AemError
from protocol.task import RouteTrace


class TraceStore:
    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS traces (task_id BLOB PRIMARY KEY, "
                             "created_at INTEGER NOT NULL, trace BLOB NOT NULL)")

    def put(self, trace: RouteTrace) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO traces VALUES (?, ?, ?)",
                             (trace.task_id, trace.created_at, trace.encode()))

    def get(self, task_prefix: str) -> RouteTrace:
        try:
            lo = bytes.fromhex(task_prefix[: len(task_prefix) // 2 * 2])
        except ValueError:
            raise AemError(errors.BAD_VALUE, f"not a task id: {task_prefix!r}") from None
        with self._lock:
            rows = self._db.execute("SELECT trace FROM traces WHERE substr(task_id, 1, ?) = ? LIMIT 2",
                                    (len(lo), lo)).fetchall()
        found = [RouteTrace.decode(r[0]) for r in rows if r[0]]
        found = [t for t in found if t.task_id.hex().startswith(task_prefix.lower())]
        if not found:
            raise AemError(errors.NOT_FOUND, f"no route trace for task {task_prefix}")
        if len(found) > 1:
            raise AemError(errors.BAD_VALUE, f"{task_prefix!r} names several tasks; give more of the id")
        return found[0]

    def recent(self, limit: int = 20) -> list[RouteTrace]:
        with self._lock:
            rows = self._db.execute("SELECT trace FROM traces ORDER BY created_at DESC LIMIT ?",
                                    (limit,)).fetchall()
        return [RouteTrace.decode(r[0]) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()

"""The log store as the node's trio code uses it.

The store (``ledger.store.LogStore``) is synchronous SQLite. Every call here
runs in a worker thread, one at a time behind a trio lock, so verification
and fsync never stall the event loop and the store sees one caller at a time.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import trio

from ledger.admission import AdmissionState, admission_of_applied
from ledger.replay import ReplayResult
from ledger.store import LogStore, Status
from protocol import errors
from protocol.genesis import Genesis


class StoreAccess:
    def __init__(self, store: LogStore) -> None:
        self.store = store
        self._lock = trio.Lock()
        # Called with each replay's duration in seconds (the node's metrics).
        self.observe_replay: Callable[[float], None] = lambda s: None
        # Called (in the event loop, must not block) with the bytes of the
        # entries each insert from a peer newly stored: how the payer's node
        # sees receipts for its spend keys arrive (aemd/tasks.py).
        self.on_insert: Callable[[list[bytes]], None] | None = None
        self._admission: tuple[tuple, AdmissionState] | None = None

    @classmethod
    def open(cls, path: Path, genesis: Genesis) -> "StoreAccess":
        return cls(LogStore.open(path, genesis))

    async def _run(self, fn, *args: Any) -> Any:
        async with self._lock:
            return await trio.to_thread.run_sync(fn, *args)

    async def frontiers(self) -> dict[bytes, tuple[int, bytes]]:
        return await self._run(self.store.frontiers)

    async def range(self, author: bytes, from_seq: int, limit: int) -> list[bytes]:
        return await self._run(self.store.range, author, from_seq, limit)

    async def linked_ids(self, pairs: list[tuple[bytes, int]]) -> dict[tuple[bytes, int], set[bytes]]:
        return await self._run(self.store.linked_ids, pairs)

    async def insert_batch(self, entries: list[bytes]) -> tuple[int, int]:
        """Insert entries from a peer: (newly stored, rejected as invalid).
        A refusal for lack of room (REFUSED) is not the peer's fault."""
        results = await self._run(self.store.insert_many, entries)
        if self.on_insert is not None:
            self.on_insert([e for e, r in zip(entries, results) if r.stored])
        added = sum(1 for r in results if r.stored)
        bad = sum(1 for r in results if r.status is Status.REJECTED and r.code != errors.REFUSED)
        return added, bad

    async def append_local(self, key, obj, ts: int):
        return await self._run(self.store.append_local, key, obj, ts)

    async def max_lamport(self) -> int:
        return await self._run(self.store.max_lamport)

    async def count(self) -> int:
        return await self._run(self.store.count)

    async def replay(self, as_of: int) -> ReplayResult:
        """The replay of the stored log as of ``as_of`` (from the store's
        checkpoint), as a value; callers that print JSON convert it
        (``aemd.nodecontrol.replay_json``)."""
        return await self._timed_replay(as_of)

    async def ledger(self, as_of: int) -> ReplayResult:
        """The same as :meth:`replay`, by the name the task service and the
        API use when they ask one replay several things (funds, spend keys,
        hosts' records)."""
        return await self._timed_replay(as_of)

    async def _timed_replay(self, as_of: int) -> ReplayResult:
        async with self._lock:      # timed inside the lock: the replay, not the wait for it
            t = time.perf_counter()
            res = await trio.to_thread.run_sync(self.store.replay, as_of)
            self.observe_replay(time.perf_counter() - t)
        return res

    async def with_replay(self, as_of: int, fn: Callable[[Any, Any], Any]) -> Any:
        """``fn(store, replay)`` in a worker thread, the replay as of ``as_of``
        and ``fn`` both under the lock: its state is read before another
        replay continues from it."""
        def run() -> Any:
            return fn(self.store, self.store.replay(as_of))
        async with self._lock:
            return await trio.to_thread.run_sync(run)

    async def admission(self) -> AdmissionState:
        """The admission replay of the stored log (``ledger/admission.py``),
        over every applied entry the store holds. Cached: recomputed only
        when the store's marker says the applied manifests and reports may
        have changed, and then from those entries alone."""
        return await self._run(self._admission_now)

    def _admission_now(self) -> AdmissionState:
        # The marker first: an insert between the two reads then costs one
        # recomputation more, never a stale state under a newer marker.
        mark = self.store.admission_marker()
        if self._admission is None or self._admission[0] != mark:
            self._admission = (mark, admission_of_applied(self.store.genesis, self.store.admission_entries()))
        return self._admission[1]

    async def close(self) -> None:
        async with self._lock:
            await trio.to_thread.run_sync(self.store.close)

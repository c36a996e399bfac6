"""RouteTraces: why this node sent each task where it did, in
``<home>/traces.sqlite`` (signed, canonical bytes, keyed by task id); and the
distillation memory beside them: for each task this node paid for and got a
receipt for, what a training set needs (specs/task-protocol.md §8).

A memory row keeps the payer's and the host's training-use policies and the
host's receipt always, and the task packet and the output only when both
said "allowed": the node never keeps content nobody may train on, yet an
export can count what it leaves out. :func:`judge` decides from the signed
objects alone whether a row goes into an export; it is pure, so the export
command and the tests share it."""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from crypto.hashing import H
from protocol import errors
from protocol.errors import AemError
from protocol.task import InferenceWorkReceipt, RouteTrace, TaskPacket

ALLOWED = "allowed"
# Why an export leaves a successful task out, in the order they are judged.
PAYER_FORBIDS = "payer_forbids"       # the payer's TaskPacket said "forbidden"
HOST_FORBIDS = "host_forbids"         # the host's receipt said "forbidden"
CHALLENGED = "challenged"             # a challenge or dispute of the receipt passed
UNACKNOWLEDGED = "unacknowledged"     # the log holds no accepting ack of the receipt by this payer
TESTS_FAILED = "tests_failed"         # a code-patch report whose outcome is not "passed"
BAD_RECORD = "bad_record"             # the stored objects do not verify or do not match
REASONS = (PAYER_FORBIDS, HOST_FORBIDS, CHALLENGED, UNACKNOWLEDGED, TESTS_FAILED, BAD_RECORD)
FORMAT = "aem-trace-1"


@dataclass(frozen=True, slots=True)
class Memory:
    """One task this node paid for, as the memory table keeps it."""
    task_id: bytes
    domain: str
    kind: str
    created_at: int
    payer_use: str         # the TaskPacket's training_use
    host_use: str          # the receipt's training_use
    receipt: bytes         # the InferenceWorkReceipt's canonical bytes
    task: bytes = b""      # the TaskPacket's canonical bytes: only when both said allowed
    output: bytes = b""    # the output the receipt hashes: likewise


def memory_of(task: TaskPacket, receipt: InferenceWorkReceipt, output: bytes) -> Memory:
    keep = task.training_use == ALLOWED and receipt.training_use == ALLOWED
    return Memory(task_id=task.id, domain=task.domain, kind=task.kind, created_at=task.created_at,
                  payer_use=task.training_use, host_use=receipt.training_use, receipt=receipt.encode(),
                  task=task.encode() if keep else b"", output=output if keep else b"")


@dataclass(frozen=True, slots=True)
class LogView:
    """What the node's ledger replay says of one receipt."""
    acknowledged: bool     # its payer logged an accepting ack
    challenged: bool       # a challenge or dispute of it passed


def judge(m: Memory, net: bytes, payer: bytes, view: LogView) -> tuple[str, dict[str, Any] | None]:
    """("", the export record) or (a reason from REASONS, None). The policies
    are read from the signed objects, not from the row's columns, whenever
    the objects are kept; a row whose columns say "forbidden" keeps no content
    and is left out on their word (they can only be stricter than the objects)."""
    if m.payer_use != ALLOWED:
        return PAYER_FORBIDS, None
    if m.host_use != ALLOWED:
        return HOST_FORBIDS, None
    try:
        task = TaskPacket.decode(m.task)
        receipt = InferenceWorkReceipt.decode(m.receipt)
        task.verify(net)
        receipt.verify(net)
    except AemError:
        return BAD_RECORD, None
    if task.payer != payer or receipt.payer != payer or receipt.task_hash != task.id or \
            receipt.output_hash != H(m.output) or task.id != m.task_id:
        return BAD_RECORD, None
    if task.training_use != ALLOWED:
        return PAYER_FORBIDS, None
    if receipt.training_use != ALLOWED:
        return HOST_FORBIDS, None
    if view.challenged:
        return CHALLENGED, None
    if not view.acknowledged:
        return UNACKNOWLEDGED, None
    output = m.output.decode("utf-8", "replace")
    if task.kind == "code_patch":
        try:
            report_outcome = json.loads(m.output)["outcome"]
        except (ValueError, KeyError, TypeError):
            return BAD_RECORD, None
        if report_outcome != "passed":
            return TESTS_FAILED, None
        verifier = {"method": "code_patch_report", "outcome": report_outcome, "acknowledged": True,
                    "challenged": False}
    else:
        verifier = {"method": "receipt_ack", "outcome": "acknowledged", "acknowledged": True, "challenged": False}
    return "", {
        "format": FORMAT,
        "task_id": task.id.hex(),
        "domain": task.domain,
        "kind": task.kind,
        "prompt": task.prompt,
        "messages": [{"role": x.role, "content": x.content} for x in task.messages],
        "max_tokens": task.max_tokens,
        "temperature_milli": task.temperature_milli,
        "seed": task.seed,
        "patch": task.patch,
        "test_cmd": list(task.test_cmd),
        "repo_hash": task.repo_hash.hex(),
        "output": output,
        "tokens_out": receipt.tokens_out,
        "payer": task.payer.hex(),
        "host": receipt.host.hex(),
        "capsule_id": receipt.capsule_id.hex(),
        "receipt_id": receipt.id.hex(),
        "price": receipt.charge,
        "payer_training_use": task.training_use,
        "host_training_use": receipt.training_use,
        "verifier": verifier,
        "created_at": task.created_at,
        "finished_at": receipt.finished_at,
        "receipt": receipt.encode().hex(),
        # The repository of a code-patch task may weigh 8 MiB: repo_hash names it.
        "task_packet": task.encode().hex() if task.kind == "text" else None,
    }


class TraceStore:
    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS traces (task_id BLOB PRIMARY KEY, "
                             "created_at INTEGER NOT NULL, trace BLOB NOT NULL)")
            self._db.execute("CREATE TABLE IF NOT EXISTS memory (task_id BLOB PRIMARY KEY, "
                             "domain TEXT NOT NULL, kind TEXT NOT NULL, created_at INTEGER NOT NULL, "
                             "payer_use TEXT NOT NULL, host_use TEXT NOT NULL, receipt BLOB NOT NULL, "
                             "task BLOB NOT NULL, output BLOB NOT NULL)")
            self._db.execute("CREATE INDEX IF NOT EXISTS memory_domain ON memory (domain, created_at)")

    def put(self, trace: RouteTrace, memory: Memory | None = None) -> None:
        """The trace, and with it (one transaction) the memory of a task that
        succeeded: an export never sees a task without its trace or the reverse."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("INSERT OR REPLACE INTO traces VALUES (?, ?, ?)",
                                 (trace.task_id, trace.created_at, trace.encode()))
                if memory is not None:
                    m = memory
                    self._db.execute("INSERT OR REPLACE INTO memory VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                     (m.task_id, m.domain, m.kind, m.created_at, m.payer_use, m.host_use,
                                      m.receipt, m.task, m.output))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def memory_count(self, domain: str) -> int:
        with self._lock:
            return self._db.execute("SELECT count(*) FROM memory WHERE domain = ?", (domain,)).fetchone()[0]

    def memories(self, domain: str, batch: int = 64) -> Iterator[Memory]:
        """The domain's memory rows, oldest first, read in batches so that a
        large memory never sits in RAM at once (nor the lock held between)."""
        after: tuple[int, bytes] = (-1, b"")
        while True:
            with self._lock:
                rows = self._db.execute(
                    "SELECT task_id, domain, kind, created_at, payer_use, host_use, receipt, task, output "
                    "FROM memory WHERE domain = ? AND (created_at, task_id) > (?, ?) "
                    "ORDER BY created_at, task_id LIMIT ?", (domain, after[0], after[1], batch)).fetchall()
            if not rows:
                return
            for r in rows:
                yield Memory(*r)
            after = (rows[-1][3], rows[-1][0])

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

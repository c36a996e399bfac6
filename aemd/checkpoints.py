"""Checkpoints of logs as the node keeps, gossips and checks them.

Every ``[checkpoint] interval_s`` the node signs a checkpoint of its own log
(protocol/checkpoint.py) and publishes it on the checkpoint topic. For each
author it keeps the newest checkpoint it has accepted in
``<home>/checkpoints.sqlite``; `aemctl evidence export` proves entries
against them. When a checkpoint contradicts the one held for its author
(same size, other root; or, where this node holds the author's entries, a
prefix of the larger one that is not the smaller), the pair is fork evidence:
recorded in the same file and published, so that every node records it.

The book is plain synchronous SQLite (WAL, so the CLI reads it while a
daemon writes); the daemon calls it from worker threads.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path
from typing import Any

import trio

from crypto.hashing import H
from crypto.merkle import MerkleTree, leaf_hash
from ledger.store import MAX_RANGE, LogStore
from protocol import errors
from protocol.checkpoint import (CHECKPOINT_MAX, FORK_EVIDENCE_MAX, ForkEvidence, LogCheckpoint,
                                 check_fork_evidence, checkpoint_topic, decode_gossip, fork_evidence,
                                 prefix_proof)
from protocol.entry import Entry
from protocol.errors import AemError

log = logging.getLogger("aemd.checkpoints")

FILE_NAME = "checkpoints.sqlite"
MAX_FUTURE_S = 600               # a checkpoint dated further ahead than this is refused
FIRST_ANNOUNCE_S = 1.0           # after start, let peers connect before the first checkpoint

_SCHEMA = """
CREATE TABLE IF NOT EXISTS newest (author BLOB PRIMARY KEY, size INTEGER NOT NULL, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS evidence (id BLOB PRIMARY KEY, author BLOB NOT NULL,
                                     recorded_at INTEGER NOT NULL, data BLOB NOT NULL);
"""


def book_path(home_root: Path) -> Path:
    return Path(home_root) / FILE_NAME


class CheckpointBook:
    """The newest accepted checkpoint per author, and the fork evidence recorded."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._db = conn
        # The daemon calls in from worker threads; offer() reads, then writes.
        self._lock = threading.RLock()

    @classmethod
    def open(cls, path: Path) -> CheckpointBook:
        try:
            conn = sqlite3.connect(str(path), timeout=10.0, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise AemError(errors.STORE, f"{path}: {exc}") from None
        return cls(conn)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def newest(self, author: bytes) -> LogCheckpoint | None:
        with self._lock:
            r = self._db.execute("SELECT data FROM newest WHERE author = ?", (author,)).fetchone()
        return LogCheckpoint.decode(r[0]) if r else None

    def all(self) -> list[LogCheckpoint]:
        with self._lock:
            rows = self._db.execute("SELECT data FROM newest ORDER BY author").fetchall()
        return [LogCheckpoint.decode(r[0]) for r in rows]

    def put(self, cp: LogCheckpoint) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO newest (author, size, data) VALUES (?, ?, ?)",
                             (cp.author, cp.size, cp.encode()))

    def add_evidence(self, ev: ForkEvidence, now: int) -> bool:
        """Record ``ev`` (checked by the caller); False when it was already."""
        with self._lock:
            cur = self._db.execute("INSERT OR IGNORE INTO evidence (id, author, recorded_at, data) VALUES (?, ?, ?, ?)",
                                   (ev.id, ev.author, now, ev.encode()))
            return cur.rowcount == 1

    def evidence(self) -> list[ForkEvidence]:
        with self._lock:
            rows = self._db.execute("SELECT data FROM evidence ORDER BY recorded_at, id").fetchall()
        return [ForkEvidence.decode(r[0]) for r in rows]

    def offer(self, cp: LogCheckpoint, held: MerkleTree | None, now: int) -> ForkEvidence | None:
        """Take a verified checkpoint: keep it when it is its author's newest,
        and return (and record) fork evidence when it contradicts the one
        held. ``held``: the tree of the author's entries this node holds
        (ids, seq 0 upwards), or None when not looked up."""
        with self._lock:
            return self._offer(cp, held, now)

    def _offer(self, cp: LogCheckpoint, held: MerkleTree | None, now: int) -> ForkEvidence | None:
        old = self.newest(cp.author)
        if old is None:
            self.put(cp)
            return None
        if old.id == cp.id:
            return None
        ev = None
        if old.size == cp.size:
            ev = fork_evidence(old, cp)
        elif held is not None:
            small, large = (old, cp) if old.size < cp.size else (cp, old)
            if small.size > 0 and len(held) >= large.size and held.root(large.size) == large.root:
                ev = fork_evidence(small, large, prefix_proof(held, small.size, large.size))
        if ev is not None:
            self.add_evidence(ev, now)
            return ev
        if (cp.size, cp.created_at) > (old.size, old.created_at):
            self.put(cp)
        return None


def author_log_ids(store: LogStore, author: bytes, upto: int | None = None,
                   start: list[bytes] | None = None) -> list[bytes]:
    """Ids of ``author``'s entries from seq 0 for as long as they link (where
    the author forked, the branch whose entry has the lower id); at most
    ``upto``. ``start``: ids already known (seq 0 upwards), to read on from."""
    ids: list[bytes] = list(start or ())
    while True:
        before = len(ids)
        batch = store.range(author, before, MAX_RANGE)
        for data in batch:
            e = Entry.decode(data)
            if e.seq > len(ids):
                break                       # a gap: the linked chain ends here
            if e.seq == len(ids) and e.prev == (ids[-1] if ids else b""):
                ids.append(H(data))
                if upto is not None and len(ids) >= upto:
                    return ids
        if len(ids) == before or len(batch) < MAX_RANGE:
            return ids


class LogTrees:
    """The Merkle trees of the logs this node holds, kept between calls so
    that each look-up reads and hashes only the entries new since the last
    (a log only grows; where an author forked, the tree stays on the branch
    it first followed). At most ``max_authors`` trees are kept."""

    def __init__(self, max_authors: int = 256) -> None:
        self.max_authors = max_authors
        self._logs: dict[bytes, tuple[list[bytes], MerkleTree]] = {}

    def get(self, store: LogStore, author: bytes, upto: int | None = None) -> tuple[list[bytes], MerkleTree]:
        ids, tree = self._logs.pop(author, None) or ([], MerkleTree())
        if upto is None or len(ids) < upto:
            more = author_log_ids(store, author, upto, start=ids)[len(ids):]
            for eid in more:
                tree.append(leaf_hash(eid))
            ids.extend(more)
        if len(self._logs) >= self.max_authors:
            self._logs.pop(next(iter(self._logs)))
        self._logs[author] = (ids, tree)   # most recently used last
        return ids, tree


class CheckpointService:
    """The daemon's part: validator, reader and announce loop of the topic."""

    def __init__(self, node: Any, interval_s: float) -> None:
        self.node = node
        self.interval_s = interval_s
        self.topic = checkpoint_topic(node.net)
        self.book = CheckpointBook.open(book_path(node.home.root))
        self.trees = LogTrees()
        self.forks_recorded = 0

    def close(self) -> None:
        self.book.close()

    # -- validation (runs in the p2p validator: no I/O) ----------------------------

    def check(self, data: bytes) -> LogCheckpoint | ForkEvidence:
        node = self.node
        if len(data) > min(node.genesis.limits.max_gossip_bytes, FORK_EVIDENCE_MAX):
            raise AemError(errors.TOO_LARGE, "checkpoint message over the limit")
        msg = decode_gossip(data)
        if isinstance(msg, ForkEvidence):
            check_fork_evidence(msg, node.net)
        else:
            if len(data) > CHECKPOINT_MAX:
                raise AemError(errors.TOO_LARGE, "checkpoint over its limit")
            msg.verify(node.net)
            if msg.created_at > node.now() + MAX_FUTURE_S:
                raise AemError(errors.BAD_VALUE, "checkpoint dated in the future")
        return msg

    def validate(self, peer: str, data: bytes) -> bool:
        try:
            self.check(data)
            return True
        except AemError as exc:
            log.info("invalid checkpoint message from %s: %s", peer, exc)
            return False

    # -- taking messages ---------------------------------------------------------------

    async def _held(self, author: bytes, upto: int | None) -> tuple[list[bytes], MerkleTree]:
        store = self.node.store
        return await store._run(self.trees.get, store.store, author, upto)

    async def take(self, msg: LogCheckpoint | ForkEvidence, *, publish_evidence: bool = True) -> ForkEvidence | None:
        """Offer a checked message to the book; publish fork evidence found."""
        now = self.node.now()
        if isinstance(msg, ForkEvidence):
            if await trio.to_thread.run_sync(self.book.add_evidence, msg, now):
                self.forks_recorded += 1
                log.warning("fork evidence recorded: author %s signed checkpoints %d and %d that disagree",
                            msg.author.hex()[:16], msg.a.size, msg.b.size)
            return msg
        old = await trio.to_thread.run_sync(self.book.newest, msg.author)
        held = None
        if old is not None and old.size != msg.size and old.id != msg.id:
            held = (await self._held(msg.author, max(old.size, msg.size)))[1]
        ev = await trio.to_thread.run_sync(self.book.offer, msg, held, now)
        if ev is not None:
            self.forks_recorded += 1
            log.warning("fork evidence recorded: author %s signed checkpoints %d and %d that disagree",
                        ev.author.hex()[:16], ev.a.size, ev.b.size)
            if publish_evidence:
                await self._publish(ev.encode())
        return ev

    async def _publish(self, data: bytes) -> None:
        try:
            await self.node.p2p.publish(self.topic, data)
            self.node.metrics.gossip_out.labels("checkpoints").inc()
        except AemError as exc:
            log.info("checkpoint publish: %s", exc)

    async def read(self, sub) -> None:
        async with sub:
            async for _origin, data in sub:
                self.node.metrics.gossip_in.labels("checkpoints").inc()
                try:
                    msg = self.check(data)
                except AemError:
                    continue
                await self.take(msg)

    async def offer_and_publish(self, data: bytes) -> dict:
        """A signed checkpoint or fork evidence from elsewhere (a bundle, another
        mesh), checked as gossip is, taken here and published."""
        msg = self.check(data)
        ev = await self.take(msg)
        await self._publish(data)
        return {"type": msg.TYPE, "fork_evidence": ev is not None}

    # -- our own checkpoints ---------------------------------------------------------

    async def sign_own(self) -> LogCheckpoint:
        node = self.node
        ids, tree = await self._held(node.key.public, None)
        cp = LogCheckpoint(net=node.net, author=node.key.public, size=len(ids), root=tree.root(len(ids)),
                           created_at=node.now(), sig=b"").signed(node.key)
        await self.take(cp, publish_evidence=True)
        return cp

    async def announce_loop(self) -> None:
        await trio.sleep(min(FIRST_ANNOUNCE_S, self.interval_s))
        while True:
            try:
                cp = await self.sign_own()
                await self._publish(cp.encode())
            except AemError as exc:
                log.info("own checkpoint: %s", exc)
            await trio.sleep(self.interval_s)

    # -- control socket ---------------------------------------------------------------

    def handlers(self) -> dict:
        async def checkpoints(args: dict, emit) -> dict:
            cps = await trio.to_thread.run_sync(self.book.all)
            evs = await trio.to_thread.run_sync(self.book.evidence)
            return {"checkpoints": [{"author": c.author.hex(), "size": c.size, "root": c.root.hex(),
                                     "created_at": c.created_at, "id": c.id.hex()} for c in cps],
                    "fork_evidence": [{"author": e.author.hex(), "sizes": [e.a.size, e.b.size],
                                       "id": e.id.hex()} for e in evs]}

        async def checkpoint_offer(args: dict, emit) -> dict:
            raw = args.get("data")
            try:
                data = bytes.fromhex(raw) if isinstance(raw, str) else None
            except ValueError:
                data = None
            if data is None:
                raise AemError(errors.BAD_VALUE, "data must be the message's bytes in hex")
            return await self.offer_and_publish(data)

        return {"checkpoints": checkpoints, "checkpoint_offer": checkpoint_offer}

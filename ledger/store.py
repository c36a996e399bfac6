"""The log store: every signed entry a node holds, in SQLite (WAL mode).

One table holds every entry the node keeps, with the author, seq, prev,
Lamport clock and the entry's replay :class:`~ledger.facts.Fact` (computed
once, at insert, with every signature checked). An entry is *linked* when
its chain reaches back to seq 0 through entries the store holds, *held* when
a predecessor is missing (it links as soon as that arrives), or *broken*
when its predecessor turned out not to be its author's seq-1 (kept, never
served). Two linked entries at one (author, seq) are an equivocation: both
stay, and the author's fork seq is recorded; replay freezes the author from
there (``ledger/feeds.py``), whatever arrived first. The frontier of a
forked author is (fork seq, ``FORK_HEAD``), so sync spreads the evidence.

Every insert checks size, signature, network and chain link before it
writes, and runs in one transaction, so a crash leaves a prefix of the
inserts and never half of one. The store is synchronous and guarded by one
lock, so the daemon calls it through ``trio.to_thread.run_sync`` from any
thread; other processes (``aemctl``) can open the same file at the same time.

Limits: at most ``MAX_HELD`` held entries in all and ``MAX_HELD_PER_AUTHOR``
of one author (beyond that an entry with a missing predecessor is refused
with REFUSED: fetch the range before it first).
"""

from __future__ import annotations

import dataclasses
import enum
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from crypto.hashing import H
from ledger.admission import KINDS as ADMISSION_KINDS
from ledger.facts import (FACTS_VERSION, Context, Fact, as_bytes, check_envelope, examine,
                          examine_entry, lamport_fits, local_clock_cap, pack_fact, unpack_fact)
from ledger.feeds import links
from ledger.replay import Checkpoint, ReplayResult, replay
from protocol import errors
from protocol.entry import Entry, make_entry
from protocol.errors import AemError
from protocol.genesis import Genesis
from protocol.schema import Signed
from protocol.sync import FORK_HEAD

SCHEMA_VERSION = 1
MAX_HELD = 100_000
MAX_HELD_PER_AUTHOR = 10_000
CHECKPOINT_EVERY = 1_000        # new entries between two saved checkpoints (or a tenth of the store)
MAX_RANGE = 10_000

LINKED, HELD, BROKEN = 0, 1, 2
# The entry kinds the admission replay reads, indexed so that it reads those alone.
_ADMISSION_WHERE = "kind IN (" + ", ".join(f"'{k}'" for k in ADMISSION_KINDS) + ")"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    rowid INTEGER PRIMARY KEY AUTOINCREMENT,
    id BLOB NOT NULL UNIQUE,
    author BLOB NOT NULL,
    seq INTEGER NOT NULL,
    prev BLOB NOT NULL,
    lamport INTEGER NOT NULL,
    state INTEGER NOT NULL,
    data BLOB NOT NULL,
    fact BLOB NOT NULL,
    kind TEXT
);
CREATE INDEX IF NOT EXISTS entries_author_seq ON entries (author, seq);
CREATE INDEX IF NOT EXISTS entries_lamport ON entries (lamport);
CREATE INDEX IF NOT EXISTS entries_held_prev ON entries (prev) WHERE state = 1;
CREATE INDEX IF NOT EXISTS entries_held_author ON entries (author) WHERE state = 1;
CREATE INDEX IF NOT EXISTS entries_broken_author ON entries (author) WHERE state = 2;
CREATE TABLE IF NOT EXISTS forks (author BLOB PRIMARY KEY, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS heads (author BLOB PRIMARY KEY, seq INTEGER NOT NULL, id BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoint (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    watermark INTEGER NOT NULL,
    as_of INTEGER NOT NULL,
    data BLOB NOT NULL
);
"""


class Status(enum.Enum):
    ADDED = "added"                  # stored and linked
    DUPLICATE = "duplicate"          # already held: nothing changed
    HELD = "held"                    # stored; waits for its predecessor
    EQUIVOCATION = "equivocation"    # stored as evidence: a second linked entry at its (author, seq)
    REJECTED = "rejected"            # not stored; ``code`` says why


@dataclass(frozen=True)
class InsertResult:
    status: Status
    id: bytes = b""                  # entry id (empty when the bytes are not an entry)
    code: str | None = None          # AemError code when REJECTED
    promoted: int = 0                # held entries that linked because of this one

    @property
    def stored(self) -> bool:
        return self.status in (Status.ADDED, Status.HELD, Status.EQUIVOCATION)


@dataclass
class VerifyReport:
    entries: int = 0
    linked: int = 0
    held: int = 0
    broken: int = 0
    forks: dict | None = None                 # author -> fork seq
    bad: list | None = None                   # (entry id, code): integrity failures
    refused: dict | None = None               # code -> count: entries replay will refuse on their own

    @property
    def problems(self) -> bool:
        return bool(self.forks or self.bad or self.refused)


class LogStore:
    """The entries of one network in one SQLite file. Open with :meth:`open`."""

    def __init__(self, conn: sqlite3.Connection, genesis: Genesis, path: Path) -> None:
        self._db = conn
        self._lock = threading.RLock()
        self.genesis = genesis
        self.ctx = Context.of(genesis)
        self.path = path
        self._ck: Checkpoint | None = None
        self._ck_mark = 0            # rowid covered by self._ck
        self._saved_mark = 0         # rowid covered by the saved checkpoint

    # -- opening -----------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, genesis: Genesis) -> LogStore:
        path = Path(path)
        try:
            conn = sqlite3.connect(str(path), timeout=10.0, isolation_level=None,
                                   check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise AemError(errors.STORE, f"cannot open {path}: {exc}") from None
        store = cls(conn, genesis, path)
        store._check_meta()
        return store

    def _check_meta(self) -> None:
        net = self.genesis.network_id
        with self._tx():
            meta = dict(self._db.execute("SELECT key, value FROM meta"))
            if not meta:
                self._db.executemany("INSERT INTO meta VALUES (?, ?)", [
                    ("schema", SCHEMA_VERSION), ("net", net), ("facts", FACTS_VERSION)])
                self._migrate_kind()
                return
            if meta.get("schema") != SCHEMA_VERSION:
                raise AemError(errors.STORE, f"{self.path}: store schema {meta.get('schema')} "
                                             f"is not {SCHEMA_VERSION}")
            if meta.get("net") != net:
                raise AemError(errors.WRONG_NETWORK, f"{self.path} holds another network's log")
            if meta.get("facts") != FACTS_VERSION:
                self._refresh_facts()
            self._migrate_kind()
            if (self._db.execute("SELECT 1 FROM heads LIMIT 1").fetchone() is None
                    and self._db.execute("SELECT 1 FROM entries WHERE state = 0 LIMIT 1").fetchone()):
                # A store written before the heads table existed.
                self._db.execute(
                    "INSERT INTO heads SELECT author, seq, MIN(id) FROM entries e WHERE state = 0 AND "
                    "seq = (SELECT MAX(seq) FROM entries WHERE author = e.author AND state = 0) "
                    "GROUP BY author")

    def _migrate_kind(self) -> None:
        """Give every entry its ``kind`` column: a store written before the
        column existed gets it here, and rows an older version inserted
        without it are filled in from their facts."""
        db = self._db
        if "kind" not in {r[1] for r in db.execute("PRAGMA table_info(entries)")}:
            db.execute("ALTER TABLE entries ADD COLUMN kind TEXT")
        db.execute(f"CREATE INDEX IF NOT EXISTS entries_admission ON entries (kind, state) "
                   f"WHERE {_ADMISSION_WHERE}")
        rows = db.execute("SELECT rowid, fact FROM entries WHERE kind IS NULL").fetchall()
        db.executemany("UPDATE entries SET kind = ? WHERE rowid = ?",
                       [(unpack_fact(f).kind, r) for r, f in rows])

    def _refresh_facts(self) -> None:
        """Recompute every stored fact (after an upgrade changed their form)."""
        rows = self._db.execute("SELECT rowid, id, data FROM entries").fetchall()
        facts = [(examine(d, self.ctx), r, i) for r, i, d in rows]
        self._db.executemany("UPDATE entries SET fact = ? WHERE rowid = ?",
                             [(pack_fact(f), r) for f, r, _ in facts])
        # Entries a newer rule refuses at insert (the Lamport bound, say) are
        # kept as broken: never served, never a head, never followed.
        gone = [(i,) for f, _, i in facts if f.author is None]
        self._db.executemany("UPDATE entries SET state = 2 WHERE id = ?", gone)
        self._db.executemany("DELETE FROM heads WHERE id = ?", gone)
        self._db.execute("DELETE FROM checkpoint")
        self._db.execute("UPDATE meta SET value = ? WHERE key = 'facts'", (FACTS_VERSION,))

    def close(self) -> None:
        with self._lock:
            try:
                self._save_checkpoint()
            except AemError:
                pass
            self._db.close()

    def __enter__(self) -> LogStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    class _Tx:
        def __init__(self, store: LogStore) -> None:
            self.s = store

        def __enter__(self) -> None:
            self.s._lock.acquire()
            try:
                self.s._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                self.s._lock.release()
                raise AemError(errors.STORE, f"store busy or unwritable: {exc}") from None

        def __exit__(self, typ: object, exc: object, tb: object) -> None:
            try:
                self.s._db.execute("COMMIT" if typ is None else "ROLLBACK")
            except sqlite3.Error as e:
                raise AemError(errors.STORE, f"store write failed: {e}") from None
            finally:
                self.s._lock.release()
            if isinstance(exc, sqlite3.Error):
                raise AemError(errors.STORE, f"store error: {exc}") from exc

    def _tx(self) -> LogStore._Tx:
        return LogStore._Tx(self)

    # -- inserting ------------------------------------------------------------

    def insert(self, item: bytes | Entry) -> InsertResult:
        """Verify and store one entry, in its own transaction."""
        with self._tx():
            return self._insert(as_bytes(item))

    def insert_many(self, items: Iterable[bytes | Entry]) -> list[InsertResult]:
        """Verify and store several entries in one transaction (a sync batch)."""
        with self._tx():
            return [self._insert(as_bytes(i)) for i in items]

    def append_local(self, key, obj: Signed, ts: int) -> Entry:
        """Author the node's next entry holding ``obj``: seq and prev after its
        own head, Lamport clock one more than the largest stored. Refused if
        the store holds entries of this author that are not linked, or a
        fork: authoring then could equivocate."""
        with self._tx():
            me = key.public
            db = self._db
            if (db.execute("SELECT 1 FROM entries WHERE author = ? AND state = 1 LIMIT 1", (me,)).fetchone()
                    or db.execute("SELECT 1 FROM entries WHERE author = ? AND state = 2 LIMIT 1",
                                  (me,)).fetchone()):
                raise AemError(errors.REFUSED, "own feed has entries that do not link; sync before authoring")
            if db.execute("SELECT 1 FROM forks WHERE author = ?", (me,)).fetchone():
                raise AemError(errors.REFUSED, "own feed is forked")
            row = db.execute("SELECT h.seq, h.id, e.lamport FROM heads h JOIN entries e ON e.id = h.id "
                             "WHERE h.author = ?", (me,)).fetchone()
            seq, prev, own = (row[0] + 1, row[1], row[2]) if row else (0, b"", -1)
            # One more than the largest clock seen, counting only entries
            # within this node's bound (an entry far ahead, from any author,
            # can never leave this node without a valid clock) and never
            # below its own last entry's.
            top = db.execute("SELECT MAX(lamport) FROM entries WHERE lamport <= ?",
                             (min(local_clock_cap(ts), 2**62),)).fetchone()[0]
            lamport = max(own, -1 if top is None else top) + 1
            if not lamport_fits(lamport, ts):
                raise AemError(errors.REFUSED, f"own last entry's clock {own} is ahead of this "
                                               f"node's time {ts}: check the system clock")
            e = make_entry(key, self.ctx.net, seq, prev, lamport, ts, obj)
            r = self._insert(e.encode())
            if r.status is not Status.ADDED:
                raise AemError(r.code or errors.STORE, f"own entry not added: {r.status.value}")
            return e

    def _insert(self, data: bytes) -> InsertResult:
        try:
            e = check_envelope(data, self.ctx)
        except AemError as exc:
            return InsertResult(Status.REJECTED, b"", exc.code)
        eid = H(data)
        db = self._db
        if db.execute("SELECT 1 FROM entries WHERE id = ?", (eid,)).fetchone():
            return InsertResult(Status.DUPLICATE, eid)
        state = LINKED
        if e.seq > 0:
            p = db.execute("SELECT author, seq, lamport, state FROM entries WHERE id = ?",
                           (e.prev,)).fetchone()
            if p is None or p[0] != e.author:
                state = HELD             # predecessor not here (yet)
            elif not links(p[1], p[2], e.seq, e.lamport) or p[3] == BROKEN:
                return InsertResult(Status.REJECTED, eid, errors.BAD_CHAIN)
            elif p[3] == HELD:
                state = HELD
        if state == HELD:
            total = db.execute("SELECT COUNT(*) FROM entries WHERE state = 1").fetchone()[0]
            mine = db.execute("SELECT COUNT(*) FROM entries WHERE author = ? AND state = 1",
                              (e.author,)).fetchone()[0]
            if total >= MAX_HELD or mine >= MAX_HELD_PER_AUTHOR:
                return InsertResult(Status.REJECTED, eid, errors.REFUSED)
        fact = examine_entry(e, eid, self.ctx)
        db.execute("INSERT INTO entries (id, author, seq, prev, lamport, state, data, fact, kind) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   (eid, e.author, e.seq, e.prev, e.lamport, state, data, pack_fact(fact), e.kind))
        if state == HELD:
            return InsertResult(Status.HELD, eid)
        forked, promoted = self._linked(e.author, e.seq, eid, e.lamport)
        return InsertResult(Status.EQUIVOCATION if forked else Status.ADDED, eid, None, promoted)

    def _linked(self, author: bytes, seq: int, eid: bytes, lamport: int) -> tuple[bool, int]:
        """An entry just became linked: record a fork if it makes one, then
        link the held entries waiting for it (and theirs, and so on)."""
        db = self._db
        forked = self._note_fork(author, seq, eid)
        promoted = 0
        todo = [(eid, seq, lamport)]
        while todo:
            pid, pseq, plam = todo.pop()
            for cid, cauthor, cseq, clam in db.execute(
                    "SELECT id, author, seq, lamport FROM entries WHERE prev = ? AND state = 1",
                    (pid,)).fetchall():
                if cauthor != author:
                    continue
                if not links(pseq, plam, cseq, clam):
                    db.execute("UPDATE entries SET state = 2 WHERE id = ?", (cid,))
                    continue
                db.execute("UPDATE entries SET state = 0 WHERE id = ?", (cid,))
                self._note_fork(author, cseq, cid)
                promoted += 1
                todo.append((cid, cseq, clam))
        return forked, promoted

    def _note_fork(self, author: bytes, seq: int, eid: bytes) -> bool:
        """Record a newly linked entry: the author's head, and a fork if
        another linked entry holds the same seq."""
        db = self._db
        db.execute("INSERT INTO heads VALUES (?, ?, ?) ON CONFLICT(author) DO UPDATE SET "
                   "seq = excluded.seq, id = excluded.id WHERE excluded.seq > heads.seq OR "
                   "(excluded.seq = heads.seq AND excluded.id < heads.id)", (author, seq, eid))
        other = db.execute("SELECT 1 FROM entries WHERE author = ? AND seq = ? AND state = 0 "
                           "AND id != ? LIMIT 1", (author, seq, eid)).fetchone()
        if other is None:
            return False
        db.execute("INSERT INTO forks VALUES (?, ?) ON CONFLICT(author) DO UPDATE "
                   "SET seq = MIN(seq, excluded.seq)", (author, seq))
        return True

    # -- queries for sync -------------------------------------------------------

    def frontiers(self) -> dict[bytes, tuple[int, bytes]]:
        """author -> (largest linked seq, id of that entry); for an author
        that forked, (its fork seq, ``FORK_HEAD``), which no entry matches,
        so every peer not frozen there fetches the evidence."""
        with self._lock:
            rows = self._db.execute("SELECT author, seq, id FROM heads").fetchall()
            forks = self._db.execute("SELECT author, seq FROM forks").fetchall()
        out = {a: (s, i) for a, s, i in rows}
        for a, s in forks:
            out[a] = (s, FORK_HEAD)
        return out

    def linked_ids(self, pairs: Iterable[tuple[bytes, int]]) -> dict[tuple[bytes, int], set[bytes]]:
        """Ids of the linked entries at each (author, seq) (two or more where
        the author forked): what sync compares a peer's chain with."""
        out: dict[tuple[bytes, int], set[bytes]] = {}
        with self._lock:
            for author, seq in pairs:
                out[(author, seq)] = {r[0] for r in self._db.execute(
                    "SELECT id FROM entries WHERE author = ? AND seq = ? AND state = 0", (author, seq))}
        return out

    def range(self, author: bytes, from_seq: int, limit: int) -> list[bytes]:
        """Bytes of ``author``'s entries with seq >= from_seq, linked or held,
        both sides of a fork, by (seq, id); at most ``limit``."""
        limit = max(0, min(limit, MAX_RANGE))
        with self._lock:
            return [r[0] for r in self._db.execute(
                "SELECT data FROM entries WHERE author = ? AND seq >= ? AND state != 2 "
                "ORDER BY seq, id LIMIT ?", (author, from_seq, limit))]

    def get(self, eid: bytes) -> bytes | None:
        with self._lock:
            r = self._db.execute("SELECT data FROM entries WHERE id = ?", (eid,)).fetchone()
        return r[0] if r else None

    def count(self) -> int:
        """Entries stored (linked, held and broken)."""
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]

    def count_held(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM entries WHERE state = 1").fetchone()[0]

    def forks(self) -> dict[bytes, int]:
        with self._lock:
            return dict(self._db.execute("SELECT author, seq FROM forks"))

    def max_lamport(self) -> int:
        with self._lock:
            v = self._db.execute("SELECT MAX(lamport) FROM entries").fetchone()[0]
        return -1 if v is None else v

    def iter_entries(self, batch: int = 1000) -> Iterator[bytes]:
        """Every stored entry except broken ones, by (author, seq, id)."""
        last = (b"", -1, b"")
        while True:
            with self._lock:
                rows = self._db.execute(
                    "SELECT author, seq, id, data FROM entries WHERE state != 2 AND "
                    "(author, seq, id) > (?, ?, ?) ORDER BY author, seq, id LIMIT ?",
                    (*last, batch)).fetchall()
            if not rows:
                return
            for r in rows:
                yield r[3]
            last = rows[-1][:3]

    def facts(self) -> list[Fact]:
        with self._lock:
            return [unpack_fact(r[0]) for r in self._db.execute("SELECT fact FROM entries ORDER BY rowid")]

    # -- admission ----------------------------------------------------------------

    def admission_marker(self) -> tuple[int, int, int]:
        """Changes whenever the applied manifests and admission reports may
        have: linked entries of those kinds only ever grow in number, and a
        fork is only ever added or moved down."""
        with self._lock:
            n = self._db.execute(f"SELECT COUNT(*) FROM entries WHERE {_ADMISSION_WHERE} "
                                 "AND state = 0").fetchone()[0]
            k, s = self._db.execute("SELECT COUNT(*), COALESCE(SUM(seq), 0) FROM forks").fetchone()
        return n, k, s

    def admission_entries(self) -> list[tuple[Fact, bytes]]:
        """(fact, bytes) of the linked manifest and admission entries below
        their author's fork: those of the applied feeds as of any time
        (``ledger.admission.admission_of_applied`` takes them as they are)."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT e.fact, e.data FROM entries e LEFT JOIN forks k ON k.author = e.author "
                f"WHERE e.{_ADMISSION_WHERE} AND e.state = 0 AND (k.seq IS NULL OR e.seq < k.seq)").fetchall()
        return [(unpack_fact(f), d) for f, d in rows]

    def linked_of_kind(self, kind: str) -> list[bytes]:
        """The bytes of every linked entry of one body kind (the ledger's
        state says which of them apply): e.g. the inference receipts a
        contribution's counted uses are read from."""
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT data FROM entries WHERE kind = ? AND state = 0 "
                                                   "ORDER BY rowid", (kind,))]

    # -- replay -----------------------------------------------------------------

    def replay(self, as_of: int, *, check: bool = False,
               progress: Callable[[int], None] | None = None) -> ReplayResult:
        """Replay the store as of ``as_of``, continuing from the last
        checkpoint (in memory, else the saved one), so the cost follows the
        entries added since. Same result as ``ledger.replay`` over every
        stored entry."""
        with self._lock:
            ck, mark = self._checkpoint()
            rows = self._db.execute("SELECT rowid, fact FROM entries WHERE rowid > ? ORDER BY rowid",
                                    (mark,)).fetchall()
        new = []
        for n, (_, f) in enumerate(rows, 1):
            new.append(unpack_fact(f))
            if progress is not None and n % 4096 == 0:
                progress(n)
        top = rows[-1][0] if rows else mark
        if ck is not None:
            ck = dataclasses.replace(ck, base=self._facts_upto(top))
            res = replay(self.genesis, new, as_of, checkpoint=ck, check=check)
        else:
            res = replay(self.genesis, new, as_of, check=check)
        with self._lock:
            if self._ck is None or (res.checkpoint.as_of >= self._ck.as_of and top >= self._ck_mark):
                self._ck = dataclasses.replace(res.checkpoint, base=None)
                self._ck_mark = top
            if self._ck_mark - self._saved_mark >= max(CHECKPOINT_EVERY, self._saved_mark // 10):
                self._save_checkpoint()
        return res

    def state_root(self, as_of: int) -> bytes:
        return self.replay(as_of).state_root

    def _facts_upto(self, top: int) -> Callable[[], list[Fact]]:
        def load() -> list[Fact]:
            with self._lock:
                return [unpack_fact(r[0]) for r in self._db.execute(
                    "SELECT fact FROM entries WHERE rowid <= ? ORDER BY rowid", (top,))]
        return load

    def _checkpoint(self) -> tuple[Checkpoint | None, int]:
        if self._ck is not None:
            return self._ck, self._ck_mark
        r = self._db.execute("SELECT watermark, data FROM checkpoint WHERE id = 1").fetchone()
        if r is None:
            return None, 0
        try:
            ck = Checkpoint.from_bytes(r[1])
        except AemError:
            return None, 0
        if ck.net != self.ctx.net:
            return None, 0
        self._ck, self._ck_mark = ck, r[0]
        self._saved_mark = r[0]
        return ck, r[0]

    def _save_checkpoint(self) -> None:
        """Save the checkpoint in memory if it covers more than the saved one."""
        if self._ck is None or self._ck_mark <= self._saved_mark:
            return
        data = self._ck.to_bytes()
        with self._tx():
            cur = self._db.execute("SELECT watermark FROM checkpoint WHERE id = 1").fetchone()
            if cur is None or cur[0] <= self._ck_mark:
                self._db.execute("INSERT OR REPLACE INTO checkpoint VALUES (1, ?, ?, ?)",
                                 (self._ck_mark, self._ck.as_of, data))
        self._saved_mark = self._ck_mark

    def save_checkpoint(self) -> None:
        with self._lock:
            self._save_checkpoint()

    # -- verification -----------------------------------------------------------

    def verify(self, progress: Callable[[int], None] | None = None) -> VerifyReport:
        """Check every stored entry again from its bytes: envelope and
        signatures, id, chain link, and the body's own checks. Reports forks."""
        rep = VerifyReport(forks=self.forks(), bad=[], refused={})
        last = 0
        while True:
            with self._lock:
                rows = self._db.execute(
                    "SELECT rowid, id, author, seq, prev, lamport, state, data FROM entries "
                    "WHERE rowid > ? ORDER BY rowid LIMIT 2000", (last,)).fetchall()
                preds = {}
                for r in rows:
                    if r[3] > 0 and r[6] == LINKED:
                        p = self._db.execute("SELECT author, seq, lamport, state FROM entries WHERE id = ?",
                                             (r[4],)).fetchone()
                        preds[r[1]] = p
            if not rows:
                break
            for rowid, eid, author, seq, prev, lamport, state, data in rows:
                rep.entries += 1
                last = rowid
                rep.linked += state == LINKED
                rep.held += state == HELD
                rep.broken += state == BROKEN
                f = examine(data, self.ctx)
                if f.author is None:
                    rep.bad.append((eid, f.code))
                    continue
                if f.id != eid or f.author != author or f.seq != seq or f.prev != prev or f.lamport != lamport:
                    rep.bad.append((eid, errors.STORE))
                    continue
                if state == LINKED and seq > 0:
                    p = preds[eid]
                    if p is None or p[0] != author or not links(p[1], p[2], seq, lamport) or p[3] != LINKED:
                        rep.bad.append((eid, errors.BAD_CHAIN))
                        continue
                if f.code is not None:
                    rep.refused[f.code] = rep.refused.get(f.code, 0) + 1
            if progress is not None:
                progress(rep.entries)
        return rep

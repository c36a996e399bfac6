"""The node's log in the simulator, behind the ``Call`` ops of
protocol/syncsession.py (``frontiers``, ``range``, ``linked_ids``,
``insert_batch``) plus what the simulated node itself uses
(``append_local``, ``replay``, ``forks``, ``count``, ``max_lamport``).

Two implementations, chosen per mesh:

* :class:`StoreLog` -- the real ``ledger.store.LogStore`` on an in-memory
  SQLite database: real verification, real held/linked/broken states, real
  fork recording. Scenario tests use it.
* :class:`MemLog` -- a dict-based log with the same link and fork rules
  (``ledger.feeds.links``, the store's head and fork bookkeeping) for meshes
  of hundreds or thousands of nodes, where SQLite per node is too slow. An
  entry's verification (``check_envelope`` then ``examine_entry``) is a pure
  function of its bytes, so its result is memoised in a :class:`VerifyMemo`
  shared by every node of the mesh: the first node pays for the signatures,
  the others for a dict lookup.

A crash loses nothing that a ``Call`` already stored: each insert is atomic
in the simulator (one event), like the store's one transaction per batch.
"""

from __future__ import annotations

from crypto.hashing import H
from ledger.facts import Context, Fact, check_envelope, examine_entry, lamport_fits, local_clock_cap
from ledger.feeds import links
from ledger.replay import ReplayResult, replay
from ledger.store import MAX_HELD, MAX_HELD_PER_AUTHOR, MAX_RANGE, LogStore, Status
from protocol import errors
from protocol.entry import Entry, make_entry
from protocol.errors import AemError
from protocol.genesis import Genesis
from protocol.sync import FORK_HEAD

LINKED, HELD, BROKEN = 0, 1, 2


class StoreLog:
    """The real store, in memory."""

    kind = "store"

    def __init__(self, genesis: Genesis) -> None:
        self.genesis = genesis
        self.store = LogStore.open(":memory:", genesis)

    def frontiers(self) -> dict[bytes, tuple[int, bytes]]:
        return self.store.frontiers()

    def range(self, author: bytes, from_seq: int, limit: int) -> list[bytes]:
        return self.store.range(author, from_seq, limit)

    def linked_ids(self, pairs) -> dict:
        return self.store.linked_ids(pairs)

    def insert_batch(self, entries: list[bytes]) -> tuple[int, int]:
        # As aemd/storeaccess.py: a refusal for lack of room is not the peer's fault.
        results = self.store.insert_many(entries)
        added = sum(1 for r in results if r.stored)
        bad = sum(1 for r in results if r.status is Status.REJECTED and r.code != errors.REFUSED)
        return added, bad

    def insert_one(self, data: bytes) -> Status:
        return self.store.insert(data).status

    def append_local(self, key, obj, ts: int) -> Entry:
        return self.store.append_local(key, obj, ts)

    def replay(self, as_of: int) -> ReplayResult:
        return self.store.replay(as_of)

    def forks(self) -> dict[bytes, int]:
        return self.store.forks()

    def count(self) -> int:
        return self.store.count()

    def all_entries(self) -> list[bytes]:
        """Every stored entry's bytes, held or linked (the pure admission
        replay's input)."""
        with self.store._lock:
            return [bytes(r[0]) for r in self.store._db.execute("SELECT data FROM entries").fetchall()]

    def admission(self):
        """The store's own admission state (the daemon's path, ledger/store.py)."""
        from ledger.admission import admission_of_applied
        return admission_of_applied(self.genesis, self.store.admission_entries())

    def max_lamport(self) -> int:
        return self.store.max_lamport()

    def close(self) -> None:
        self.store.close()


class VerifyMemo:
    """Entry bytes -> (id, Entry or None, error code, Fact): identical bytes
    verify identically on every node, so a mesh checks each entry once."""

    def __init__(self, genesis: Genesis) -> None:
        self.ctx = Context.of(genesis)
        self._memo: dict[bytes, tuple] = {}
        self.verified = 0

    def check(self, data: bytes) -> tuple:
        got = self._memo.get(data)
        if got is None:
            self.verified += 1
            eid = H(data)
            try:
                e = check_envelope(data, self.ctx)
                got = (eid, e, None, examine_entry(e, eid, self.ctx))
            except AemError as exc:
                got = (eid, None, exc.code, None)
            self._memo[data] = got
        return got


class _Rec:
    __slots__ = ("id", "author", "seq", "prev", "lamport", "state", "data", "fact")

    def __init__(self, eid, e: Entry, state: int, data: bytes, fact: Fact) -> None:
        self.id, self.author, self.seq, self.prev, self.lamport = eid, e.author, e.seq, e.prev, e.lamport
        self.state, self.data, self.fact = state, data, fact


class MemLog:
    """A dict-based log with the store's rules, for large meshes."""

    kind = "mem"

    def __init__(self, genesis: Genesis, memo: VerifyMemo | None = None) -> None:
        self.genesis = genesis
        self.memo = memo or VerifyMemo(genesis)
        self.ctx = self.memo.ctx
        self.by_id: dict[bytes, _Rec] = {}
        self.at: dict[tuple[bytes, int], list[bytes]] = {}       # (author, seq) -> ids, linked or held
        self.top: dict[bytes, int] = {}                           # author -> largest seq stored
        self.heads: dict[bytes, tuple[int, bytes]] = {}
        self._forks: dict[bytes, int] = {}
        self.waiting: dict[bytes, list[bytes]] = {}               # prev -> held ids
        self.held: dict[bytes, int] = {}                          # author -> held count
        self.n_held = 0
        self.max_lam = -1
        self.bytes_stored = 0

    # -- the sync ops -------------------------------------------------------------

    def frontiers(self) -> dict[bytes, tuple[int, bytes]]:
        out = dict(self.heads)
        for a, s in self._forks.items():
            out[a] = (s, FORK_HEAD)
        return out

    def range(self, author: bytes, from_seq: int, limit: int) -> list[bytes]:
        limit = max(0, min(limit, MAX_RANGE))
        out: list[bytes] = []
        top = self.top.get(author, -1)
        seq = max(0, from_seq)
        while seq <= top and len(out) < limit:
            for eid in sorted(self.at.get((author, seq), ())):
                r = self.by_id[eid]
                if r.state != BROKEN and len(out) < limit:
                    out.append(r.data)
            seq += 1
        return out

    def linked_ids(self, pairs) -> dict:
        out = {}
        for author, seq in pairs:
            out[(author, seq)] = {i for i in self.at.get((author, seq), ()) if self.by_id[i].state == LINKED}
        return out

    def insert_batch(self, entries: list[bytes]) -> tuple[int, int]:
        added = bad = 0
        for data in entries:
            st, code = self._insert(data)
            if st in (Status.ADDED, Status.HELD, Status.EQUIVOCATION):
                added += 1
            elif st is Status.REJECTED and code != errors.REFUSED:
                bad += 1
        return added, bad

    def insert_one(self, data: bytes) -> Status:
        return self._insert(data)[0]

    # -- the node's own ops -------------------------------------------------------------

    def append_local(self, key, obj, ts: int) -> Entry:
        me = key.public
        if self.held.get(me) or any(r.state == BROKEN for r in self._of(me)):
            raise AemError(errors.REFUSED, "own feed has entries that do not link; sync before authoring")
        if me in self._forks:
            raise AemError(errors.REFUSED, "own feed is forked")
        h = self.heads.get(me)
        seq, prev, own = (h[0] + 1, h[1], self.by_id[h[1]].lamport) if h else (0, b"", -1)
        cap = min(local_clock_cap(ts), 2**62)
        top = self.max_lam if self.max_lam <= cap else max(
            (r.lamport for r in self.by_id.values() if r.lamport <= cap), default=-1)
        lamport = max(own, top) + 1
        if not lamport_fits(lamport, ts):
            raise AemError(errors.REFUSED, "own clock ahead of this node's time")
        e = make_entry(key, self.ctx.net, seq, prev, lamport, ts, obj)
        st, code = self._insert(e.encode())
        if st is not Status.ADDED:
            raise AemError(code or errors.STORE, f"own entry not added: {st.value}")
        return e

    def replay(self, as_of: int) -> ReplayResult:
        return replay(self.genesis, [r.fact for r in self.by_id.values()], as_of)

    def forks(self) -> dict[bytes, int]:
        return dict(self._forks)

    def count(self) -> int:
        return len(self.by_id)

    def all_entries(self) -> list[bytes]:
        return [r.data for r in self.by_id.values()]

    def admission(self):
        from ledger.admission import replay_admission
        return replay_admission(self.genesis, self.all_entries())

    def max_lamport(self) -> int:
        return self.max_lam

    def close(self) -> None:
        pass

    # -- internals ----------------------------------------------------------------------

    def _of(self, author: bytes):
        for s in range(self.top.get(author, -1) + 1):
            for i in self.at.get((author, s), ()):
                yield self.by_id[i]

    def _insert(self, data: bytes) -> tuple[Status, str | None]:
        if type(data) is not bytes:
            return Status.REJECTED, errors.BAD_TYPE
        eid, e, code, fact = self.memo.check(data)
        if e is None:
            return Status.REJECTED, code
        if eid in self.by_id:
            return Status.DUPLICATE, None
        state = LINKED
        if e.seq > 0:
            p = self.by_id.get(e.prev)
            if p is None or p.author != e.author:
                state = HELD
            elif not links(p.seq, p.lamport, e.seq, e.lamport) or p.state == BROKEN:
                return Status.REJECTED, errors.BAD_CHAIN
            elif p.state == HELD:
                state = HELD
        if state == HELD and (self.n_held >= MAX_HELD or self.held.get(e.author, 0) >= MAX_HELD_PER_AUTHOR):
            return Status.REJECTED, errors.REFUSED
        r = _Rec(eid, e, state, data, fact)
        self.by_id[eid] = r
        self.at.setdefault((e.author, e.seq), []).append(eid)
        self.top[e.author] = max(self.top.get(e.author, -1), e.seq)
        self.max_lam = max(self.max_lam, e.lamport)
        self.bytes_stored += len(data)
        if state == HELD:
            self.waiting.setdefault(e.prev, []).append(eid)
            self.held[e.author] = self.held.get(e.author, 0) + 1
            self.n_held += 1
            return Status.HELD, None
        forked = self._linked(r)
        return (Status.EQUIVOCATION if forked else Status.ADDED), None

    def _linked(self, r: _Rec) -> bool:
        forked = self._note(r)
        todo = [r]
        while todo:
            p = todo.pop()
            for cid in self.waiting.pop(p.id, ()):
                c = self.by_id[cid]
                if c.state != HELD or c.author != p.author:
                    continue
                self.held[c.author] -= 1
                self.n_held -= 1
                if not links(p.seq, p.lamport, c.seq, c.lamport):
                    c.state = BROKEN
                    continue
                c.state = LINKED
                self._note(c)
                todo.append(c)
        return forked

    def _note(self, r: _Rec) -> bool:
        h = self.heads.get(r.author)
        if h is None or r.seq > h[0] or (r.seq == h[0] and r.id < h[1]):
            self.heads[r.author] = (r.seq, r.id)
        other = any(i != r.id and self.by_id[i].state == LINKED for i in self.at[(r.author, r.seq)])
        if not other:
            return False
        self._forks[r.author] = min(self._forks.get(r.author, r.seq), r.seq)
        return True

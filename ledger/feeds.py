"""Which entries form each author's applied feed, and in what order replay
takes them. Pure: facts and an as-of time in, an extension of the feeds out.

For one author A, over the entries of A that a peer holds (see
``specs/ledger.md`` section 3):

- the *predecessor* of an entry x at seq > 0 is A's entry whose id is
  ``x.prev``. x is *linked* when its seq is 0, or its predecessor exists, has
  seq ``x.seq - 1`` and a smaller Lamport clock, and is linked itself;
- A *forks* at the least seq holding two or more linked entries; from that seq
  on nothing of A is applied (code EQUIVOCATION), whichever entry came first;
- the *applied feed* of A is its linked entries below the fork, in seq order,
  up to (not including) the first whose ``ts`` is after as-of (code FUTURE).

Everything here works per author and only looks at entries beyond what a
:class:`Feed` has already applied, so the same code does a full replay
(from empty feeds) and an incremental one (from a checkpoint's feeds). When
new entries would change what was already applied (a fork below the applied
head), it says so by raising :class:`Rewind`, and the caller replays in full.
"""

from __future__ import annotations

from typing import Iterable

from ledger import reasons
from ledger.facts import Fact, order_key


def links(prev_seq: int, prev_lamport: int, seq: int, lamport: int) -> bool:
    """Whether an entry at (seq, lamport) fits after its predecessor, found
    by ``prev`` among its author's entries (``specs/ledger.md`` sections 2-3):
    the predecessor is at seq - 1 and has a smaller Lamport clock. The one
    home of this rule: the store (insert, promotion, verify) and replay
    both call it, so they cannot drift apart."""
    return prev_seq == seq - 1 and prev_lamport < lamport


class Rewind(Exception):
    """New entries change the past of a checkpoint: replay everything."""


class Feed:
    """What replay keeps of one author: its applied feed (ids by position and
    Lamport clocks) and every other entry of that author it holds (``rest``),
    whose codes are in the caller's notes."""

    __slots__ = ("pos", "lamports", "head", "rest", "fork")

    def __init__(self) -> None:
        self.pos: dict[bytes, int] = {}        # applied entry id -> seq
        self.lamports: list[int] = []          # Lamport clock of the applied entry at each seq
        self.head: bytes = b""                 # id of the last applied entry
        self.rest: dict[bytes, Fact] = {}      # held, future, forked, broken entries
        self.fork: int | None = None           # least seq with two linked entries

    def copy(self) -> Feed:
        c = Feed()
        c.pos, c.lamports, c.head = dict(self.pos), list(self.lamports), self.head
        c.rest, c.fork = dict(self.rest), self.fork
        return c

    def to_list(self) -> list:
        ids = [b""] * len(self.lamports)
        for i, s in self.pos.items():
            ids[s] = i
        return [ids, self.lamports, [tuple(f) for f in self.rest.values()], self.fork]

    @classmethod
    def from_list(cls, v: list) -> Feed:
        f = cls()
        ids, f.lamports, rest, f.fork = list(v[0]), list(v[1]), v[2], v[3]
        f.pos = {i: s for s, i in enumerate(ids)}
        f.head = ids[-1] if ids else b""
        f.rest = {t[0]: Fact(*t) for t in rest}
        return f


def extend(feeds: dict[bytes, Feed], notes: dict[bytes, str], new: Iterable[Fact],
           as_of: int, recheck: Iterable[bytes] = ()) -> list[Fact]:
    """Add ``new`` facts (envelope-valid ones; others are noted with their
    code) to ``feeds``, mutating ``feeds`` and ``notes``; return the facts
    that join the applied feeds, in replay order.

    ``recheck`` names authors to re-examine even without new entries (those
    with entries held back as FUTURE when as-of has moved on). Raises
    :class:`Rewind` when a new entry forks an author below its applied head.
    """
    by_author: dict[bytes, list[Fact]] = {}
    for f in new:
        if f.author is None:
            notes[f.id] = f.code or reasons.BAD_CHAIN
            continue
        by_author.setdefault(f.author, []).append(f)
    for a in recheck:
        by_author.setdefault(a, [])
    joined: list[Fact] = []
    for author, facts in by_author.items():
        feed = feeds.get(author)
        if feed is None:
            feed = feeds[author] = Feed()
        joined.extend(_extend_one(feed, notes, facts, as_of))
    joined.sort(key=order_key)
    return joined


def _extend_one(feed: Feed, notes: dict[bytes, str], new: list[Fact], as_of: int) -> list[Fact]:
    if not feed.rest and new:
        joined = _continue_chain(feed, notes, new, as_of)
        if joined is not None:
            return joined
    pos, lamports, rest = feed.pos, feed.lamports, feed.rest
    last = len(lamports) - 1
    fresh = False
    for x in new:
        if x.id in pos or x.id in rest:
            continue  # held already
        ps = pos.get(x.prev)
        if x.seq <= last and (x.seq == 0 or (ps is not None
                                            and links(ps, lamports[ps], x.seq, x.lamport))):
            # A second linked entry at an applied seq: the author forked below
            # what has been applied, which changes the past.
            raise Rewind()
        rest[x.id] = x
        fresh = True
    if not fresh and not any(n == reasons.FUTURE for n in (notes.get(i) for i in rest)):
        return []

    # Status of every held entry, in seq order so a predecessor comes first.
    status: dict[bytes, str | None] = {}   # None: linked
    linked_at: dict[int, list[Fact]] = {}
    for x in sorted(rest.values(), key=lambda f: f.seq):
        if x.seq == 0:
            st: str | None = None
        else:
            ps = pos.get(x.prev)
            if ps is not None:
                # Only the head can be a proper predecessor here: a proper
                # predecessor below it would have raised Rewind above.
                st = None if ps == last and links(ps, lamports[ps], x.seq, x.lamport) else reasons.BAD_CHAIN
            else:
                p = rest.get(x.prev)
                if p is None:
                    st = reasons.UNLINKED
                elif not links(p.seq, p.lamport, x.seq, x.lamport):
                    st = reasons.BAD_CHAIN
                else:
                    st = status[p.id]
        status[x.id] = st
        if st is None:
            linked_at.setdefault(x.seq, []).append(x)
    forks = [s for s, xs in linked_at.items() if len(xs) > 1]
    fork = min(forks) if forks else None
    feed.fork = fork

    joined: list[Fact] = []
    s = last + 1
    while True:
        xs = linked_at.get(s)
        if not xs or len(xs) != 1 or (fork is not None and s >= fork) or xs[0].ts > as_of:
            break
        x = xs[0]
        joined.append(x)
        del rest[x.id]
        notes.pop(x.id, None)
        pos[x.id] = s
        lamports.append(x.lamport)
        feed.head = x.id
        s += 1
    for x in rest.values():
        st = status[x.id]
        if fork is not None and x.seq >= fork:
            notes[x.id] = reasons.EQUIVOCATION
        elif st is not None:
            notes[x.id] = st
        else:
            notes[x.id] = reasons.FUTURE
    return joined


def _continue_chain(feed: Feed, notes: dict[bytes, str], new: list[Fact], as_of: int) -> list[Fact] | None:
    """The common case, without the general bookkeeping: the new entries
    continue the feed's head one seq after another, each linking to the one
    before. Returns None (having changed nothing) when that is not so."""
    xs = sorted(new, key=lambda f: f.seq)
    s = len(feed.lamports)
    prev_id, prev_lam = feed.head, feed.lamports[-1] if feed.lamports else -1
    for x in xs:
        if x.seq != s or (s > 0 and (x.prev != prev_id or not links(s - 1, prev_lam, x.seq, x.lamport))):
            return None
        prev_id, prev_lam, s = x.id, x.lamport, s + 1
    joined: list[Fact] = []
    pos, lamports = feed.pos, feed.lamports
    for i, x in enumerate(xs):
        if x.ts > as_of:
            for y in xs[i:]:
                feed.rest[y.id] = y
                notes[y.id] = reasons.FUTURE
            break
        pos[x.id] = x.seq
        lamports.append(x.lamport)
        feed.head = x.id
        joined.append(x)
    return joined

"""The CreditLedger state that replay builds, its invariants, and its root.

All amounts are integers of micro-credits. Every change of a balance goes
through the four methods of :class:`LedgerState` that keep running totals,
so the conservation invariant (available + pending over all accounts equals
granted + minted - burned) is checked in O(1) after every entry, and no
available or pending balance can go below zero without :class:`InvariantError`
being raised. These checks are ordinary code, never ``assert``: they run
under ``python -O`` too, since a broken rule must stop replay, not pass
silently into a state root.

The state root (``specs/ledger.md`` section 7) is a SHA-256 over fixed-width,
sorted records of the final state; a second implementation reproduces it
from the spec alone.
"""

from __future__ import annotations

import heapq
import struct
from collections import ChainMap
from typing import Any

from crypto.hashing import H
from protocol import errors
from protocol.errors import AemError

# v2: the rejected section commits to which entries a rule refused, not to
# the code that refused them (specs/ledger.md section 7).
STATE_ROOT_TAG = b"aem-ledger-state-v2\x00"

# Receipt status in LedgerState.receipts.
PENDING, SETTLED, VOIDED = 0, 1, 2

_U64 = struct.Struct(">Q")


class InvariantError(AemError):
    """A ledger invariant does not hold: a bug in a rule, never bad input."""

    def __init__(self, detail: str) -> None:
        super().__init__(errors.INVARIANT, detail)


def require(ok: bool, detail: str) -> None:
    """Check an invariant; unlike ``assert`` it also runs under ``python -O``."""
    if not ok:
        raise InvariantError(detail)


class LedgerState:
    """Balances and the bookkeeping the rules need; see the spec for each part."""

    def __init__(self) -> None:
        self.avail: dict[bytes, int] = {}
        self.pend: dict[bytes, int] = {}
        self.total_avail = 0
        self.total_pend = 0
        self.granted = 0
        self.minted = 0
        self.burned = 0                     # no v1 rule burns; kept for the invariant and the root
        # Applied inference receipts: id -> (host, payer, amount, settle_at, status).
        self.receipts: dict[bytes, tuple] = {}
        self.pending: set[bytes] = set()    # ids of receipts with status PENDING
        self.heap: list[tuple[int, bytes]] = []  # (settle_at, id) of pending, unchallenged receipts
        # Every receipt object in the applied feeds with its settlement time
        # (whether or not a rule applied it): what challenges can name.
        self.receipt_times: dict[bytes, int] = {}
        # Receipt id -> (order key, entry id) of the challenge that voids it.
        self.challenged: dict[bytes, tuple] = {}
        # Receipt id -> entry ids of challenges refused because no such receipt was known.
        self.orphans: dict[bytes, tuple] = {}
        self.spent: dict[bytes, bytes] = {}     # payer || spend_key -> receipt id
        # Payments (rules.challenge_pass): every known receipt's host || payer || spend_key;
        # receipt id || payer for every accepted ack; payer || spend_key -> the
        # acknowledged receipt that alone may charge it; receipts voided by a dispute.
        self.receipt_keys: dict[bytes, bytes] = {}
        self.acks: set[bytes] = set()
        self.preferred: dict[bytes, bytes] = {}
        self.disputed: set[bytes] = set()
        self.objects: set[bytes] = set()        # ids of applied objects
        self.contributions: set[tuple] = set()  # (content_commitment, eval_id, credit_basis) minted
        self.rejected: dict[bytes, str] = {}    # entry id -> rule code, for entries of the applied feeds
        self.clock = 0                          # replay clock: largest ts of the applied feeds so far
        self.applied = 0                        # entries of the applied feeds that a rule accepted
        self.feed_len = 0                       # entries of the applied feeds
        self.last_key: tuple | None = None      # order key of the last entry replayed

    # -- balance changes: the only four ways a balance moves ----------------

    def credit(self, acct: bytes, amount: int) -> None:
        self.avail[acct] = self.avail.get(acct, 0) + amount
        self.total_avail += amount

    def debit(self, acct: bytes, amount: int) -> None:
        left = self.avail.get(acct, 0) - amount
        if left < 0:
            raise InvariantError("available balance below zero")
        self.avail[acct] = left
        self.total_avail -= amount

    def pend_add(self, acct: bytes, amount: int) -> None:
        self.pend[acct] = self.pend.get(acct, 0) + amount
        self.total_pend += amount

    def pend_take(self, acct: bytes, amount: int) -> None:
        left = self.pend.get(acct, 0) - amount
        if left < 0:
            raise InvariantError("pending balance below zero")
        self.pend[acct] = left
        self.total_pend -= amount

    def check_conservation(self) -> None:
        if self.total_avail + self.total_pend != self.granted + self.minted - self.burned:
            raise InvariantError("conservation: balances do not add up to granted + minted - burned")

    def check_exhaustively(self) -> None:
        """Recompute every sum from the accounts (tests call this after each entry)."""
        require(sum(self.avail.values()) == self.total_avail, "available total drifted")
        require(sum(self.pend.values()) == self.total_pend, "pending total drifted")
        require(all(v >= 0 for v in self.avail.values()) and all(v >= 0 for v in self.pend.values()),
                "a balance is below zero")
        self.check_conservation()
        require(sum(r[2] for rid, r in self.receipts.items() if r[4] == PENDING) == self.total_pend,
                "pending receipts do not add up to the pending total")

    # -- settlement ------------------------------------------------------------

    def settle_due(self, until: int, events: list | None) -> None:
        """Settle every pending, unchallenged receipt whose time has come."""
        heap = self.heap
        while heap and heap[0][0] <= until:
            settle_at, rid = heapq.heappop(heap)
            r = self.receipts[rid]
            if r[4] != PENDING or rid in self.challenged:
                continue
            host, _, amount = r[0], r[1], r[2]
            self.pend_take(host, amount)
            self.credit(host, amount)
            self.receipts[rid] = r[:4] + (SETTLED,)
            self.pending.discard(rid)
            if events is not None:
                events.append(("settle", rid, host, amount, settle_at))

    # -- copies and storage ----------------------------------------------------

    def copy(self) -> LedgerState:
        c = LedgerState.__new__(LedgerState)
        for k, v in self.__dict__.items():
            c.__dict__[k] = v.copy() if isinstance(v, (dict, set, list)) else v
        return c

    def to_list(self) -> list:
        return [
            list(self.avail.items()), list(self.pend.items()), self.total_avail, self.total_pend,
            self.granted, self.minted, self.burned,
            [(k, *v) for k, v in self.receipts.items()], list(self.pending), self.heap,
            list(self.receipt_times.items()),
            [(k, v[0], v[1]) for k, v in self.challenged.items()],
            list(self.orphans.items()), list(self.spent.items()), list(self.objects),
            list(self.contributions), list(self.rejected.items()), self.clock, self.applied,
            self.feed_len, self.last_key,
            list(self.receipt_keys.items()), list(self.acks), list(self.preferred.items()),
            list(self.disputed),
        ]

    @classmethod
    def from_list(cls, v: list) -> LedgerState:
        s = cls()
        (avail, pend, s.total_avail, s.total_pend, s.granted, s.minted, s.burned, receipts, pending,
         heap, rtimes, challenged, orphans, spent, objects, contribs, rejected, s.clock, s.applied,
         s.feed_len, last_key, rkeys, acks, preferred, disputed) = v
        s.avail, s.pend = dict(avail), dict(pend)
        s.receipts = {t[0]: tuple(t[1:]) for t in receipts}
        s.pending = set(pending)
        s.heap = [tuple(x) for x in heap]
        heapq.heapify(s.heap)
        s.receipt_times = dict(rtimes)
        s.challenged = {t[0]: (tuple(t[1]), t[2]) for t in challenged}
        s.orphans = {k: tuple(x) for k, x in orphans}
        s.spent, s.objects = dict(spent), set(objects)
        s.contributions = {tuple(x) for x in contribs}
        s.rejected = dict(rejected)
        s.last_key = tuple(last_key) if last_key is not None else None
        s.receipt_keys, s.acks = dict(rkeys), set(acks)
        s.preferred, s.disputed = dict(preferred), set(disputed)
        return s


def final_view(state: LedgerState, as_of: int, events: list | None) -> LedgerState:
    """The state as of ``as_of``: a copy in which every pending, unchallenged
    receipt whose settlement time is <= as_of has settled. The argument is
    left as it was, so it can still be continued as a checkpoint."""
    due = [x for x in state.heap if x[0] <= as_of]
    if not due:
        return state
    v = LedgerState.__new__(LedgerState)
    v.__dict__.update(state.__dict__)
    # Copy-on-write overlays: settling k receipts writes k records, so the
    # view costs what falls due, not the size of the ledger (reads fall
    # through to the checkpoint's maps, which stay as they were).
    v.avail, v.pend, v.receipts = ChainMap({}, state.avail), ChainMap({}, state.pend), ChainMap({}, state.receipts)
    v.pending = set(state.pending)
    v.heap = sorted(due)
    v.settle_due(as_of, events)
    v.heap = []
    return v


def u64(n: int) -> bytes:
    return _U64.pack(n)


def state_root(state: LedgerState, net: bytes, as_of: int,
               frozen: dict[bytes, int]) -> bytes:
    """The state root of a final view (see specs/ledger.md section 7)."""
    accounts = b"".join(
        a + u64(state.avail.get(a, 0)) + u64(state.pend.get(a, 0))
        for a in sorted(set(state.avail) | set(state.pend))
        if state.avail.get(a, 0) or state.pend.get(a, 0))
    pending = b"".join(
        rid + r[0] + r[1] + u64(r[2]) + u64(r[3])
        for rid, r in sorted((rid, state.receipts[rid]) for rid in state.pending))
    spent = b"".join(k + rid for k, rid in sorted(state.spent.items()))
    objects = b"".join(sorted(state.objects))
    # Only the ids: which code refused an entry is diagnostic, so two
    # implementations that check a malformed entry's faults in another order
    # still agree on the root.
    rejected = b"".join(sorted(state.rejected))
    forks = b"".join(a + u64(s) for a, s in sorted(frozen.items()))
    return H(STATE_ROOT_TAG + net + u64(as_of) + u64(state.granted) + u64(state.minted)
             + u64(state.burned) + H(accounts) + H(pending) + H(spent) + H(objects)
             + H(rejected) + H(forks))


def jsonable_balances(state: LedgerState) -> dict[bytes, dict[str, Any]]:
    return {a: {"available": state.avail.get(a, 0), "pending": state.pend.get(a, 0)}
            for a in sorted(set(state.avail) | set(state.pend))
            if state.avail.get(a, 0) or state.pend.get(a, 0)}

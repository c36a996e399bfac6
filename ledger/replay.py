"""Replay: the CreditLedger as a pure function of (genesis, entries, as-of).

    result = replay(genesis, entries, as_of)

takes the entries (their bytes, ``Entry`` objects or already computed
``Fact``s) in any order, with duplicates, and returns balances, settlement
events, the entries not applied with their reason codes, and the state root
that two peers compare. No clock, no I/O: the same arguments give the same
result on every machine.

It runs in three steps, each in its own module:

1. ``ledger/facts.py``: decode and check every signature, entry by entry
   (optionally on several cores);
2. ``ledger/feeds.py``: link each author's entries into its feed, find forks,
   cut at as-of, and sort what applies by (lamport, author, seq);
3. ``ledger/rules.py``: decide challenges over the whole applied feed, then
   apply the entries one by one, settling receipts as the replay clock passes
   their settlement time, with the invariants checked after each entry.

Incremental replay: every result carries a :class:`Checkpoint`, the state
after step 3 (before the final settlement at as-of, which is computed on a
copy). ``replay(genesis, new_entries, as_of, checkpoint=ck)`` continues from
it in time proportional to the new entries, and gives exactly the result of a
full replay over all entries. When the new entries change the past (an entry
that sorts before the checkpoint, a fork below an applied head, a late
challenge of a receipt already settled, a receipt that an earlier refused
challenge named, or an earlier as-of) it replays everything from the
checkpoint's ``base`` instead, and says so in ``mode``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import msgpack

from ledger import reasons
from ledger.facts import Context, Fact, examine_many, order_key, paused_gc
from ledger.feeds import Feed, Rewind, extend
from ledger.rules import Params, apply, challenge_pass, genesis_state
from ledger.state import SETTLED, VOIDED, LedgerState, final_view, state_root
from protocol import errors
from protocol.entry import Entry
from protocol.errors import AemError
from protocol.genesis import Genesis

CHECKPOINT_VERSION = 1
MAX_AS_OF = 2**63 - 1

Item = bytes | Entry | Fact


@dataclass
class Checkpoint:
    """The replay state after a set of entries, before the final settlement.

    ``base`` is every fact the checkpoint covers, or a function returning
    them; it is only read when a continuation has to replay everything. It
    is not part of :meth:`to_bytes` (a store supplies its own).
    """
    net: bytes
    as_of: int
    feeds: dict[bytes, Feed]
    notes: dict[bytes, str]                 # entry id -> code, for entries not in the applied feeds
    state: LedgerState
    base: list[Fact] | Callable[[], Iterable[Fact]] | None = None

    def base_facts(self) -> list[Fact]:
        if self.base is None:
            raise AemError(errors.STORE, "checkpoint cannot be continued and has no base entries")
        return list(self.base()) if callable(self.base) else self.base

    def frozen(self) -> dict[bytes, int]:
        return {a: f.fork for a, f in self.feeds.items() if f.fork is not None}

    def future_authors(self) -> list[bytes]:
        return [a for a, f in self.feeds.items()
                if f.rest and any(self.notes.get(i) == reasons.FUTURE for i in f.rest)]

    def to_bytes(self) -> bytes:
        return msgpack.packb([
            CHECKPOINT_VERSION, self.net, self.as_of,
            [(a, f.to_list()) for a, f in self.feeds.items()],
            list(self.notes.items()), self.state.to_list(),
        ], use_bin_type=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> Checkpoint:
        try:
            v = msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=False)
            if v[0] != CHECKPOINT_VERSION:
                raise AemError(errors.STORE, f"checkpoint version {v[0]} is not {CHECKPOINT_VERSION}")
            return cls(net=v[1], as_of=v[2],
                       feeds={a: Feed.from_list(f) for a, f in v[3]},
                       notes=dict(v[4]), state=LedgerState.from_list(v[5]))
        except AemError:
            raise
        except Exception as exc:
            raise AemError(errors.STORE, f"unreadable checkpoint: {type(exc).__name__}") from None


@dataclass
class ReplayResult:
    """What a replay gives. ``balances`` (account -> (available, pending),
    non-zero ones) and ``rejected`` (entry id -> reason code, every entry not
    applied) are built on first use: a caller that asks one account's
    balance or one spend key (a task's admission check) pays for that
    alone, not for the size of the ledger."""
    as_of: int
    events: list[tuple]                      # produced by this call, in replay order
    entries: int                             # distinct entries covered
    feed_len: int                            # entries in the applied feeds (applied + refused by a rule)
    applied: int                             # entries a rule applied
    granted: int
    minted: int
    burned: int
    mode: str                                # "full", "incremental" or "rewound"
    checkpoint: Checkpoint = field(repr=False)
    _view: LedgerState | None = field(default=None, repr=False, compare=False)
    _root: bytes | None = field(default=None, repr=False, compare=False)
    _balances: dict | None = field(default=None, repr=False, compare=False)
    _rejected: dict | None = field(default=None, repr=False, compare=False)
    _frozen: dict | None = field(default=None, repr=False, compare=False)

    @property
    def frozen(self) -> dict[bytes, int]:
        """Author -> seq of its fork (every author's feed looked at once, on first use)."""
        if self._frozen is None:
            self._frozen = self.checkpoint.frozen()
        return self._frozen

    def _final(self) -> LedgerState:
        if self._view is None:
            raise AemError(errors.INVARIANT, "replay result has no final view")
        return self._view

    @property
    def balances(self) -> dict[bytes, tuple[int, int]]:
        if self._balances is None:
            v = self._final()
            self._balances = {a: (v.avail.get(a, 0), v.pend.get(a, 0))
                              for a in sorted(set(v.avail) | set(v.pend))
                              if v.avail.get(a, 0) or v.pend.get(a, 0)}
        return self._balances

    @property
    def rejected(self) -> dict[bytes, str]:
        if self._rejected is None:
            out = dict(self.checkpoint.notes)
            out.update(self._final().rejected)
            self._rejected = out
        return self._rejected

    def balance(self, account: bytes) -> tuple[int, int]:
        """(available, pending) of one account, without building ``balances``."""
        v = self._final()
        return v.avail.get(account, 0), v.pend.get(account, 0)

    @property
    def state_root(self) -> bytes:
        """The state root (section 7 of the spec), computed on first use: it
        sorts the whole state, which callers that only want a balance skip."""
        if self._root is None:
            self._root = state_root(self._final(), self.checkpoint.net, self.as_of, self.frozen)
        return self._root

    def available(self, account: bytes) -> int:
        return self.balance(account)[0]

    def spend_key_used(self, payer: bytes, spend_key: bytes) -> bool:
        """Whether a receipt has already charged this (payer, spend key)."""
        return payer + spend_key in self.checkpoint.state.spent

    def receipt_record(self) -> dict[bytes, tuple[int, int]]:
        """Per host: (receipts settled or due as of this replay, receipts
        voided by a challenge), the ledger's evidence of a host's record."""
        st = self.checkpoint.state
        out: dict[bytes, list[int]] = {}
        for rid, (host, _payer, _amount, settle_at, status) in st.receipts.items():
            c = out.setdefault(host, [0, 0])
            if rid in st.disputed:
                continue   # the payer's word alone: it must not ruin a host's record
            if status == VOIDED or rid in st.challenged:
                c[1] += 1
            elif status == SETTLED or settle_at <= self.as_of:
                c[0] += 1
        return {h: (s, v) for h, (s, v) in out.items()}

    def spend_key_blocks(self, payer: bytes, spend_key: bytes, host: bytes) -> bool:
        """Whether ``host`` can no longer be paid under this (payer, spend
        key): the payer acknowledged a receipt for it, or ``host``'s own
        receipt already charges it. Another host's unacknowledged charge does
        not block: an acknowledgement of ``host``'s receipt takes precedence
        (specs/ledger.md section 5.3)."""
        st = self.checkpoint.state
        k = payer + spend_key
        if k in st.preferred:
            return True
        rid = st.spent.get(k)
        return rid is not None and st.receipts[rid][0] == host

    def challenged(self, receipt_id: bytes) -> bool:
        """Whether a challenge or dispute that passed names that receipt."""
        return receipt_id in self.checkpoint.state.challenged

    def acknowledged(self, receipt_id: bytes, payer: bytes) -> bool:
        """Whether ``payer`` logged an accepting ack of that receipt."""
        return receipt_id + payer in self.checkpoint.state.acks

    def disputes(self, payer: bytes, host: bytes | None = None) -> int:
        """How many receipts ``payer`` disputed successfully (of ``host``'s,
        when given): public evidence of a payer that takes work back."""
        st = self.checkpoint.state
        n = 0
        for rid in st.disputed:
            info = st.receipt_keys.get(rid, b"")
            if info[32:64] == payer and (host is None or info[:32] == host):
                n += 1
        return n

    def to_json(self) -> dict[str, Any]:
        """The shape `aemctl ledger-replay --json` prints (bytes as hex)."""
        return {
            "state_root": self.state_root,
            "as_of": self.as_of,
            "entries": self.entries,
            "applied": self.applied,
            "balances": {a: {"available": av, "pending": pe} for a, (av, pe) in self.balances.items()},
            "rejected": [{"entry": e, "code": c} for e, c in sorted(self.rejected.items())],
            "frozen": {a: s for a, s in sorted(self.frozen.items())},
            "totals": {"granted": self.granted, "minted": self.minted, "burned": self.burned},
            "events": [_event_json(e) for e in self.events],
        }


def _event_json(e: tuple) -> dict[str, Any]:
    kind, obj, account, amount, at = e
    d = {"event": kind, "object": obj, "account": account, "amount": amount}
    d["challenge" if kind == "void" else "at"] = at
    return d


def replay(genesis: Genesis, entries: Iterable[Item], as_of: int, *,
           checkpoint: Checkpoint | None = None, workers: int = 1, check: bool = False,
           progress: Callable[[int], None] | None = None,
           on_entry: Callable[[LedgerState, Fact, str | None], None] | None = None) -> ReplayResult:
    """Replay ``entries`` as of ``as_of`` (Unix seconds).

    With ``checkpoint``, ``entries`` are the entries added since it was made
    (entries it already covers are skipped). ``workers`` > 1 checks
    signatures on that many processes. ``check`` recomputes every sum after
    each entry (for tests; the O(1) conservation check always runs).
    ``on_entry(state, fact, code)`` is called after each applied-feed entry.
    The checkpoint is not changed (its state is copied: about 10 ms for
    100,000 entries), so it can be continued again.
    """
    if type(as_of) is not int or not 0 <= as_of <= MAX_AS_OF:
        raise AemError(errors.BAD_VALUE, "as_of must be Unix seconds in [0, 2^63-1]")
    p, ctx = _derived(genesis)
    facts = _facts(entries, ctx, workers, progress)
    with paused_gc():
        return _replay(p, facts, as_of, checkpoint, check, on_entry)


def _replay(p: Params, facts: list[Fact], as_of: int, checkpoint: Checkpoint | None,
            check: bool, on_entry: Callable | None) -> ReplayResult:
    if checkpoint is not None:
        if checkpoint.net != p.net:
            raise AemError(errors.WRONG_NETWORK, "checkpoint is for another network")
        if as_of >= checkpoint.as_of:
            try:
                return _continue(checkpoint, facts, as_of, p, check, on_entry, "incremental")
            except Rewind:
                pass
        facts = _merge(checkpoint.base_facts(), facts)
        fresh = Checkpoint(p.net, 0, {}, {}, genesis_state(p), base=[])
        return _continue(fresh, facts, as_of, p, check, on_entry, "rewound")
    fresh = Checkpoint(p.net, 0, {}, {}, genesis_state(p), base=[])
    return _continue(fresh, facts, as_of, p, check, on_entry, "full")


def _derived(genesis: Genesis) -> tuple[Params, Context]:
    """The rule parameters and entry context of a genesis, computed once per
    genesis object (a genesis with thousands of grants costs milliseconds to
    read, which a per-task replay would pay every time)."""
    got = genesis.__dict__.get("_replay_derived")
    if got is None:
        got = (Params.of(genesis), Context.of(genesis))
        object.__setattr__(genesis, "_replay_derived", got)
    return got


def _facts(entries: Iterable[Item], ctx: Context, workers: int,
           progress: Callable[[int], None] | None) -> list[Fact]:
    items = list(entries)
    todo = [i for i, x in enumerate(items) if not isinstance(x, Fact)]
    if todo:
        done = examine_many([items[i] for i in todo], ctx, workers=workers, progress=progress)
        for i, f in zip(todo, done):
            items[i] = f
    return items  # type: ignore[return-value]


def _merge(base: list[Fact], new: list[Fact]) -> list[Fact]:
    seen = {f.id for f in base}
    return base + [f for f in new if f.id not in seen]


def _continue(ck: Checkpoint, facts: list[Fact], as_of: int, p: Params, check: bool,
              on_entry: Callable | None, mode: str) -> ReplayResult:
    incremental = mode == "incremental"
    # Only what the checkpoint does not cover yet, once each.
    fresh_facts: list[Fact] = []
    seen: set[bytes] = set()
    for f in facts:
        if f.id in seen or f.id in ck.notes:
            continue
        fd = ck.feeds.get(f.author) if f.author is not None else None
        if fd is not None and f.id in fd.pos:
            continue
        seen.add(f.id)
        fresh_facts.append(f)
    recheck = ck.future_authors() if as_of > ck.as_of else []
    if incremental and not fresh_facts and not recheck:
        # Nothing new and nothing waiting for this as-of: the checkpoint's
        # feeds, notes and state are the answer, shared (none of them is
        # changed below, and every continuation copies before it changes
        # one), so a replay with nothing to add costs no copy of the ledger.
        feeds, notes, joined = ck.feeds, ck.notes, []
    else:
        feeds = dict(ck.feeds)
        for a in {f.author for f in fresh_facts if f.author is not None and f.author in feeds}:
            feeds[a] = feeds[a].copy()
        notes = dict(ck.notes)
        for a in recheck:
            if a in feeds and feeds[a] is ck.feeds[a]:
                feeds[a] = feeds[a].copy()
        joined = extend(feeds, notes, fresh_facts, as_of, recheck)

    state = ck.state.copy() if incremental and joined else ck.state
    if incremental and joined:
        if state.last_key is not None and order_key(joined[0]) <= state.last_key:
            raise Rewind()
        for f in joined:
            if (f.kind == "inference_receipt" and f.code is None and f.obj in state.orphans
                    and f.obj not in state.receipt_times):
                raise Rewind()
    verdicts = challenge_pass(state, joined, p)
    if incremental:
        for f in joined:
            if f.kind == "challenge" and verdicts.get(f.id) is None:
                r = state.receipts.get(f.args[0])
                if r is not None and r[4] == SETTLED:
                    raise Rewind()
    events: list[tuple] = []
    for f in joined:
        code = apply(state, f, p, verdicts, events)
        state.check_conservation()
        if check:
            state.check_exhaustively()
        if on_entry is not None:
            on_entry(state, f, code)

    base: Any = ck.base
    if isinstance(base, list):
        base = base + fresh_facts
    new_ck = Checkpoint(p.net, as_of, feeds, notes, state, base=base)
    view = final_view(state, as_of, events)
    if check:
        view.check_exhaustively()
    return ReplayResult(
        as_of=as_of,
        events=events,
        entries=view.feed_len + len(notes),
        feed_len=view.feed_len,
        applied=view.applied,
        granted=view.granted, minted=view.minted, burned=view.burned,
        mode=mode,
        checkpoint=new_ck,
        _view=view,
    )

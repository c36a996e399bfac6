"""The CreditLedger rules: what one entry of the applied feeds does to the
state. ``specs/ledger.md`` section 5 is the normative text; each function
here checks the conditions in the order the spec lists them, and the first
that fails gives the entry's reason code.

Challenges are the one rule that looks beyond the entry at hand: whether a
receipt is challenged is decided over the whole applied feed *before* the
sequential pass (:func:`challenge_pass`), so a receipt that will be voided
never settles to its host, whatever the order of the challenge, the
settlement time and the host's later spending.
"""

from __future__ import annotations

import heapq
from typing import NamedTuple

from ledger import reasons
from ledger.facts import Fact
from ledger.state import PENDING, VOIDED, LedgerState
from protocol.genesis import Genesis

MAX_SUPPLY = 2**62


class Params(NamedTuple):
    """The genesis values the rules read."""
    net: bytes
    verifiers: frozenset
    quorum: int
    window: int
    rates: dict
    max_mint: int
    grants: tuple           # ((account, amount), ...)

    @classmethod
    def of(cls, g: Genesis) -> Params:
        return cls(g.network_id, frozenset(g.verifiers), g.quorum, g.challenge_window,
                   {r.basis: r.micro_per_unit for r in g.mint_rates}, g.max_mint_per_receipt,
                   tuple((x.account, x.amount) for x in g.grants))


def genesis_state(p: Params) -> LedgerState:
    s = LedgerState()
    for account, amount in p.grants:
        s.credit(account, amount)
        s.granted += amount
    return s


def settle_time(f: Fact, p: Params) -> int:
    """When an inference receipt settles: the challenge window counted from
    the later of its finish time and its spend authorisation's expiry (a
    time the payer fixed, which the host cannot backdate)."""
    _, _, _, _, expires_at, finished_at = f.args
    return max(finished_at, expires_at) + p.window


def _common(s: LedgerState, f: Fact) -> str | None:
    if f.code is not None:
        return f.code
    if f.signer != f.author:
        return reasons.WRONG_AUTHOR
    if f.obj in s.objects:
        return reasons.DUPLICATE_OBJECT
    return None


def challenge_pass(s: LedgerState, facts: list[Fact], p: Params) -> dict[bytes, str | None]:
    """Record the receipts the new facts name and decide each new challenge.

    Returns entry id -> reason code (None: the challenge applies) for the
    challenges among ``facts``; applying challenges are recorded in
    ``s.challenged``. ``facts`` are in replay order and follow everything
    already in ``s``.
    """
    for f in facts:
        if f.kind == "inference_receipt" and f.code is None and f.signer == f.author:
            s.receipt_times.setdefault(f.obj, settle_time(f, p))
    verdicts: dict[bytes, str | None] = {}
    seen_objects: set[bytes] = set()
    for f in facts:
        if f.kind != "challenge":
            continue
        code = _common(s, f)
        if code is None and f.obj in seen_objects:
            code = reasons.DUPLICATE_OBJECT
        if code is None:
            rid, created_at = f.args
            settle_at = s.receipt_times.get(rid)
            if f.signer not in p.verifiers:
                code = reasons.NOT_VERIFIER
            elif settle_at is None:
                code = reasons.CHALLENGE_NO_RECEIPT
                s.orphans[rid] = s.orphans.get(rid, ()) + (f.id,)
            elif created_at >= settle_at:
                code = reasons.CHALLENGE_LATE
            elif rid in s.challenged:
                code = reasons.ALREADY_CHALLENGED
            else:
                s.challenged[rid] = ((f.lamport, f.author, f.seq), f.id)
                seen_objects.add(f.obj)
        verdicts[f.id] = code
    return verdicts


def apply(s: LedgerState, f: Fact, p: Params, verdicts: dict, events: list | None) -> str | None:
    """Apply one fact of the applied feeds (in replay order); return its
    reason code, or None when it applied."""
    if f.ts > s.clock:
        s.clock = f.ts
    if s.heap and s.heap[0][0] <= s.clock:
        s.settle_due(s.clock, events)
    kind = f.kind
    if kind == "challenge":
        code = verdicts[f.id]
        if code is None:
            _void(s, f.args[0], f.id, events)
    else:
        code = _common(s, f)
        if code is None:
            rule = _RULES.get(kind)
            if rule is not None:
                code = rule(s, f, p, events)
    s.feed_len += 1
    s.last_key = (f.lamport, f.author, f.seq)
    if code is None:
        s.objects.add(f.obj)
        s.applied += 1
    else:
        s.rejected[f.id] = code
    return code


def _transfer(s: LedgerState, f: Fact, p: Params, events: list | None) -> str | None:
    recipient, amount = f.args
    if recipient == f.author:
        return reasons.SELF_TRANSFER
    if s.avail.get(f.author, 0) < amount:
        return reasons.INSUFFICIENT_FUNDS
    s.debit(f.author, amount)
    s.credit(recipient, amount)
    return None


def _receipt(s: LedgerState, f: Fact, p: Params, events: list | None) -> str | None:
    payer, spend_key, charge, started_at, expires_at, _ = f.args
    if started_at >= expires_at:
        return reasons.AUTH_EXPIRED
    key = payer + spend_key
    if key in s.spent:
        return reasons.SPEND_KEY_USED
    if s.avail.get(payer, 0) < charge:
        return reasons.INSUFFICIENT_FUNDS
    rid = f.obj
    settle_at = settle_time(f, p)
    s.debit(payer, charge)
    s.pend_add(f.author, charge)
    s.spent[key] = rid
    s.receipts[rid] = (f.author, payer, charge, settle_at, PENDING)
    s.pending.add(rid)
    ch = s.challenged.get(rid)
    if ch is None:
        heapq.heappush(s.heap, (settle_at, rid))
    elif ch[0] < (f.lamport, f.author, f.seq):
        _void(s, rid, ch[1], events)   # its challenge came first: void at once
    return None


def _contribution(s: LedgerState, f: Fact, p: Params, events: list | None) -> str | None:
    basis, delta, commitment, eval_id, attesters = f.args
    if attesters < p.quorum:
        return reasons.NO_QUORUM
    ckey = (commitment, eval_id, basis)
    if ckey in s.contributions:
        return reasons.DUPLICATE_CONTRIBUTION
    amount = min(delta * p.rates.get(basis, 0), p.max_mint)
    if s.granted + s.minted + amount > MAX_SUPPLY:
        return reasons.SUPPLY_CAP
    s.contributions.add(ckey)
    s.minted += amount
    s.credit(f.author, amount)
    if events is not None and amount:
        events.append(("mint", f.obj, f.author, amount, f.ts))
    return None


def _void(s: LedgerState, rid: bytes, challenge: bytes, events: list | None) -> None:
    """Void a pending receipt: the host's pending amount goes back to the payer."""
    r = s.receipts.get(rid)
    if r is None or r[4] != PENDING:
        return  # not applied (yet, or ever): nothing to undo now
    host, payer, amount = r[0], r[1], r[2]
    s.pend_take(host, amount)
    s.credit(payer, amount)
    s.receipts[rid] = r[:4] + (VOIDED,)
    s.pending.discard(rid)
    if events is not None:
        events.append(("void", rid, payer, amount, challenge))


_RULES = {
    "transfer": _transfer,
    "inference_receipt": _receipt,
    "contribution": _contribution,
}

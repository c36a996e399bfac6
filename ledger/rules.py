"""The CreditLedger rules: what one entry of the applied feeds does to the
state. ``specs/ledger.md`` section 5 is the normative text; each function
here checks the conditions in the order the spec lists them, and the first
that fails gives the entry's reason code.

Challenges, disputes and acks are the rules that look beyond the entry at
hand: whether a receipt is challenged or disputed, and which receipt of a
spend key its payer acknowledged, is decided over the whole applied feed
*before* the sequential pass (:func:`challenge_pass`), so a receipt that will
be voided never settles to its host, whatever the order of the challenge, the
settlement time and the host's later spending, and no Lamport clock lets a
receipt the payer never acknowledged take the payment from one it did.
"""

from __future__ import annotations

import heapq
from typing import NamedTuple

from ledger import reasons
from ledger.facts import Fact, order_key
from ledger.feeds import Rewind
from ledger.state import PENDING, SETTLED, VOIDED, LedgerState
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
    """Record the receipts and acks the new facts hold, and decide each new
    challenge and dispute (specs/ledger.md section 5.5).

    Returns entry id -> reason code (None: it applies) for the challenges and
    disputes among ``facts``; applying ones are recorded in ``s.challenged``.
    ``facts`` are in replay order and follow everything already in ``s``.
    Continuing a checkpoint, a new fact that would change a decision already
    taken in the sequential pass raises :class:`Rewind` (a full replay starts
    from an empty state, where it cannot happen).
    """
    fresh: set[bytes] = set()     # receipts first known in this call
    for f in facts:
        if f.kind == "inference_receipt" and f.code is None and f.signer == f.author \
                and f.obj not in s.receipt_times:
            payer, spend_key = f.args[0], f.args[1]
            s.receipt_times[f.obj] = settle_time(f, p)
            s.receipt_keys[f.obj] = f.author + payer + spend_key
            fresh.add(f.obj)
            if f.obj + payer in s.acks:        # its ack was already recorded
                _prefer(s, f.obj, fresh)
    for f in facts:
        if f.kind == "receipt_ack" and f.code is None and f.signer == f.author:
            rid, accepted = f.args
            if not accepted or rid + f.author in s.acks:
                continue
            s.acks.add(rid + f.author)
            info = s.receipt_keys.get(rid)
            if info is not None and info[32:64] == f.author:
                if rid in s.disputed:
                    raise Rewind()             # the dispute it shields against already passed
                _prefer(s, rid, fresh)
    verdicts: dict[bytes, str | None] = {}
    seen_objects: set[bytes] = set()
    for f in facts:
        if f.kind != "challenge" and f.kind != "dispute":
            continue
        code = _common(s, f)
        if code is None and f.obj in seen_objects:
            code = reasons.DUPLICATE_OBJECT
        if code is None:
            code = (_check_challenge if f.kind == "challenge" else _check_dispute)(s, f, p)
        if code is None:
            rid = f.args[0]
            s.challenged[rid] = (order_key(f), f.id)
            seen_objects.add(f.obj)
            if f.kind == "dispute":
                s.disputed.add(rid)
                r = s.receipts.get(rid)
                if r is not None and r[4] == SETTLED:
                    raise Rewind()             # voids an amount that has already settled
        verdicts[f.id] = code
    return verdicts


def _check_challenge(s: LedgerState, f: Fact, p: Params) -> str | None:
    rid, created_at = f.args
    settle_at = s.receipt_times.get(rid)
    if f.signer not in p.verifiers:
        return reasons.NOT_VERIFIER
    if settle_at is None:
        s.orphans[rid] = s.orphans.get(rid, ()) + (f.id,)
        return reasons.CHALLENGE_NO_RECEIPT
    if created_at >= settle_at:
        return reasons.CHALLENGE_LATE
    if rid in s.challenged:
        return reasons.ALREADY_CHALLENGED
    return None


def _check_dispute(s: LedgerState, f: Fact, p: Params) -> str | None:
    rid, created_at = f.args
    settle_at = s.receipt_times.get(rid)
    if settle_at is None:
        s.orphans[rid] = s.orphans.get(rid, ()) + (f.id,)
        return reasons.DISPUTE_NO_RECEIPT
    if s.receipt_keys.get(rid, b"")[32:64] != f.signer:
        return reasons.NOT_PAYER
    if created_at >= settle_at:
        return reasons.DISPUTE_LATE
    if rid + f.signer in s.acks:
        return reasons.DISPUTE_ACKED
    if rid in s.challenged:
        return reasons.ALREADY_CHALLENGED
    return None


def _prefer(s: LedgerState, rid: bytes, fresh: set[bytes]) -> None:
    """``rid`` is acknowledged by its payer: make it its spend key's preferred
    receipt unless one with a smaller id already is (one rule, whatever the
    order in which receipts and acks arrive)."""
    key = s.receipt_keys[rid][32:]
    cur = s.preferred.get(key)
    if cur is not None and cur <= rid:
        return
    charged = s.spent.get(key)
    if (charged is not None and charged != rid) or (rid not in fresh and cur is not None):
        # Another receipt already charged the key, or this one was already
        # refused as ACKED_ELSEWHERE: the sequential pass must be redone.
        raise Rewind()
    s.preferred[key] = rid


def apply(s: LedgerState, f: Fact, p: Params, verdicts: dict, events: list | None) -> str | None:
    """Apply one fact of the applied feeds (in replay order); return its
    reason code, or None when it applied."""
    if f.ts > s.clock:
        s.clock = f.ts
    if s.heap and s.heap[0][0] <= s.clock:
        s.settle_due(s.clock, events)
    kind = f.kind
    if kind == "challenge" or kind == "dispute":
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
    s.last_key = order_key(f)
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
    preferred = s.preferred.get(key)
    if preferred is not None and preferred != rid:
        return reasons.ACKED_ELSEWHERE   # the payer acknowledged another host's receipt for this key
    settle_at = settle_time(f, p)
    s.debit(payer, charge)
    s.pend_add(f.author, charge)
    s.spent[key] = rid
    s.receipts[rid] = (f.author, payer, charge, settle_at, PENDING)
    s.pending.add(rid)
    ch = s.challenged.get(rid)
    if ch is None:
        heapq.heappush(s.heap, (settle_at, rid))
    elif ch[0] < order_key(f):
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

"""Replay properties over random ledgers (tests/ledgerkit.py's scenarios):
forged signatures, double spends, overdrafts, challenges inside and after
the window, equivocations, transfers, mints with and without a quorum.

- every arrival order (and duplicates) gives the same state root;
- conservation holds and no balance is negative after every entry;
- a spend key never charges twice;
- incremental replay (in any split, with as-of moving forward) equals full replay;
- the log store, fed in any order, agrees with the pure replay.
"""

from __future__ import annotations

import os
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger.facts import Context, examine
from ledger.replay import replay
from ledger.store import LogStore
from tests.ledgerkit import T0, scenario

# AEM_LEDGER_EXAMPLES=2000 for a long hunt; the default keeps the file fast.
EXAMPLES = int(os.environ.get("AEM_LEDGER_EXAMPLES", "120"))
PROPS = settings(max_examples=EXAMPLES, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

seeds = st.integers(0, 2**32 - 1)
sizes = st.integers(4, 45)


def _ledger(seed: int, n: int):
    rnd = random.Random(seed)
    net, entries = scenario(rnd, n)
    ctx = Context.of(net.genesis)
    facts = [examine(e, ctx) for e in entries]
    span = max(1, n) * net.window // 4
    return rnd, net, entries, facts, span


@PROPS
@given(seed=seeds, n=sizes, k=st.integers(0, 9))
def test_every_order_gives_the_same_root(seed, n, k):
    rnd, net, _, facts, span = _ledger(seed, n)
    as_of = T0 + rnd.randint(0, 2 * span)
    spent: list[bytes] = []

    def watch(state, fact, code):
        if fact.kind == "inference_receipt" and code is None:
            spent.append(fact.args[0] + fact.args[1])

    ref = replay(net.genesis, facts, as_of, check=True, on_entry=watch)
    assert len(spent) == len(set(spent)), "a spend key charged twice"
    assert all(av >= 0 and pe >= 0 for av, pe in ref.balances.values())
    assert sum(av + pe for av, pe in ref.balances.values()) == ref.granted + ref.minted - ref.burned
    for _ in range(3):
        order = facts + rnd.sample(facts, min(k, len(facts)))   # with duplicates
        rnd.shuffle(order)
        r = replay(net.genesis, order, as_of, check=True)
        assert r.state_root == ref.state_root
        assert r.balances == ref.balances
        assert r.rejected == ref.rejected
        assert r.frozen == ref.frozen


@PROPS
@given(seed=seeds, n=sizes, parts=st.integers(2, 4))
def test_incremental_equals_full(seed, n, parts):
    rnd, net, _, facts, span = _ledger(seed, n)
    times = sorted(T0 + rnd.randint(0, 2 * span) for _ in range(parts))
    order = facts[:]
    if rnd.random() < 0.5:
        rnd.shuffle(order)       # arbitrary arrival: forces rewinds often
    cuts = sorted(rnd.choices(range(len(order) + 1), k=parts - 1))
    chunks = [order[a:b] for a, b in zip([0] + cuts, cuts + [len(order)])]
    ck = None
    seen: list = []
    for chunk, t in zip(chunks, times):
        seen += chunk
        r = replay(net.genesis, chunk, t, checkpoint=ck, check=True)
        full = replay(net.genesis, seen, t)
        assert r.state_root == full.state_root, r.mode
        assert r.balances == full.balances
        assert r.rejected == full.rejected
        ck = r.checkpoint
    # and a checkpoint survives its byte form
    from ledger.replay import Checkpoint
    again = Checkpoint.from_bytes(ck.to_bytes())
    again.base = ck.base
    t = times[-1] + rnd.randint(0, span)
    assert (replay(net.genesis, [], t, checkpoint=again).state_root
            == replay(net.genesis, facts, t).state_root)


@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(seed=seeds, n=st.integers(4, 30))
def test_store_in_any_order_agrees_with_replay(tmp_path_factory, seed, n):
    rnd, net, entries, facts, span = _ledger(seed, n)
    as_of = T0 + rnd.randint(0, 2 * span)
    want = replay(net.genesis, facts, as_of).state_root
    for i in range(2):
        order = entries[:]
        rnd.shuffle(order)
        path = tmp_path_factory.mktemp("store") / "store.sqlite"
        with LogStore.open(path, net.genesis) as store:
            for j in range(0, len(order), 7):
                store.insert_many(order[j:j + 7])
                store.replay(as_of)          # checkpoints along the way
            assert store.replay(as_of).state_root == want
            # Every entry replay finds unlinked waits in the store (held entries
            # of a forked author count as EQUIVOCATION in replay).
            assert store.count_held() >= sum(1 for c in replay(net.genesis, facts, as_of).rejected.values()
                                             if c == "UNLINKED")


def test_bulk_ledger_is_realistic():
    """The benchmark's generator: every kind, a few percent refused, many accounts."""
    from collections import Counter

    from tests.ledgerkit import bulk
    net, entries = bulk(600, users=50, hosts=10, seed=3)
    r = replay(net.genesis, entries, T0 + 600 * 26 + 3600, check=True)
    kinds = Counter(examine(e, Context.of(net.genesis)).kind for e in entries)
    assert set(kinds) == {"inference_receipt", "transfer", "receipt_ack", "contribution",
                          "challenge", "admission", "capsule_manifest"}
    assert r.entries == 600 and 0 < len(r.rejected) < 60 and len(r.balances) >= 50


def test_parallel_signature_checks_give_the_same_facts(monkeypatch):
    from ledger import facts as facts_mod
    monkeypatch.setattr(facts_mod, "_CHUNK", 8)
    rnd, net, entries, facts, span = _ledger(5, 40)
    par = facts_mod.examine_many(entries, Context.of(net.genesis), workers=2)
    assert par == facts
    assert replay(net.genesis, entries, T0 + span, workers=2).state_root == \
        replay(net.genesis, facts, T0 + span).state_root

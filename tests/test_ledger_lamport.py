"""Lamport clocks are bounded by the entry's time (specs/ledger.md sections 1,
2 and 14): no entry of another author can stop a node from appending."""

from __future__ import annotations

import pytest

from crypto.keys import SigningKey
from ledger import reasons
from ledger.facts import LOCAL_CLOCK_MARGIN, LAMPORT_SHIFT, Context, examine, lamport_fits
from ledger.replay import replay
from ledger.store import LogStore, Status
from protocol.entry import make_entry
from tests.ledgerkit import T0, TestNet


@pytest.fixture
def net() -> TestNet:
    return TestNet(n_users=3)


@pytest.fixture
def store(tmp_path, net):
    s = LogStore.open(tmp_path / "store.sqlite", net.genesis)
    yield s
    s.close()


def _hostile(net, lamport, ts=T0):
    evil = SigningKey.from_seed(b"\x66" * 32)
    return make_entry(evil, net.net, 0, b"", lamport, ts, net.transfer(evil, net.users[0], 1))


def test_the_bound():
    assert lamport_fits(0, 0) and lamport_fits((1 << LAMPORT_SHIFT) - 1, 0)
    assert not lamport_fits(1 << LAMPORT_SHIFT, 0)
    assert lamport_fits(((T0 + 1) << LAMPORT_SHIFT) - 1, T0)
    assert not lamport_fits((T0 + 1) << LAMPORT_SHIFT, T0)


def test_clock_of_2_62_is_refused_everywhere_and_appends_go_on(store, net):
    bad = _hostile(net, 2**62)
    r = store.insert(bad)
    assert r.status is Status.REJECTED and r.code == reasons.LAMPORT_AHEAD
    # Replay refuses it the same way (envelope: in no feed, not in the root).
    assert examine(bad.encode(), Context.of(net.genesis)).code == reasons.LAMPORT_AHEAD
    res = replay(net.genesis, [bad], T0 + 10)
    assert res.rejected == {bad.id: reasons.LAMPORT_AHEAD}
    me = net.users[0]
    for i in range(3):
        e = store.append_local(me, net.transfer(me, net.users[1], 1), T0 + i)
        assert e.lamport == i


def test_entry_at_the_bound_cannot_block_appends(store, net):
    """The largest clock an entry may carry, at the node's own time: the
    node follows it while it leaves room, never past its own bound."""
    top = _hostile(net, ((T0 + 1) << LAMPORT_SHIFT) - 1)
    assert store.insert(top).status is Status.ADDED
    me = net.users[0]
    last = -1
    for i in range(50):
        e = store.append_local(me, net.transfer(me, net.users[1], 1), T0)
        assert lamport_fits(e.lamport, e.ts) and e.lamport > last
        last = e.lamport
    # It never followed the entry at the bound; it sorts before it instead.
    assert last < top.lamport and last <= (T0 << LAMPORT_SHIFT) + LOCAL_CLOCK_MARGIN + 50


def test_far_future_entry_is_valid_but_ignored_by_the_local_clock(store, net):
    far = _hostile(net, 2**56, ts=2**41)
    assert store.insert(far).status is Status.ADDED      # valid: it only applies at its time
    me = net.users[0]
    e = store.append_local(me, net.transfer(me, net.users[1], 1), T0)
    assert e.lamport == 0
    # Entries within the bound are followed as before.
    near = make_entry(net.users[1], net.net, 0, b"", 1000, T0, net.transfer(net.users[1], me, 1))
    store.insert(near)
    e2 = store.append_local(me, net.transfer(me, net.users[1], 1), T0)
    assert e2.lamport == 1001


def test_a_node_whose_clock_went_back_is_refused_not_broken(store, net):
    me = net.users[0]
    store.append_local(me, net.transfer(me, net.users[1], 1), T0)
    # Its own last entry carries a clock that a much earlier time cannot follow.
    top = make_entry(net.users[1], net.net, 0, b"", (T0 << LAMPORT_SHIFT) + 5, T0,
                     net.transfer(net.users[1], me, 1))
    store.insert(top)
    e = store.append_local(me, net.transfer(me, net.users[1], 1), T0)
    assert e.lamport == top.lamport + 1
    from protocol.errors import AemError
    with pytest.raises(AemError) as exc:
        store.append_local(me, net.transfer(me, net.users[1], 1), 1000)
    assert exc.value.code == "REFUSED"


def test_an_old_store_drops_entries_the_bound_now_refuses(tmp_path, net):
    """A store written before the bound keeps such an entry as broken after
    the upgrade: not served to peers, not a head, not followed by the clock."""
    from ledger import facts as facts_mod
    from ledger.store import BROKEN
    path = tmp_path / "old.sqlite"
    s = LogStore.open(path, net.genesis)
    bad = _hostile(net, 2**62)
    # As an older version did: store it without the bound.
    saved = facts_mod.lamport_fits
    try:
        facts_mod.lamport_fits = lambda lamport, ts: True
        assert s.insert(bad).status is Status.ADDED
    finally:
        facts_mod.lamport_fits = saved
    s._db.execute("UPDATE meta SET value = 1 WHERE key = 'facts'")
    s.close()
    s = LogStore.open(path, net.genesis)
    try:
        assert bad.author not in s.frontiers()
        assert s.range(bad.author, 0, 10) == []
        assert s._db.execute("SELECT state FROM entries WHERE id = ?", (bad.id,)).fetchone()[0] == BROKEN
        me = net.users[0]
        assert s.append_local(me, net.transfer(me, net.users[1], 1), T0).lamport == 0
    finally:
        s.close()

"""The CreditLedger rules of specs/ledger.md, one worked case each."""

from __future__ import annotations

import pytest

from crypto.hashing import H
from ledger import reasons
from ledger.replay import replay
from protocol import errors
from protocol.entry import make_entry
from tests.ledgerkit import MICRO, T0, WINDOW, TestNet, key


@pytest.fixture
def net() -> TestNet:
    return TestNet(n_users=4)


def run(net: TestNet, entries, as_of=T0 + 10 * WINDOW):
    return replay(net.genesis, [e if isinstance(e, bytes) else e.encode() for e in entries],
                  as_of, check=True)


def bal(r, k):
    return r.balances.get(k.public, (0, 0))


G = 1_000 * MICRO  # each user's grant


# -- transfers ---------------------------------------------------------------------

def test_transfer_moves_available_credit(net):
    a, b = net.users[:2]
    e = net.append(a, net.transfer(a, b, 7 * MICRO))
    r = run(net, [e])
    assert bal(r, a) == (G - 7 * MICRO, 0) and bal(r, b) == (G + 7 * MICRO, 0)
    assert r.applied == 1 and not r.rejected


def test_overdraft_self_transfer_wrong_author_duplicate(net):
    a, b, c = net.users[:3]
    t = net.transfer(a, b, 1)
    es = [net.append(a, net.transfer(a, b, G + 1)),          # more than a has
          net.append(a, net.transfer(a, a, 1)),              # to itself
          net.append(b, net.transfer(a, c, 1)),              # a's transfer in b's feed
          net.append(a, t), net.append(a, t)]                # the same object twice
    r = run(net, es)
    assert [r.rejected.get(e.id) for e in es] == [
        reasons.INSUFFICIENT_FUNDS, reasons.SELF_TRANSFER, reasons.WRONG_AUTHOR, None,
        reasons.DUPLICATE_OBJECT]
    assert bal(r, a) == (G - 1, 0)


def test_invalid_body_is_refused_but_keeps_the_feed(net):
    a, b = net.users[:2]
    t = net.transfer(a, b, 5)
    bad = t.replace(sig=bytes([t.sig[0] ^ 1]) + t.sig[1:])
    e1 = net.append(a, bad)
    e2 = net.append(a, net.transfer(a, b, 3))
    r = run(net, [e1, e2])
    assert r.rejected == {e1.id: errors.BAD_SIGNATURE}
    assert bal(r, b) == (G + 3, 0)


def test_envelope_failures_are_reported_and_not_in_the_root(net):
    a, b = net.users[:2]
    good = net.append(a, net.transfer(a, b, 5))
    other = TestNet(seed="other")
    foreign = other.append(other.users[0], other.transfer(other.users[0], other.users[1], 1))
    forged = net.forge(net.append(b, net.transfer(b, a, 1)))
    r = run(net, [good.encode(), foreign.encode(), forged, b"\x91\x01", b"x" * 70_000])
    assert sorted(r.rejected.values()) == sorted([errors.WRONG_NETWORK, errors.BAD_SIGNATURE,
                                                  errors.BAD_TYPE, errors.TOO_LARGE])
    assert r.state_root == run(net, [good]).state_root


# -- inference receipts -------------------------------------------------------------

def test_receipt_debits_payer_now_and_credits_host_after_the_window(net):
    host, payer = net.users[:2]
    rc = net.receipt(host, payer, 30 * MICRO, at=T0)
    e = net.append(host, rc, ts=T0 + 5)
    settle = max(T0 + 5, T0 + 600) + WINDOW     # expiry of the kit's spend auth is T0+600
    during = run(net, [e], as_of=settle - 1)
    assert bal(during, payer) == (G - 30 * MICRO, 0)
    assert bal(during, host) == (G, 30 * MICRO)
    after = run(net, [e], as_of=settle)
    assert bal(after, host) == (G + 30 * MICRO, 0)
    assert [x[0] for x in after.events] == ["settle"]


def test_spend_key_charges_once_per_payer(net):
    h1, h2, payer, other = net.users
    auth = net.spend_auth(payer, 10 * MICRO, T0 + 600)
    e1 = net.append(h1, net.receipt(h1, payer, 10 * MICRO, auth=auth))
    e2 = net.append(h2, net.receipt(h2, payer, 5 * MICRO, auth=auth))
    # Another payer's authorisation with the same spend key bytes is its own key.
    auth3 = net.spend_auth(other, 10 * MICRO, T0 + 600, spend_key=auth.spend_key)
    e3 = net.append(h2, net.receipt(h2, other, 10 * MICRO, auth=auth3))
    r = run(net, [e2, e3, e1])
    assert r.rejected == {e2.id: reasons.SPEND_KEY_USED}
    assert bal(r, payer)[0] == G - 10 * MICRO


def test_refused_receipt_does_not_use_the_spend_key(net):
    host, payer, friend = net.users[:3]
    auth = net.spend_auth(payer, 3 * G, T0 + 600)
    e1 = net.append(host, net.receipt(host, payer, 2 * G, auth=auth))            # too much now
    e2 = net.append(friend, net.transfer(friend, payer, G))
    e3 = net.append(host, net.receipt(host, payer, 2 * G, auth=auth))            # same object: fine now
    r = run(net, [e1, e2, e3])
    assert r.rejected == {e1.id: reasons.INSUFFICIENT_FUNDS}
    assert bal(r, payer)[0] == 0


def test_expired_authorisation(net):
    host, payer = net.users[:2]
    auth = net.spend_auth(payer, 10, expires_at=T0 + 10)
    e = net.append(host, net.receipt(host, payer, 10, at=T0 + 10, auth=auth))
    assert run(net, [e]).rejected == {e.id: errors.EXPIRED}


def test_backdated_receipt_still_waits_for_the_window(net):
    """finished_at is the host's word; the payer's expiry anchors the window."""
    host, payer = net.users[:2]
    now = T0 + 100 * WINDOW
    auth = net.spend_auth(payer, 10 * MICRO, expires_at=now + 300)
    rc = net.receipt(host, payer, 10 * MICRO, at=T0, auth=auth)     # claims work long ago
    e = net.append(host, rc, ts=now)
    r = run(net, [e], as_of=now + WINDOW)
    assert bal(r, host) == (G, 10 * MICRO)                           # not yet settled
    v = net.verifiers[0]
    c = net.append(v, net.challenge(v, rc.id, now + WINDOW), ts=now + WINDOW)
    r = run(net, [e, c], as_of=now + 2 * WINDOW)
    assert bal(r, host) == (G, 0) and bal(r, payer) == (G, 0)


# -- challenges ----------------------------------------------------------------------

def test_challenge_in_window_voids_and_refunds(net):
    host, payer = net.users[:2]
    rc = net.receipt(host, payer, 40 * MICRO)
    e = net.append(host, rc, ts=T0 + 5)
    v = net.verifiers[0]
    c = net.append(v, net.challenge(v, rc.id, T0 + 60), ts=T0 + 60)
    r = run(net, [c, e], as_of=T0 + 100 * WINDOW)
    assert bal(r, payer) == (G, 0) and bal(r, host) == (G, 0)
    assert not r.rejected
    assert [x[0] for x in r.events] == ["void"]


def test_challenge_before_its_receipt_voids_it_on_arrival(net):
    host, payer = net.users[:2]
    rc = net.receipt(host, payer, 40 * MICRO)
    v = net.verifiers[0]
    c = net.append(v, net.challenge(v, rc.id, T0 + 1), ts=T0 + 1)        # smaller Lamport clock
    e = net.append(host, rc, ts=T0 + 5)
    assert c.lamport < e.lamport
    for as_of in (T0 + 10, T0 + 100 * WINDOW):
        r = run(net, [e, c], as_of=as_of)
        assert bal(r, payer) == (G, 0) and bal(r, host) == (G, 0) and not r.rejected


def test_challenge_refusals(net):
    host, payer = net.users[:2]
    rc = net.receipt(host, payer, 40 * MICRO)
    e = net.append(host, rc, ts=T0 + 5)
    settle = T0 + 600 + WINDOW
    v0, v1 = net.verifiers[:2]
    late = net.append(v0, net.challenge(v0, rc.id, settle), ts=settle)
    outsider = net.outsider
    stranger = net.append(outsider, net.challenge(outsider, rc.id, T0 + 9), ts=T0 + 9)
    unknown = net.append(v1, net.challenge(v1, H(b"no such receipt"), T0 + 9), ts=T0 + 9)
    first = net.append(v1, net.challenge(v1, rc.id, T0 + 10), ts=T0 + 10)
    second = net.append(v0, net.challenge(v0, rc.id, T0 + 11), ts=T0 + 11)
    r = run(net, [e, late, stranger, unknown, first, second], as_of=settle + 10)
    assert r.rejected == {late.id: reasons.CHALLENGE_LATE, stranger.id: reasons.NOT_VERIFIER,
                          unknown.id: reasons.CHALLENGE_NO_RECEIPT,
                          second.id: reasons.ALREADY_CHALLENGED}
    assert bal(r, payer) == (G, 0)


def test_a_challenged_receipt_never_settles_even_if_the_host_spends_first(net):
    """The host authors an entry past the settlement time before the
    (timely) challenge in replay order; the challenge still wins and the
    host cannot have spent the voided amount."""
    host, payer, shop = net.users[:3]
    rc = net.receipt(host, payer, G)
    e = net.append(host, rc, ts=T0 + 5)
    settle = T0 + 600 + WINDOW
    spend = net.append(host, net.transfer(host, shop, G + G // 2, settle + 1), ts=settle + 1)
    v = net.verifiers[0]
    c = net.append(v, net.challenge(v, rc.id, T0 + 30), ts=T0 + 30)   # sorts after `spend`
    r = run(net, [e, spend, c], as_of=settle + 100)
    assert r.rejected == {spend.id: reasons.INSUFFICIENT_FUNDS}
    assert bal(r, host) == (G, 0) and bal(r, payer) == (G, 0)
    # Without the challenge the host could spend it once the window had passed.
    r = run(net, [e, spend], as_of=settle + 100)
    assert not r.rejected and bal(r, shop) == (G + G + G // 2, 0)


# -- minting ----------------------------------------------------------------------------

def test_mint_needs_a_quorum_of_distinct_genesis_verifiers(net):
    a = net.users[0]
    v0, v1, _ = net.verifiers
    good = net.contribution(a, 100, [v0, v1])
    same_twice = net.contribution(a, 100, [v0])
    same_twice = same_twice.replace(attestations=same_twice.attestations * 2).signed(a)
    outsider = net.contribution(a, 100, [v0, net.outsider])
    forged = net.contribution(a, 100, [v0, v1])
    att = forged.attestations[1]
    forged = forged.replace(attestations=(forged.attestations[0],
                                          att.replace(sig=bytes([att.sig[0] ^ 1]) + att.sig[1:]))).signed(a)
    es = [net.append(a, c) for c in (good, same_twice, outsider, forged)]
    r = run(net, es)
    assert r.rejected == {es[1].id: reasons.NO_QUORUM, es[2].id: reasons.NO_QUORUM,
                          es[3].id: reasons.NO_QUORUM}
    assert r.minted == 100 * net.mint_rate and bal(r, a) == (G + 100 * net.mint_rate, 0)


def test_mint_cap_and_duplicate_content(net):
    a, b = net.users[:2]
    vs = net.verifiers[:2]
    big = net.append(a, net.contribution(a, 1_000_000, vs, commitment=H(b"c1")))
    again = net.append(b, net.contribution(b, 5, vs, commitment=H(b"c1")))
    r = run(net, [big, again])
    assert r.minted == net.max_mint
    assert r.rejected == {again.id: reasons.DUPLICATE_CONTRIBUTION}


def test_supply_cap():
    net = TestNet(n_users=1, grant=2**61, max_mint=2**62)
    a = net.users[0]
    e = net.append(a, net.contribution(a, 1_000_000, net.verifiers[:2]))
    net2 = TestNet(n_users=1, grant=2**61, max_mint=2**62, mint_rate=2**42, seed="cap")
    e2 = net2.append(net2.users[0], net2.contribution(net2.users[0], 1_000_000, net2.verifiers[:2]))
    assert not run(net, [e]).rejected
    assert run(net2, [e2]).rejected == {e2.id: reasons.SUPPLY_CAP}


# -- feeds ---------------------------------------------------------------------------------

def test_equivocation_freezes_from_the_fork_in_any_order(net):
    a, b = net.users[:2]
    e0 = net.append(a, net.transfer(a, b, 1))
    e1 = net.append(a, net.transfer(a, b, 2))
    e2 = net.append(a, net.transfer(a, b, 3))
    f1 = net.fork(a, 1, net.transfer(a, b, 4))
    r1 = run(net, [e0, e1, e2, f1])
    r2 = run(net, [f1, e2, e1, e0])
    assert r1.state_root == r2.state_root
    assert r1.frozen == {a.public: 1}
    assert r1.rejected == {e1.id: reasons.EQUIVOCATION, e2.id: reasons.EQUIVOCATION,
                           f1.id: reasons.EQUIVOCATION}
    assert bal(r1, b) == (G + 1, 0)


def test_unlinked_until_the_predecessor_arrives(net):
    a, b = net.users[:2]
    e0 = net.append(a, net.transfer(a, b, 1))
    e1 = net.append(a, net.transfer(a, b, 2))
    r = run(net, [e1])
    assert r.rejected == {e1.id: reasons.UNLINKED} and r.applied == 0
    assert run(net, [e1, e0]).applied == 2


def test_lamport_must_grow_along_a_feed(net):
    a, b = net.users[:2]
    e0 = net.append(a, net.transfer(a, b, 1), lamport=10)
    e1 = make_entry(a, net.net, 1, e0.id, 10, T0, net.transfer(a, b, 2))
    r = run(net, [e0, e1])
    assert r.rejected == {e1.id: reasons.BAD_CHAIN}


def test_future_entries_wait_for_as_of(net):
    a, b = net.users[:2]
    e0 = net.append(a, net.transfer(a, b, 1), ts=T0)
    e1 = net.append(a, net.transfer(a, b, 2), ts=T0 + 100)
    e2 = net.append(a, net.transfer(a, b, 4), ts=T0 + 50)      # after a future one: waits too
    r = run(net, [e0, e1, e2], as_of=T0 + 60)
    assert r.rejected == {e1.id: reasons.FUTURE, e2.id: reasons.FUTURE}
    assert bal(run(net, [e0, e1, e2], as_of=T0 + 100), b) == (G + 7, 0)


def test_as_of_and_time_limits(net):
    from protocol.errors import AemError
    for bad in (-1, 2**63, "1"):
        with pytest.raises(AemError):
            replay(net.genesis, [], bad)


def test_keys_are_deterministic():
    assert key("x").public == key("x").public != key("y").public

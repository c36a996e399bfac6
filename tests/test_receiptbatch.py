"""Batched receipts (protocol/receiptbatch.py): every member proves, nothing
else does, and the sums hold."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto.hashing import H
from protocol import receiptbatch as rb
from protocol.errors import BAD_PROOF, BAD_VALUE, AemError
from protocol.receiptbatch import BatchHead, DebitLine, Leaf, RangeProof, ReceiptBatch
from tests.ledgerkit import MICRO, TestNet


def _key(i: int) -> bytes:
    return H(b"k%d" % i)


@st.composite
def leaf_sets(draw, max_size: int = 40):
    n = draw(st.integers(1, max_size))
    payers = draw(st.integers(1, 6))
    out = []
    for i in range(n):
        out.append(Leaf(payer=_key(draw(st.integers(0, payers - 1))), spend_key=H(b"s%d" % i),
                        receipt_id=H(b"r%d" % i), charge=draw(st.integers(0, 10**12))))
    return out


def _fails(fn, *args) -> None:
    with pytest.raises(AemError) as e:
        fn(*args)
    assert e.value.code == BAD_PROOF


@settings(max_examples=150, deadline=None)
@given(leaf_sets())
def test_every_member_proves_and_sums_hold(leaves):
    b = ReceiptBatch(leaves)
    rb.check_head(b.head)
    assert b.head.count == len(leaves)
    assert b.head.total == sum(x.charge for x in leaves)
    assert sum(ln.amount for ln in b.head.lines) == b.head.total
    for x in leaves:
        p = b.prove(x.receipt_id)
        rb.verify_charge(b.head, x, p)
        assert len(p.siblings) <= max(1, len(leaves)).bit_length()
    for ln in b.head.lines:
        got = rb.verify_line(b.head, ln.payer, b.prove_line(ln.payer))
        assert {x.receipt_id for x in got} == {x.receipt_id for x in leaves if x.payer == ln.payer}


@settings(max_examples=100, deadline=None)
@given(leaf_sets(), st.data())
def test_every_range_proves(leaves, data):
    b = ReceiptBatch(leaves)
    first = data.draw(st.integers(0, len(leaves) - 1))
    count = data.draw(st.integers(1, len(leaves) - first))
    p = b.prove_range(first, count)
    rb.verify_range(b.head, p)
    assert p.leaves == b.leaves[first:first + count]


@settings(max_examples=100, deadline=None)
@given(leaf_sets(), st.data())
def test_altered_charge_fails(leaves, data):
    b = ReceiptBatch(leaves)
    x = data.draw(st.sampled_from(b.leaves))
    p = b.prove(x.receipt_id)
    delta = data.draw(st.integers(1, 10**6))
    for charge in {x.charge + delta, max(0, x.charge - delta)} - {x.charge}:
        forged = dataclasses.replace(x, charge=charge)
        _fails(rb.verify_charge, b.head, forged, dataclasses.replace(p, leaves=(forged,)))
    # Another payer, spend key or receipt for the same slot fails too.
    for field, v in (("payer", H(b"other")), ("spend_key", H(b"other")), ("receipt_id", H(b"other"))):
        forged = dataclasses.replace(x, **{field: v})
        _fails(rb.verify_charge, b.head, forged, dataclasses.replace(p, leaves=(forged,)))


@settings(max_examples=100, deadline=None)
@given(leaf_sets(), st.data())
def test_non_member_fails(leaves, data):
    b = ReceiptBatch(leaves)
    stranger = Leaf(payer=_key(0), spend_key=H(b"new"), receipt_id=H(b"never"),
                    charge=data.draw(st.integers(0, 10**12)))
    # Claimed at any slot, with the proof of whatever leaf sits there.
    i = data.draw(st.integers(0, len(leaves) - 1))
    p = b.prove_range(i, 1)
    _fails(rb.verify_charge, b.head, stranger, dataclasses.replace(p, leaves=(stranger,)))
    # A member's proof moved to another index fails (unless the tree is one leaf).
    if len(leaves) > 1:
        j = data.draw(st.integers(0, len(leaves) - 1).filter(lambda j: j != i))
        _fails(rb.verify_range, b.head, dataclasses.replace(p, first=j))


@settings(max_examples=60, deadline=None)
@given(leaf_sets(), st.integers(1, 10**9))
def test_a_head_claiming_another_total_fails(leaves, delta):
    b = ReceiptBatch(leaves)
    x = b.leaves[0]
    for total in (b.head.total + delta, b.head.total - delta):
        if total < 0:
            continue
        head = dataclasses.replace(b.head, total=total)
        _fails(rb.verify_charge, head, x, b.prove(x.receipt_id))
        _fails(rb.check_head, head)      # the lines no longer add up either


@settings(max_examples=60, deadline=None)
@given(leaf_sets(), st.data())
def test_tampered_siblings_fail(leaves, data):
    b = ReceiptBatch(leaves)
    if len(leaves) < 2:
        return
    x = data.draw(st.sampled_from(b.leaves))
    p = b.prove(x.receipt_id)
    k = data.draw(st.integers(0, len(p.siblings) - 1))
    h, s = p.siblings[k]
    sib = list(p.siblings)
    # A sibling that claims a smaller sum is what a host hiding charges would need.
    sib[k] = (h, s + 1) if data.draw(st.booleans()) or s == 0 else (h, s - 1)
    _fails(rb.verify_range, b.head, dataclasses.replace(p, siblings=tuple(sib)))
    sib[k] = (H(h), s)
    _fails(rb.verify_range, b.head, dataclasses.replace(p, siblings=tuple(sib)))
    _fails(rb.verify_range, b.head, dataclasses.replace(p, siblings=p.siblings[:-1]))
    _fails(rb.verify_range, b.head, dataclasses.replace(p, siblings=p.siblings + (p.siblings[0],)))


def _batch_with_lines(lines_leaves):
    return ReceiptBatch([x for ls in lines_leaves for x in ls])


def test_a_line_covering_someone_elses_leaf_fails():
    a, c = _key(1), _key(2)
    la = [Leaf(a, H(b"sa%d" % i), H(b"ra%d" % i), 10 + i) for i in range(3)]
    lc = [Leaf(c, H(b"sc%d" % i), H(b"rc%d" % i), 100 + i) for i in range(2)]
    b = _batch_with_lines([la, lc])
    first, second = sorted(b.head.lines, key=lambda ln: ln.payer)
    # A host that moves one leaf of the second payer into the first one's line
    # (same leaves, same root, same total) is caught by the first payer.
    shifted = (dataclasses.replace(first, count=first.count + 1,
                                   amount=first.amount + b.leaves[first.count].charge),
               dataclasses.replace(second, first=second.first + 1, count=second.count - 1,
                                   amount=second.amount - b.leaves[first.count].charge))
    head = dataclasses.replace(b.head, lines=shifted)
    rb.check_head(head)                      # nothing wrong to a node without the leaves
    _fails(rb.verify_line, head, first.payer, b.prove_range(0, first.count + 1))


def test_a_line_overstating_its_amount_fails():
    a, c = _key(1), _key(2)
    b = ReceiptBatch([Leaf(a, H(b"s1"), H(b"r1"), 5), Leaf(c, H(b"s2"), H(b"r2"), 7)])
    l0, l1 = b.head.lines
    # Moving charge from one payer's line to the other's keeps the total.
    head = dataclasses.replace(b.head, lines=(dataclasses.replace(l0, amount=l0.amount + 1),
                                              dataclasses.replace(l1, amount=l1.amount - 1)))
    rb.check_head(head)
    _fails(rb.verify_line, head, l0.payer, b.prove_line(l0.payer))
    rb.verify_line(b.head, l0.payer, b.prove_line(l0.payer))


@pytest.mark.parametrize("mutate", [
    lambda h: dataclasses.replace(h, count=h.count + 1),
    lambda h: dataclasses.replace(h, lines=h.lines[::-1]),
    lambda h: dataclasses.replace(h, lines=h.lines[:1]),
    lambda h: dataclasses.replace(h, lines=()),
    lambda h: dataclasses.replace(h, lines=h.lines + h.lines[-1:]),
    lambda h: dataclasses.replace(h, lines=(dataclasses.replace(h.lines[0], first=1),) + h.lines[1:]),
    lambda h: dataclasses.replace(h, root=b"short"),
    lambda h: dataclasses.replace(h, total=-1),
    lambda h: dataclasses.replace(h, lines=(dataclasses.replace(h.lines[0], count=0),) + h.lines[1:]),
])
def test_malformed_heads_are_refused(mutate):
    leaves = [Leaf(_key(i % 3), H(b"s%d" % i), H(b"r%d" % i), i) for i in range(7)]
    head = ReceiptBatch(leaves).head
    rb.check_head(head)
    _fails(rb.check_head, mutate(head))


def test_malformed_proofs_are_bad_proof_not_crashes():
    leaves = [Leaf(_key(i % 2), H(b"s%d" % i), H(b"r%d" % i), i) for i in range(5)]
    b = ReceiptBatch(leaves)
    p = b.prove_range(1, 2)
    for bad in (dataclasses.replace(p, leaves=()), dataclasses.replace(p, first=-1),
                dataclasses.replace(p, first=4), dataclasses.replace(p, siblings=((b"x", 1),)),
                dataclasses.replace(p, siblings=((p.siblings[0][0], -1),) + p.siblings[1:]),
                dataclasses.replace(p, siblings=(p.siblings[0][0],) + p.siblings[1:]),
                dataclasses.replace(p, siblings=p.siblings * 40), "not a proof"):
        _fails(rb.verify_range, b.head, bad)
    _fails(Leaf.decode, b"\x00" * 10)
    assert Leaf.decode(leaves[3].encode()) == leaves[3]


def test_building_refuses_bad_batches():
    a = Leaf(_key(1), H(b"s"), H(b"r"), 1)
    for bad in ([], [a, a], [a, dataclasses.replace(a, receipt_id=H(b"r2"))]):
        with pytest.raises(AemError) as e:
            ReceiptBatch(bad)
        assert e.value.code == BAD_VALUE
    with pytest.raises(AemError) as e:
        ReceiptBatch([dataclasses.replace(a, charge=rb.MAX_CHARGE),
                      Leaf(_key(2), H(b"s2"), H(b"r2"), 1)])
    assert e.value.code == BAD_VALUE        # the total would pass the ledger's bound
    for kw in ({"payer": b"short"}, {"charge": -1}, {"charge": True}, {"charge": rb.MAX_CHARGE + 1}):
        with pytest.raises(AemError):
            dataclasses.replace(a, **kw)
    b = ReceiptBatch([a])
    with pytest.raises(AemError):
        b.prove_range(0, 2)
    with pytest.raises(AemError):
        b.prove(H(b"none"))


def test_real_receipts_batch_and_prove():
    net = TestNet(n_users=6)
    host, payers = net.users[0], net.users[1:]
    receipts = [net.receipt(host, payers[i % 5], (i + 1) * MICRO // 10, at=1_000 + i,
                            auth=net.spend_auth(payers[i % 5], 3 * MICRO, 5_000))
                for i in range(23)]
    b = rb.batch_of(receipts)
    assert b.head.total == sum(r.charge for r in receipts)
    assert len(b.head.lines) == 5
    for r in receipts:
        leaf = Leaf.of_receipt(r)
        rb.verify_charge(b.head, leaf, b.prove(r.id))
        assert leaf.spend_key == r.spend_auth.spend_key


def test_types_are_what_the_head_holds():
    b = ReceiptBatch([Leaf(_key(1), H(b"s"), H(b"r"), 3)])
    assert isinstance(b.head, BatchHead) and isinstance(b.head.lines[0], DebitLine)
    p = b.prove_line(_key(1))
    assert isinstance(p, RangeProof) and p.siblings == ()
    rb.verify_line(b.head, _key(1), p)
    assert b.head.wire_size() == 48 + 48 and p.wire_size() == 8 + rb.LEAF_LEN
    assert len(b.head.encode()) == b.head.wire_size()

"""Batched receipts: a host commits many receipts in one log entry (a prototype).

Today every InferenceWorkReceipt is its own log entry, so every node stores
and verifies every receipt of the mesh (specs/scale.md). A batch lets a host
commit all the receipts of an epoch at once, and lets each payer check, and
dispute, exactly its own charges without anyone else seeing the receipts.

What the log entry would carry (:class:`BatchHead`): the number of leaves,
their total charge, a Merkle-sum root over the leaves, and one
:class:`DebitLine` per payer (payer, first leaf, leaf count, amount). Every
node checks the head alone (:func:`check_head`: lines sorted by payer,
contiguous, covering every leaf, amounts adding up to the total), debits each
payer its line and credits the host the total. A payer checks its own line
with a range proof from the host (:func:`verify_line`): every leaf in its
range names it, and their charges add up to the line. Any leaf it did not
authorise is disputed with an inclusion proof (:func:`verify_charge`) that
every node can check in O(log n) hashes, with no receipt in hand.

The tree is a Merkle-sum tree with the shape of RFC 6962 (split at the
largest power of two below n): a leaf node is ``(H(0x00 || leaf), charge)``,
an inner node ``(H(0x02 || lh || u64(ls) || rh || u64(rs)), ls + rs)``. The
verifier always derives an inner sum from its children's, and the children's
sums are inside the parent's hash, so the root's sum is the exact sum of the
leaves' charges: a host cannot commit to a total other than what its leaves
charge (sums are bounded by 2^62, so no addition wraps). The inner prefix is
0x02, not RFC 6962's 0x01, so that no node of a sum tree is ever mistaken for
a node of the plain trees of crypto/merkle.py.

As with crypto/merkle.py, a proof binds the tree size only through its
shape, so ``count`` must come from the signed head, never from the prover.

Building errors raise AemError BAD_VALUE; every verification failure,
malformed input included, raises BAD_PROOF.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from crypto.hashing import HASH_LEN, H
from protocol.errors import BAD_PROOF, BAD_VALUE, AemError

MAX_CHARGE = 2**62            # protocol.schema.AMOUNT: no sum of charges may pass it
MAX_LEAVES = 1 << 24          # a host commits at most this many receipts in one batch
MAX_DEPTH = 24                # = log2(MAX_LEAVES): the depth of the deepest honest tree
MAX_RANGE_PROOF = 2 * MAX_DEPTH   # siblings of a range: at most two per level
LEAF_LEN = 3 * HASH_LEN + 8

_LEAF = b"\x00"
_NODE = b"\x02"

Node = tuple[bytes, int]      # (hash, sum of the charges below it)


def _u64(n: int) -> bytes:
    return n.to_bytes(8, "big")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _split(n: int) -> int:
    """The largest power of two strictly below ``n`` (n >= 2), as RFC 6962."""
    return 1 << ((n - 1).bit_length() - 1)


def _combine(left: Node, right: Node, err: str) -> Node:
    s = left[1] + right[1]
    if s > MAX_CHARGE:
        raise AemError(err, f"charges add up to more than {MAX_CHARGE}")
    return H(_NODE + left[0] + _u64(left[1]) + right[0] + _u64(right[1])), s


@dataclass(frozen=True, slots=True)
class Leaf:
    """One receipt as the batch commits it. ``spend_key`` is there so that a
    payer who sees one spend key in two batches (two hosts, or one host twice)
    can prove the double charge; ``receipt_id`` names the signed receipt the
    host must produce if the leaf is disputed."""

    payer: bytes
    spend_key: bytes
    receipt_id: bytes
    charge: int

    def __post_init__(self) -> None:
        for name in ("payer", "spend_key", "receipt_id"):
            v = getattr(self, name)
            if type(v) is not bytes or len(v) != HASH_LEN:
                raise AemError(BAD_VALUE, f"leaf {name} is {HASH_LEN} bytes")
        if not _is_int(self.charge) or not 0 <= self.charge <= MAX_CHARGE:
            raise AemError(BAD_VALUE, f"leaf charge {self.charge!r} not in 0..{MAX_CHARGE}")

    def encode(self) -> bytes:
        """Fixed-width bytes: payer || spend_key || receipt_id || u64 charge."""
        return self.payer + self.spend_key + self.receipt_id + _u64(self.charge)

    @classmethod
    def decode(cls, data: bytes) -> Leaf:
        if type(data) is not bytes or len(data) != LEAF_LEN:
            raise AemError(BAD_PROOF, f"a leaf is {LEAF_LEN} bytes")
        h = HASH_LEN
        return cls(data[:h], data[h:2 * h], data[2 * h:3 * h], int.from_bytes(data[3 * h:], "big"))

    def node(self) -> Node:
        return H(_LEAF + self.encode()), self.charge

    @classmethod
    def of_receipt(cls, receipt) -> Leaf:
        """The leaf of a protocol.task.InferenceWorkReceipt."""
        return cls(receipt.payer, receipt.spend_auth.spend_key, receipt.id, receipt.charge)


@dataclass(frozen=True, slots=True)
class DebitLine:
    """What one payer is charged by one batch: the leaves [first, first+count)."""

    payer: bytes
    first: int
    count: int
    amount: int


@dataclass(frozen=True, slots=True)
class BatchHead:
    """What the host's log entry would hold; signed by the host as the entry."""

    count: int
    total: int
    root: bytes
    lines: tuple[DebitLine, ...]

    def wire_size(self) -> int:
        """Bytes of :meth:`encode`: what the bench charges per batch body."""
        return 8 + 8 + HASH_LEN + len(self.lines) * (HASH_LEN + 4 + 4 + 8)

    def encode(self) -> bytes:
        """A fixed-width encoding (count, total, root, then per line payer,
        first, count, amount), standing in for the entry body until a
        ``receipt_batch`` entry kind is specified (specs/scale.md section 4)."""
        out = [_u64(self.count), _u64(self.total), self.root]
        for ln in self.lines:
            out += [ln.payer, ln.first.to_bytes(4, "big"), ln.count.to_bytes(4, "big"), _u64(ln.amount)]
        return b"".join(out)


@dataclass(frozen=True, slots=True)
class RangeProof:
    """The leaves [first, first+len(leaves)) of a batch and the sibling nodes
    that join them to the root, in the order the verifier consumes them (left
    to right across the tree)."""

    first: int
    leaves: tuple[Leaf, ...]
    siblings: tuple[Node, ...]

    def wire_size(self) -> int:
        return 8 + len(self.leaves) * LEAF_LEN + len(self.siblings) * (HASH_LEN + 8)


class ReceiptBatch:
    """A host's batch under construction: the leaves, sorted by (payer,
    receipt_id) so that each payer's charges are one contiguous range."""

    def __init__(self, leaves: Iterable[Leaf]) -> None:
        ls = sorted(leaves, key=lambda x: (x.payer, x.receipt_id))
        if not ls:
            raise AemError(BAD_VALUE, "a batch holds at least one receipt")
        if len(ls) > MAX_LEAVES:
            raise AemError(BAD_VALUE, f"a batch holds at most {MAX_LEAVES} receipts")
        ids = {x.receipt_id for x in ls}
        if len(ids) != len(ls):
            raise AemError(BAD_VALUE, "a receipt appears twice in the batch")
        # One spend key pays for one task across the whole ledger: a host that
        # put it in twice would be proving its own double charge.
        if len({(x.payer, x.spend_key) for x in ls}) != len(ls):
            raise AemError(BAD_VALUE, "a spend key is charged twice in the batch")
        self.leaves: tuple[Leaf, ...] = tuple(ls)
        self._memo: dict[tuple[int, int], Node] = {}
        self._root = self._node(0, len(ls))
        lines: list[DebitLine] = []
        i = 0
        while i < len(ls):
            j = i
            while j < len(ls) and ls[j].payer == ls[i].payer:
                j += 1
            lines.append(DebitLine(ls[i].payer, i, j - i, sum(x.charge for x in ls[i:j])))
            i = j
        self.head = BatchHead(len(ls), self._root[1], self._root[0], tuple(lines))

    def _node(self, lo: int, hi: int) -> Node:
        if hi - lo == 1:
            return self.leaves[lo].node()
        n = self._memo.get((lo, hi))
        if n is None:
            k = _split(hi - lo)
            n = _combine(self._node(lo, lo + k), self._node(lo + k, hi), BAD_VALUE)
            self._memo[(lo, hi)] = n
        return n

    def index_of(self, receipt_id: bytes) -> int:
        for i, x in enumerate(self.leaves):
            if x.receipt_id == receipt_id:
                return i
        raise AemError(BAD_VALUE, "no such receipt in the batch")

    def line_of(self, payer: bytes) -> DebitLine:
        for ln in self.head.lines:
            if ln.payer == payer:
                return ln
        raise AemError(BAD_VALUE, "the batch charges no such payer")

    def prove_range(self, first: int, count: int) -> RangeProof:
        n = len(self.leaves)
        if not (_is_int(first) and _is_int(count) and count >= 1 and 0 <= first and first + count <= n):
            raise AemError(BAD_VALUE, f"range {first!r}+{count!r} not inside 0..{n}")
        out: list[Node] = []

        def walk(a: int, b: int) -> None:
            if b <= first or a >= first + count:
                out.append(self._node(a, b))
            elif b - a > 1:
                k = _split(b - a)
                walk(a, a + k)
                walk(a + k, b)

        walk(0, n)
        return RangeProof(first, self.leaves[first:first + count], tuple(out))

    def prove(self, receipt_id: bytes) -> RangeProof:
        """The inclusion proof of one receipt (what a dispute carries)."""
        return self.prove_range(self.index_of(receipt_id), 1)

    def prove_line(self, payer: bytes) -> RangeProof:
        """Every leaf charging ``payer`` (what the host sends each payer)."""
        ln = self.line_of(payer)
        return self.prove_range(ln.first, ln.count)


# -- verification: BAD_PROOF on any failure ------------------------------------------


def _check_hash(v: object, what: str) -> bytes:
    if type(v) is not bytes or len(v) != HASH_LEN:
        raise AemError(BAD_PROOF, f"{what} must be {HASH_LEN} bytes")
    return v


def _check_amount(v: object, what: str) -> int:
    if not _is_int(v) or not 0 <= v <= MAX_CHARGE:  # type: ignore[operator]
        raise AemError(BAD_PROOF, f"{what} must be an integer in 0..{MAX_CHARGE}")
    return v  # type: ignore[return-value]


def check_head(head: BatchHead) -> None:
    """What every node checks of a batch entry, with no receipt in hand: the
    lines are sorted by payer (so a payer has one line), contiguous from leaf
    0, cover every leaf, and their amounts add up to the total."""
    if not isinstance(head, BatchHead):
        raise AemError(BAD_PROOF, "not a batch head")
    if not _is_int(head.count) or not 1 <= head.count <= MAX_LEAVES:
        raise AemError(BAD_PROOF, f"count must be in 1..{MAX_LEAVES}")
    _check_amount(head.total, "total")
    _check_hash(head.root, "root")
    if not isinstance(head.lines, tuple) or not head.lines:
        raise AemError(BAD_PROOF, "a batch has at least one debit line")
    at, amount, last = 0, 0, b""
    for ln in head.lines:
        if not isinstance(ln, DebitLine):
            raise AemError(BAD_PROOF, "not a debit line")
        payer = _check_hash(ln.payer, "line payer")
        if payer <= last:
            raise AemError(BAD_PROOF, "debit lines must be sorted by payer, one per payer")
        if ln.first != at or not _is_int(ln.count) or ln.count < 1:
            raise AemError(BAD_PROOF, "debit lines must cover the leaves in order")
        amount += _check_amount(ln.amount, "line amount")
        at, last = at + ln.count, payer
    if at != head.count:
        raise AemError(BAD_PROOF, f"debit lines cover {at} leaves, the batch holds {head.count}")
    if amount != head.total:
        raise AemError(BAD_PROOF, f"debit lines add up to {amount}, the total is {head.total}")


def verify_range(head: BatchHead, proof: RangeProof) -> None:
    """Check that ``proof.leaves`` are the batch's leaves at ``proof.first``
    onwards: they, with the siblings, lead to the head's root and total."""
    n = head.count
    if not _is_int(n) or not 1 <= n <= MAX_LEAVES:
        raise AemError(BAD_PROOF, f"count must be in 1..{MAX_LEAVES}")
    root = _check_hash(head.root, "root")
    total = _check_amount(head.total, "total")
    if not isinstance(proof, RangeProof):
        raise AemError(BAD_PROOF, "not a range proof")
    first, leaves = proof.first, proof.leaves
    if not isinstance(leaves, tuple) or not leaves or not all(isinstance(x, Leaf) for x in leaves):
        raise AemError(BAD_PROOF, "a range proof holds at least one leaf")
    if not _is_int(first) or first < 0 or first + len(leaves) > n:
        raise AemError(BAD_PROOF, f"leaves {first!r}+{len(leaves)} not inside the batch of {n}")
    sibs = proof.siblings
    if not isinstance(sibs, tuple) or len(sibs) > MAX_RANGE_PROOF:
        raise AemError(BAD_PROOF, f"a range proof has at most {MAX_RANGE_PROOF} siblings")
    for s in sibs:
        if not isinstance(s, tuple) or len(s) != 2:
            raise AemError(BAD_PROOF, "a sibling is (hash, sum)")
        _check_hash(s[0], "sibling hash")
        _check_amount(s[1], "sibling sum")
    it: Iterator[Node] = iter(sibs)
    hi = first + len(leaves)

    def walk(a: int, b: int) -> Node:
        if b <= first or a >= hi:
            got = next(it, None)
            if got is None:
                raise AemError(BAD_PROOF, "range proof too short")
            return got
        if b - a == 1:
            return leaves[a - first].node()
        k = _split(b - a)
        return _combine(walk(a, a + k), walk(a + k, b), BAD_PROOF)

    got_root, got_total = walk(0, n)
    if next(it, None) is not None:
        raise AemError(BAD_PROOF, "range proof too long")
    if got_root != root:
        raise AemError(BAD_PROOF, "range proof does not lead to the root")
    if got_total != total:
        raise AemError(BAD_PROOF, f"leaves sum to {got_total}, the head says {total}")


def verify_charge(head: BatchHead, leaf: Leaf, proof: RangeProof) -> None:
    """Check that the batch charges exactly ``leaf`` (payer, spend key,
    receipt, charge) at the proof's index: what a dispute proves before the
    host must answer it."""
    if not isinstance(proof, RangeProof) or len(proof.leaves) != 1:
        raise AemError(BAD_PROOF, "a charge is proven by a proof of one leaf")
    if proof.leaves[0] != leaf:
        raise AemError(BAD_PROOF, "the proof is for another leaf")
    verify_range(head, proof)


def verify_line(head: BatchHead, payer: bytes, proof: RangeProof) -> tuple[Leaf, ...]:
    """What a payer checks of the batch: its line, with a proof of the leaves
    it covers. Every leaf names the payer and their charges add up to the
    line's amount; returns the leaves (the payer then matches each against
    the receipts it acknowledged, and disputes the rest)."""
    check_head(head)
    line = next((ln for ln in head.lines if ln.payer == payer), None)
    if line is None:
        raise AemError(BAD_PROOF, "the batch has no line for this payer")
    if proof.first != line.first or len(proof.leaves) != line.count:
        raise AemError(BAD_PROOF, "the proof does not cover the payer's line")
    verify_range(head, proof)
    if any(x.payer != payer for x in proof.leaves):
        raise AemError(BAD_PROOF, "the payer's line covers a leaf charging someone else")
    if sum(x.charge for x in proof.leaves) != line.amount:
        raise AemError(BAD_PROOF, "the payer's leaves do not add up to its line")
    return proof.leaves


def batch_of(receipts: Sequence) -> ReceiptBatch:
    """The batch of protocol.task.InferenceWorkReceipts."""
    return ReceiptBatch(Leaf.of_receipt(r) for r in receipts)

"""Merkle trees in the manner of RFC 6962 / RFC 9162, with SHA-256.

Hashes: a leaf is ``H(0x00 || leaf)``, an inner node ``H(0x01 || left || right)``,
the empty tree ``H(b"")``. A tree of n > 1 leaves splits at k, the largest power
of two below n: its left subtree is perfect and its right one holds the rest.

Proofs are generated as RFC 6962 section 2.1.1 (PATH) and 2.1.2 (SUBPROOF)
define them, and verified by the algorithms of RFC 9162 sections 2.1.3.2 and
2.1.4.2, which need no tree at all. A proof binds the leaf and the root; it
binds the tree size only through the shape of the path, and several sizes can
share a shape. Tree sizes must therefore come from a signed tree head, as in CT.

Generation errors (an index or size out of range) raise AemError BAD_VALUE;
every verification failure, malformed input included, raises BAD_PROOF.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from crypto.hashing import HASH_LEN, H
from protocol.errors import BAD_PROOF, BAD_VALUE, AemError

EMPTY_ROOT = H(b"")
# Sizes are uint64 on the wire, so no honest path is longer than 64 hashes.
MAX_TREE_SIZE = 2**64 - 1
MAX_PROOF_LEN = 64

_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"

_BYTES_LIKE = (bytes, bytearray, memoryview)


def leaf_hash(leaf: bytes) -> bytes:
    """``H(0x00 || leaf)``."""
    if not isinstance(leaf, _BYTES_LIKE):
        raise AemError(BAD_VALUE, "a Merkle leaf is bytes")
    return H(_LEAF_PREFIX + bytes(leaf))


def node_hash(left: bytes, right: bytes) -> bytes:
    """``H(0x01 || left || right)``."""
    return H(_NODE_PREFIX + left + right)


def _split(n: int) -> int:
    """The largest power of two strictly below ``n`` (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class MerkleTree:
    """An append-only Merkle tree over leaf hashes.

    Subtree hashes are memoised by leaf range: leaves never change once
    appended, so a cached range stays right as the tree grows, and proofs for
    many sizes of one log cost O(log n) hashes each after the first root.
    """

    def __init__(self, leaf_hashes: Iterable[bytes] = ()) -> None:
        self._leaves: list[bytes] = []
        self._memo: dict[tuple[int, int], bytes] = {}
        for h in leaf_hashes:
            self.append(h)

    @classmethod
    def from_leaves(cls, leaves: Iterable[bytes]) -> MerkleTree:
        return cls(leaf_hash(leaf) for leaf in leaves)

    def append(self, leaf_hash: bytes) -> None:
        if not isinstance(leaf_hash, _BYTES_LIKE) or len(leaf_hash) != HASH_LEN:
            raise AemError(BAD_VALUE, f"a leaf hash is {HASH_LEN} bytes")
        if len(self._leaves) >= MAX_TREE_SIZE:
            raise AemError(BAD_VALUE, "Merkle tree is full")
        self._leaves.append(bytes(leaf_hash))

    def __len__(self) -> int:
        return len(self._leaves)

    def _size(self, size: int | None, name: str = "size") -> int:
        if size is None:
            return len(self._leaves)
        if not _is_int(size) or not 0 <= size <= len(self._leaves):
            raise AemError(BAD_VALUE, f"{name} {size!r} not in 0..{len(self._leaves)}")
        return size

    def _mth(self, lo: int, hi: int) -> bytes:
        n = hi - lo
        if n == 1:
            return self._leaves[lo]
        h = self._memo.get((lo, hi))
        if h is None:
            k = _split(n)
            h = node_hash(self._mth(lo, lo + k), self._mth(lo + k, hi))
            self._memo[(lo, hi)] = h
        return h

    def root(self, size: int | None = None) -> bytes:
        """MTH of the first ``size`` leaves (all by default)."""
        n = self._size(size)
        return EMPTY_ROOT if n == 0 else self._mth(0, n)

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """PATH(index, D[0:size]), leaf-side first."""
        n = self._size(size)
        if not _is_int(index) or not 0 <= index < n:
            raise AemError(BAD_VALUE, f"index {index!r} not in 0..{n - 1}")
        proof: list[bytes] = []
        lo, hi, m = 0, n, index
        # PATH recurses towards the leaf and appends on the way out, so walking
        # down collects the siblings root-side first; reverse at the end.
        while hi - lo > 1:
            k = _split(hi - lo)
            if m < k:
                proof.append(self._mth(lo + k, hi))
                hi = lo + k
            else:
                proof.append(self._mth(lo, lo + k))
                lo, m = lo + k, m - k
        proof.reverse()
        return proof

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        """PROOF(old_size, D[0:new_size]) = SUBPROOF(old_size, D[0:new_size], true).

        Empty when old_size is 0 or equal to new_size: those need no proof.
        """
        n = self._size(new_size, "new_size")
        m = self._size(old_size, "old_size")
        if m > n:
            raise AemError(BAD_VALUE, f"old_size {m} > new_size {n}")
        if m == 0:
            return []
        proof: list[bytes] = []
        lo, hi, complete = 0, n, True
        while m != hi - lo:
            k = _split(hi - lo)
            if m <= k:
                proof.append(self._mth(lo + k, hi))
                hi = lo + k
            else:
                proof.append(self._mth(lo, lo + k))
                lo, m, complete = lo + k, m - k, False
        if not complete:
            proof.append(self._mth(lo, hi))
        proof.reverse()
        return proof


def root(leaves: Sequence[bytes]) -> bytes:
    """MTH over the raw ``leaves``."""
    return MerkleTree.from_leaves(leaves).root()


def inclusion_proof(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """The audit path of ``leaves[index]`` in the tree of all ``leaves``."""
    return MerkleTree.from_leaves(leaves).inclusion_proof(index)


def consistency_proof(leaves: Sequence[bytes], old_size: int) -> list[bytes]:
    """Proof that the tree of ``leaves[:old_size]`` is a prefix of that of ``leaves``."""
    return MerkleTree.from_leaves(leaves).consistency_proof(old_size)


def _check_size(v: object, name: str) -> int:
    if not _is_int(v) or not 0 <= v <= MAX_TREE_SIZE:  # type: ignore[operator]
        raise AemError(BAD_PROOF, f"{name} must be an integer in 0..2**64-1")
    return v  # type: ignore[return-value]


def _check_hash(v: object, name: str) -> bytes:
    if not isinstance(v, _BYTES_LIKE) or len(v) != HASH_LEN:
        raise AemError(BAD_PROOF, f"{name} must be {HASH_LEN} bytes")
    return bytes(v)


def _check_proof(proof: object) -> list[bytes]:
    if not isinstance(proof, (list, tuple)):
        raise AemError(BAD_PROOF, "proof must be a list of hashes")
    if len(proof) > MAX_PROOF_LEN:
        raise AemError(BAD_PROOF, f"proof longer than {MAX_PROOF_LEN} hashes")
    return [_check_hash(p, "proof element") for p in proof]


def verify_inclusion(leaf: bytes, index: int, tree_size: int, proof: Sequence[bytes], root: bytes) -> None:
    """Check that raw ``leaf`` sits at ``index`` in the tree of ``tree_size`` with ``root``."""
    if not isinstance(leaf, _BYTES_LIKE):
        raise AemError(BAD_PROOF, "leaf must be bytes")
    verify_inclusion_hash(leaf_hash(leaf), index, tree_size, proof, root)


def verify_inclusion_hash(
    leaf_hash: bytes, index: int, tree_size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """RFC 9162 section 2.1.3.2 for an already hashed leaf; BAD_PROOF on any failure."""
    h = _check_hash(leaf_hash, "leaf hash")
    fn = _check_size(index, "index")
    size = _check_size(tree_size, "tree_size")
    path = _check_proof(proof)
    want = _check_hash(root, "root")
    if fn >= size:
        raise AemError(BAD_PROOF, f"index {fn} not below tree_size {size}")
    sn = size - 1
    r = h
    for p in path:
        if sn == 0:
            raise AemError(BAD_PROOF, "inclusion proof too long")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise AemError(BAD_PROOF, "inclusion proof too short")
    if r != want:
        raise AemError(BAD_PROOF, "inclusion proof does not lead to the root")


def consistency_roots(first: int, second: int, path: Sequence[bytes]) -> tuple[bytes, bytes]:
    """The roots of the trees of ``first`` and ``second`` leaves (0 < first <
    second) that a consistency proof leads to: the walk of RFC 9162 section
    2.1.4.2, with the old root first in ``path`` when ``first`` is a power of
    two. BAD_PROOF when the proof is too long or too short for the sizes."""
    if not path:
        raise AemError(BAD_PROOF, "consistency proof is empty")
    fn = first - 1
    sn = second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise AemError(BAD_PROOF, "consistency proof too long")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise AemError(BAD_PROOF, "consistency proof too short")
    return fr, sr


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> None:
    """Check that the tree of ``old_size`` with ``old_root`` is a prefix of the one of
    ``new_size`` with ``new_root`` (RFC 9162 section 2.1.4.2); BAD_PROOF on any failure.

    The RFC covers 0 < old_size < new_size. Equal sizes need equal roots and an
    empty proof; old size 0 needs the empty root and an empty proof, since the
    empty tree is a prefix of every tree.
    """
    first = _check_size(old_size, "old_size")
    second = _check_size(new_size, "new_size")
    first_hash = _check_hash(old_root, "old_root")
    second_hash = _check_hash(new_root, "new_root")
    path = _check_proof(proof)
    if first > second:
        raise AemError(BAD_PROOF, f"old_size {first} > new_size {second}")
    if first == second or first == 0:
        if path:
            raise AemError(BAD_PROOF, "this consistency proof must be empty")
        if first == 0 and first_hash != EMPTY_ROOT:
            raise AemError(BAD_PROOF, "old_root is not the empty tree's root")
        if first == second and first_hash != second_hash:
            raise AemError(BAD_PROOF, "same size, different roots")
        return
    if not path:
        raise AemError(BAD_PROOF, "consistency proof is empty")
    if first & (first - 1) == 0:
        path = [first_hash, *path]
    fr, sr = consistency_roots(first, second, path)
    if fr != first_hash:
        raise AemError(BAD_PROOF, "consistency proof does not lead to old_root")
    if sr != second_hash:
        raise AemError(BAD_PROOF, "consistency proof does not lead to new_root")

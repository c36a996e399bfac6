"""Merkle trees: RFC 6962 vectors, a reference transcription, and tampering.

The verifier of RFC 9162 binds a tree size only through the shape of the path
(which side each sibling is on, and how many there are), so a tampered size is
expected to pass exactly when it gives the same shape. The tests state that with
an independent shape oracle derived from the RFC 6962 recursions, rather than
claiming every other size fails.
"""

from __future__ import annotations

import hashlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto import merkle
from crypto.merkle import (
    EMPTY_ROOT,
    MerkleTree,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    root,
    verify_consistency,
    verify_inclusion,
    verify_inclusion_hash,
)
from protocol.errors import BAD_PROOF, BAD_VALUE, AemError

# The classic leaves of the certificate-transparency test data.
CT_LEAVES = [
    b"",
    b"\x00",
    b"\x10",
    b"\x20\x21",
    b"\x30\x31",
    b"\x40\x41\x42\x43",
    b"\x50\x51\x52\x53\x54\x55\x56\x57",
    b"\x60\x61\x62\x63\x64\x65\x66\x67\x68\x69\x6a\x6b\x6c\x6d\x6e\x6f",
]
CT_ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
CT_INCLUSION_0_OF_8 = [
    "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
    "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
]


# --- An independent, literal transcription of RFC 6962 section 2.1 ----------


def _sha(b: bytes) -> bytes:
    return hashlib.sha256(b).digest()


def _k(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def ref_mth(d: list[bytes]) -> bytes:
    if not d:
        return _sha(b"")
    if len(d) == 1:
        return _sha(b"\x00" + d[0])
    k = _k(len(d))
    return _sha(b"\x01" + ref_mth(d[:k]) + ref_mth(d[k:]))


def ref_path(m: int, d: list[bytes]) -> list[bytes]:
    if len(d) == 1:
        return []
    k = _k(len(d))
    if m < k:
        return ref_path(m, d[:k]) + [ref_mth(d[k:])]
    return ref_path(m - k, d[k:]) + [ref_mth(d[:k])]


def ref_subproof(m: int, d: list[bytes], b: bool) -> list[bytes]:
    n = len(d)
    if m == n:
        return [] if b else [ref_mth(d)]
    k = _k(n)
    if m <= k:
        return ref_subproof(m, d[:k], b) + [ref_mth(d[k:])]
    return ref_subproof(m - k, d[k:], False) + [ref_mth(d[:k])]


# Shapes: what the verifier's computation depends on besides the hashes.


def path_shape(m: int, n: int) -> tuple[str, ...]:
    """Sibling sides along PATH(m, D[n]), leaf first."""
    if n == 1:
        return ()
    k = _k(n)
    if m < k:
        return path_shape(m, k) + ("R",)
    return path_shape(m - k, n - k) + ("L",)


def subproof_shape(m: int, n: int, b: bool = True) -> tuple[str, ...]:
    """Seed kind and sibling sides along SUBPROOF(m, D[n], b), innermost first."""
    if m == n:
        return ("old-root",) if b else ("proof-seed",)
    k = _k(n)
    if m <= k:
        return subproof_shape(m, k, b) + ("R",)
    return subproof_shape(m - k, n - k, False) + ("L",)


# --- helpers -----------------------------------------------------------------


def _code(fn, *args) -> str:
    with pytest.raises(AemError) as ei:
        fn(*args)
    return ei.value.code


def _passes(fn, *args) -> bool:
    try:
        fn(*args)
    except AemError as e:
        assert e.code == BAD_PROOF
        return False
    return True


def _flip(b: bytes, bit: int) -> bytes:
    out = bytearray(b)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


# Distinct leaves: with duplicates a "tampered" index can honestly hold the same
# leaf. The size is drawn uniformly, since plain st.lists favours short lists.
TAMPER_SAMPLE = 24
leaves_st = st.integers(1, 200).flatmap(
    lambda n: st.lists(st.binary(max_size=6), min_size=n, max_size=n).map(
        lambda tails: [i.to_bytes(2, "big") + t for i, t in enumerate(tails)]
    )
)


# --- vectors -------------------------------------------------------------------


def test_empty_tree() -> None:
    assert root([]) == EMPTY_ROOT == _sha(b"")
    assert MerkleTree().root() == EMPTY_ROOT
    assert _code(verify_inclusion, b"", 0, 0, [], EMPTY_ROOT) == BAD_PROOF


@pytest.mark.parametrize("n", range(1, 9))
def test_ct_roots(n: int) -> None:
    assert root(CT_LEAVES[:n]).hex() == CT_ROOTS[n - 1]
    assert ref_mth(CT_LEAVES[:n]).hex() == CT_ROOTS[n - 1]


def test_ct_inclusion_vector() -> None:
    proof = inclusion_proof(CT_LEAVES, 0)
    assert [p.hex() for p in proof] == CT_INCLUSION_0_OF_8
    verify_inclusion(CT_LEAVES[0], 0, 8, proof, bytes.fromhex(CT_ROOTS[7]))
    # A consistency proof from size 1 is the inclusion proof of leaf 0.
    assert consistency_proof(CT_LEAVES, 1) == proof


def test_ct_all_proofs_match_reference() -> None:
    for n in range(1, 9):
        d = CT_LEAVES[:n]
        r = bytes.fromhex(CT_ROOTS[n - 1])
        for i in range(n):
            proof = inclusion_proof(d, i)
            assert proof == ref_path(i, d)
            verify_inclusion(d[i], i, n, proof, r)
        for m in range(1, n + 1):
            proof = consistency_proof(d, m)
            assert proof == ref_subproof(m, d, True)
            verify_consistency(m, n, bytes.fromhex(CT_ROOTS[m - 1]), r, proof)


@settings(max_examples=50, deadline=None)
@given(leaves=st.lists(st.binary(max_size=6), min_size=1, max_size=40))
def test_generation_matches_reference(leaves: list[bytes]) -> None:
    n = len(leaves)
    tree = MerkleTree.from_leaves(leaves)
    assert tree.root() == ref_mth(leaves) == root(leaves)
    for i in range(n):
        assert tree.inclusion_proof(i) == ref_path(i, leaves)
    for m in range(1, n + 1):
        assert tree.consistency_proof(m) == ref_subproof(m, leaves, True)
        assert tree.root(m) == ref_mth(leaves[:m])


def test_tree_grows_incrementally() -> None:
    leaves = [bytes([i]) for i in range(70)]
    tree = MerkleTree()
    for i, leaf in enumerate(leaves):
        tree.append(leaf_hash(leaf))
        assert len(tree) == i + 1
        assert tree.root() == root(leaves[: i + 1])
    for m in range(71):
        assert tree.root(m) == root(leaves[:m])


# --- inclusion -----------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(leaves=leaves_st, seed=st.integers(0, 2**32))
def test_inclusion_proofs_verify_and_tampering_fails(leaves: list[bytes], seed: int) -> None:
    rnd = random.Random(seed)  # a plain PRNG: hypothesis-proxied draws cost seconds here
    n = len(leaves)
    tree = MerkleTree.from_leaves(leaves)
    r = tree.root()
    # Every proof must verify; tampering is tried on a sample to keep this fast.
    tampered = set(rnd.sample(range(n), min(n, TAMPER_SAMPLE)))
    for i in range(n):
        proof = tree.inclusion_proof(i)
        verify_inclusion(leaves[i], i, n, proof, r)
        verify_inclusion_hash(leaf_hash(leaves[i]), i, n, proof, r)
        if i not in tampered:
            continue

        for j, p in enumerate(proof):
            bit = rnd.randrange(256)
            bad = proof[:j] + [_flip(p, bit)] + proof[j + 1 :]
            assert not _passes(verify_inclusion, leaves[i], i, n, bad, r)
        if proof:
            assert not _passes(verify_inclusion, leaves[i], i, n, proof[:-1], r)
        assert not _passes(verify_inclusion, leaves[i], i, n, [*proof, r], r)
        assert not _passes(verify_inclusion, leaves[i], i, n, proof, _flip(r, rnd.randrange(256)))
        assert not _passes(verify_inclusion, leaves[i] + b"x", i, n, proof, r)
        # Passing the leaf hash as if it were the leaf must not verify either.
        assert not _passes(verify_inclusion, leaf_hash(leaves[i]), i, n, proof, r)

        other = rnd.randrange(n + 4)
        if other != i:
            ok = _passes(verify_inclusion, leaves[i], other, n, proof, r)
            assert ok == (other < n and path_shape(other, n) == path_shape(i, n))
            assert not ok  # distinct indices never share a path shape

        size = rnd.randrange(2 * n + 3)
        if size != n:
            ok = _passes(verify_inclusion, leaves[i], i, size, proof, r)
            assert ok == (i < size and path_shape(i, size) == path_shape(i, n))


# --- consistency ---------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(leaves=leaves_st, seed=st.integers(0, 2**32))
def test_consistency_proofs_verify_and_tampering_fails(leaves: list[bytes], seed: int) -> None:
    rnd = random.Random(seed)  # a plain PRNG: hypothesis-proxied draws cost seconds here
    n = len(leaves)
    tree = MerkleTree.from_leaves(leaves)
    new_root = tree.root()
    tampered = set(rnd.sample(range(1, n + 1), min(n, TAMPER_SAMPLE)))
    for m in range(1, n + 1):
        old_root = tree.root(m)
        proof = tree.consistency_proof(m)
        verify_consistency(m, n, old_root, new_root, proof)
        if m not in tampered:
            continue

        for j, p in enumerate(proof):
            bit = rnd.randrange(256)
            bad = proof[:j] + [_flip(p, bit)] + proof[j + 1 :]
            assert not _passes(verify_consistency, m, n, old_root, new_root, bad)
        if proof:
            assert not _passes(verify_consistency, m, n, old_root, new_root, proof[:-1])
        assert not _passes(verify_consistency, m, n, old_root, new_root, [*proof, new_root])
        bit = rnd.randrange(256)
        assert not _passes(verify_consistency, m, n, _flip(old_root, bit), new_root, proof)
        assert not _passes(verify_consistency, m, n, old_root, _flip(new_root, bit), proof)
        if m < n:
            assert not _passes(verify_consistency, m, n, new_root, old_root, proof)

        m2 = rnd.randrange(n + 4)
        n2 = rnd.randrange(2 * n + 3)
        for a, b in ((m2, n), (m, n2), (m2, n2)):
            if (a, b) == (m, n):
                continue
            ok = _passes(verify_consistency, a, b, old_root, new_root, proof)
            same_shape = 0 < a <= b and subproof_shape(a, b) == subproof_shape(m, n)
            if m == n:
                # The trivial case compares roots only: any equal pair of sizes passes.
                same_shape = a == b and a > 0
            assert ok == same_shape, (a, b, m, n)


def test_consistency_from_empty_tree() -> None:
    leaves = [b"a", b"b", b"c"]
    assert consistency_proof(leaves, 0) == []
    verify_consistency(0, 3, EMPTY_ROOT, root(leaves), [])
    verify_consistency(0, 0, EMPTY_ROOT, EMPTY_ROOT, [])
    assert _code(verify_consistency, 0, 3, root(leaves), root(leaves), []) == BAD_PROOF
    assert _code(verify_consistency, 0, 3, EMPTY_ROOT, root(leaves), [root(leaves)]) == BAD_PROOF
    assert _code(verify_consistency, 2, 3, root(leaves[:2]), root(leaves), []) == BAD_PROOF
    assert _code(verify_consistency, 3, 2, root(leaves), root(leaves[:2]), []) == BAD_PROOF


# --- malformed input -----------------------------------------------------------

GOOD = MerkleTree.from_leaves(CT_LEAVES)
GOOD_PROOF = GOOD.inclusion_proof(3)
GOOD_ROOT = GOOD.root()

junk_size = st.one_of(
    st.integers(max_value=-1),
    st.integers(min_value=2**64),
    st.booleans(),
    st.floats(),
    st.text(max_size=3),
    st.none(),
)
junk_hash = st.one_of(
    st.binary(max_size=31),
    st.binary(min_size=33, max_size=40),
    st.text(max_size=40),
    st.integers(),
    st.none(),
)


@settings(max_examples=100)
@given(index=junk_size)
def test_junk_index_is_bad_proof(index: object) -> None:
    assert _code(verify_inclusion, CT_LEAVES[3], index, 8, GOOD_PROOF, GOOD_ROOT) == BAD_PROOF
    assert _code(verify_inclusion, CT_LEAVES[3], 3, index, GOOD_PROOF, GOOD_ROOT) == BAD_PROOF
    assert _code(verify_consistency, index, 8, GOOD_ROOT, GOOD_ROOT, []) == BAD_PROOF
    assert _code(verify_consistency, 8, index, GOOD_ROOT, GOOD_ROOT, []) == BAD_PROOF


@settings(max_examples=100)
@given(h=junk_hash, pos=st.integers(0, 2))
def test_junk_hashes_are_bad_proof(h: object, pos: int) -> None:
    proof = list(GOOD_PROOF)
    proof[pos] = h
    assert _code(verify_inclusion, CT_LEAVES[3], 3, 8, proof, GOOD_ROOT) == BAD_PROOF
    assert _code(verify_inclusion, CT_LEAVES[3], 3, 8, GOOD_PROOF, h) == BAD_PROOF
    assert _code(verify_inclusion_hash, h, 3, 8, GOOD_PROOF, GOOD_ROOT) == BAD_PROOF
    assert _code(verify_consistency, 4, 8, h, GOOD_ROOT, [GOOD_PROOF[2]]) == BAD_PROOF
    assert _code(verify_consistency, 4, 8, GOOD.root(4), h, [GOOD_PROOF[2]]) == BAD_PROOF


@pytest.mark.parametrize("proof", [None, b"x" * 32, "ab", 5, {b"x" * 32}, iter([b"x" * 32])])
def test_proof_not_a_list_is_bad_proof(proof: object) -> None:
    assert _code(verify_inclusion, CT_LEAVES[3], 3, 8, proof, GOOD_ROOT) == BAD_PROOF
    assert _code(verify_consistency, 4, 8, GOOD.root(4), GOOD_ROOT, proof) == BAD_PROOF


def test_overlong_proofs_are_bad_proof() -> None:
    long_proof = [b"\x00" * 32] * (merkle.MAX_PROOF_LEN + 1)
    assert _code(verify_inclusion, b"", 0, 2**64 - 1, long_proof, GOOD_ROOT) == BAD_PROOF
    assert _code(verify_consistency, 1, 2**64 - 1, GOOD_ROOT, GOOD_ROOT, long_proof) == BAD_PROOF
    # The largest tree has 64-hash paths; they are parsed, and fail on the hashes.
    at_limit = [b"\x00" * 32] * merkle.MAX_PROOF_LEN
    assert _code(verify_inclusion, b"", 0, 2**64 - 1, at_limit, GOOD_ROOT) == BAD_PROOF


def test_non_bytes_leaf_is_bad_proof() -> None:
    assert _code(verify_inclusion, "leaf", 3, 8, GOOD_PROOF, GOOD_ROOT) == BAD_PROOF
    assert _code(verify_inclusion, None, 3, 8, GOOD_PROOF, GOOD_ROOT) == BAD_PROOF


def test_generation_out_of_range_is_bad_value() -> None:
    assert _code(inclusion_proof, CT_LEAVES, 8) == BAD_VALUE
    assert _code(inclusion_proof, CT_LEAVES, -1) == BAD_VALUE
    assert _code(inclusion_proof, [], 0) == BAD_VALUE
    assert _code(inclusion_proof, CT_LEAVES, True) == BAD_VALUE
    assert _code(consistency_proof, CT_LEAVES, 9) == BAD_VALUE
    assert _code(consistency_proof, CT_LEAVES, -1) == BAD_VALUE
    assert _code(GOOD.consistency_proof, 5, 4) == BAD_VALUE
    assert _code(GOOD.root, 9) == BAD_VALUE
    assert _code(root, ["not bytes"]) == BAD_VALUE
    assert _code(MerkleTree, [b"short"]) == BAD_VALUE

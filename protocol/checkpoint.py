"""Signed checkpoints of one author's log, and the evidence that an author forked.

A :class:`LogCheckpoint` is an author's signed statement "my log has ``size``
entries (seq 0..size-1) and the RFC 6962 Merkle tree over them has root
``root``". The leaves are entry ids (``H(entry bytes)``, 32 bytes), in seq
order, so leaf ``i`` is the entry at seq ``i``: an inclusion proof at index
``entry.seq`` pins an entry to its place in its author's log, and the entry
itself (signed, carrying author and seq) is all a verifier needs besides.

Two checkpoints of one author are *consistent* when the smaller tree is a
prefix of the larger. An honest author's checkpoints always are; two that are
not prove the author signed two different histories. :class:`ForkEvidence`
carries such a pair in a form anyone can check from the two objects alone
(specs/evidence.md §2):

- equal sizes and different roots; or
- sizes m < n and a *prefix proof*: the RFC 6962 consistency proof PROOF(m, n)
  of the larger tree, with MTH(D[0:m]) itself put first when m is a power of
  two (RFC 9162 leaves it out there, taking it from the old checkpoint). The
  proof must lead to the larger checkpoint's root, and the prefix root it
  yields on the way differs from the smaller checkpoint's root. Since the
  path hashes are bound by the larger root, the prefix root it yields is the
  true root of that tree's first m leaves: so the smaller checkpoint names
  another history.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from crypto import merkle
from crypto.hashing import HASH_LEN
from protocol import errors
from protocol.errors import AemError
from protocol.schema import HASH, KEY, SIG, TIME, ListOf, Obj, Signed, UInt, WireObject, decode_one_of, f

MAX_LOG_SIZE = 2**48              # entries in one log (seq is at most 2^48: the last one is never needed)
CHECKPOINT_MAX = 512              # bytes of a canonical LogCheckpoint (about 200 in practice)
FORK_EVIDENCE_MAX = 4096


def checkpoint_topic(net: bytes) -> str:
    """The gossip topic of checkpoints and fork evidence, scoped by network."""
    return f"/aem/{net.hex()}/checkpoints/1"


@dataclass(frozen=True)
class LogCheckpoint(Signed):
    TYPE = "checkpoint"
    SIGNER = "author"
    MAX_SIZE = CHECKPOINT_MAX

    net: bytes = f(HASH)
    author: bytes = f(KEY)
    size: int = f(UInt(0, MAX_LOG_SIZE))    # entries seq 0..size-1
    root: bytes = f(HASH)                   # RFC 6962 MTH over their entry ids
    created_at: int = f(TIME)
    sig: bytes = f(SIG)

    def _validate(self) -> None:
        if self.size == 0 and self.root != merkle.EMPTY_ROOT:
            raise AemError(errors.BAD_VALUE, "checkpoint: an empty log has the empty tree's root")


def entry_tree(entry_ids: Sequence[bytes]) -> merkle.MerkleTree:
    """The Merkle tree of a log whose entries (seq 0, 1, ...) have these ids."""
    return merkle.MerkleTree.from_leaves(entry_ids)


def build_checkpoint(key, net: bytes, entry_ids: Sequence[bytes], created_at: int) -> LogCheckpoint:
    """``key``'s signed checkpoint of its log, whose entry ids in seq order are ``entry_ids``."""
    return LogCheckpoint(net=net, author=key.public, size=len(entry_ids),
                         root=entry_tree(entry_ids).root(), created_at=created_at, sig=b"").signed(key)


def _ordered(a: LogCheckpoint, b: LogCheckpoint) -> tuple[LogCheckpoint, LogCheckpoint]:
    """The pair smaller tree first; for equal sizes, by id (one order everywhere)."""
    return (a, b) if (a.size, a.id) <= (b.size, b.id) else (b, a)


def check_consistent(a: LogCheckpoint, b: LogCheckpoint, proof: Sequence[bytes]) -> None:
    """Raise BAD_PROOF unless the smaller of two checkpoints of one author is a
    prefix of the larger, as ``proof`` (RFC 6962 PROOF(m, n)) shows."""
    if a.author != b.author or a.net != b.net:
        raise AemError(errors.BAD_VALUE, "checkpoints of different authors or networks")
    old, new = _ordered(a, b)
    merkle.verify_consistency(old.size, new.size, old.root, new.root, proof)


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def prefix_proof(tree: merkle.MerkleTree, old_size: int, new_size: int) -> list[bytes]:
    """The prefix proof of :class:`ForkEvidence` from a tree holding at least new_size leaves."""
    proof = tree.consistency_proof(old_size, new_size)
    return [tree.root(old_size), *proof] if _is_pow2(old_size) else proof


def prefix_root(old_size: int, new_size: int, new_root: bytes, proof: Sequence[bytes]) -> bytes:
    """MTH(D[0:old_size]) of the tree with ``new_root``, as a prefix proof shows it
    (0 < old_size < new_size); BAD_PROOF unless the proof leads to ``new_root``.

    The RFC 9162 §2.1.4.2 walk, with the old root read from the proof instead
    of checked against a claimed one."""
    if not (0 < old_size < new_size <= merkle.MAX_TREE_SIZE):
        raise AemError(errors.BAD_PROOF, "a prefix proof needs 0 < old size < new size")
    if not isinstance(proof, (list, tuple)) or not proof or len(proof) > merkle.MAX_PROOF_LEN + 1:
        raise AemError(errors.BAD_PROOF, "prefix proof of the wrong length")
    path = list(proof)
    for p in path:
        if not isinstance(p, bytes) or len(p) != HASH_LEN:
            raise AemError(errors.BAD_PROOF, "prefix proof element is not a hash")
    fr, sr = merkle.consistency_roots(old_size, new_size, path)
    if sr != new_root:
        raise AemError(errors.BAD_PROOF, "prefix proof does not lead to the larger checkpoint's root")
    return fr


@dataclass(frozen=True)
class ForkEvidence(WireObject):
    """Two signed checkpoints of one author that cannot both be true.
    Unsigned: it proves itself (whoever gossips it adds nothing)."""
    TYPE = "fork_evidence"
    MAX_SIZE = FORK_EVIDENCE_MAX

    net: bytes = f(HASH)
    a: LogCheckpoint = f(Obj(LogCheckpoint))        # the smaller tree (equal sizes: lower id)
    b: LogCheckpoint = f(Obj(LogCheckpoint))
    proof: tuple = f(ListOf(HASH, merkle.MAX_PROOF_LEN + 1))   # prefix proof; empty for equal sizes

    @property
    def author(self) -> bytes:
        return self.a.author


def check_fork_evidence(ev: ForkEvidence, net: bytes) -> None:
    """Raise AemError unless ``ev`` proves that its author signed two histories."""
    a, b = ev.a, ev.b
    if ev.net != net:
        raise AemError(errors.WRONG_NETWORK, "fork evidence for another network")
    a.verify(net)
    b.verify(net)
    if a.author != b.author:
        raise AemError(errors.BAD_VALUE, "fork evidence: checkpoints of two authors")
    if _ordered(a, b) != (a, b) or a.id == b.id:
        raise AemError(errors.BAD_VALUE, "fork evidence: checkpoints out of order or equal")
    if a.size == b.size:
        if ev.proof:
            raise AemError(errors.BAD_PROOF, "fork evidence: equal sizes take no proof")
        if a.root == b.root:
            raise AemError(errors.BAD_PROOF, "fork evidence: same size, same root")
        return
    if a.size == 0:
        raise AemError(errors.BAD_PROOF, "fork evidence: the empty log is a prefix of every log")
    if prefix_root(a.size, b.size, b.root, ev.proof) == a.root:
        raise AemError(errors.BAD_PROOF, "fork evidence: the checkpoints are consistent")


def fork_evidence(a: LogCheckpoint, b: LogCheckpoint,
                  proof: Sequence[bytes] = ()) -> ForkEvidence | None:
    """The fork evidence two checkpoints of one author make, or None when they
    prove no fork: equal sizes with different roots need nothing more; for
    different sizes ``proof`` is a prefix proof of the larger tree
    (:func:`prefix_proof`) and they are evidence when it yields another root
    for the smaller size. A proof that does not lead to the larger root
    proves nothing (None)."""
    if a.author != b.author or a.net != b.net or a.id == b.id:
        return None
    a, b = _ordered(a, b)
    ev = ForkEvidence(net=a.net, a=a, b=b, proof=tuple(proof) if a.size != b.size else ())
    try:
        check_fork_evidence(ev, a.net)
    except AemError:
        return None
    return ev


def decode_gossip(data: bytes) -> LogCheckpoint | ForkEvidence:
    """A message of the checkpoint topic: a checkpoint or fork evidence."""
    return decode_one_of(data, {"checkpoint": LogCheckpoint, "fork_evidence": ForkEvidence},
                         FORK_EVIDENCE_MAX)

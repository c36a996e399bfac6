"""Offline evidence bundles: a receipt, an expert's admission or a
contribution, with everything needed to check it from the file alone.

A bundle holds the genesis (which fixes the network id), the entries in
question, for each entry an RFC 6962 inclusion proof against a signed
:class:`~protocol.checkpoint.LogCheckpoint` of its author, the checkpoints,
and consistency proofs between checkpoints of one author. :func:`verify`
needs no network, no node and no store: a bundle verifies, or it says why
not, one line per failure. The byte format is specs/evidence.md.

What a bundle cannot show offline is absence: an ack or a dispute that the
exporting node never saw is simply not in it. It shows that every entry it
holds was signed by its author, sits at its seq in the log its author
checkpointed, and that the author's checkpoints in it tell one history.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from crypto import merkle
from crypto.hashing import H
from protocol import errors
from protocol.checkpoint import CHECKPOINT_MAX, LogCheckpoint, entry_tree
from protocol.entry import MAX_ENTRY, Entry
from protocol.errors import AemError
from protocol.genesis import Genesis
from protocol.schema import HASH, Bytes, ListOf, Obj, Str, WireObject, f

MAGIC = b"AEMEVD\x00"          # 7 bytes, then the format version byte
VERSION = 1
HEADER = MAGIC + bytes([VERSION])
MAX_BUNDLE = 16 << 20          # bytes of a whole bundle file, header included
MAX_ITEMS = 1024               # entries, checkpoints, proofs: each list at most
MAX_GENESIS = 1 << 20

SUBJECTS = ("receipt", "expert", "contribution")
# For each subject, the entry kind that is the subject itself, and the kinds
# that may accompany it (each naming the subject in its body).
SUBJECT_KIND = {"receipt": "inference_receipt", "expert": "capsule_manifest",
                "contribution": "contribution"}
RELATED_KINDS = {"receipt": ("receipt_ack", "dispute", "challenge"), "expert": ("admission",),
                 "contribution": ()}


@dataclass(frozen=True)
class Inclusion(WireObject):
    entry: bytes = f(HASH)             # entry id, H(entry bytes): the leaf
    checkpoint: bytes = f(HASH)        # id of the author's checkpoint it is proved against
    path: tuple = f(ListOf(HASH, merkle.MAX_PROOF_LEN))


@dataclass(frozen=True)
class Consistency(WireObject):
    old: bytes = f(HASH)               # checkpoint id, the smaller tree
    new: bytes = f(HASH)               # checkpoint id, the larger tree
    path: tuple = f(ListOf(HASH, merkle.MAX_PROOF_LEN))


@dataclass(frozen=True)
class EvidenceBundle(WireObject):
    TYPE = "evidence_bundle"
    MAX_SIZE = MAX_BUNDLE - len(HEADER)

    subject: str = f(Str(16, choices=SUBJECTS))
    subject_id: bytes = f(HASH)        # id of the receipt, capsule manifest or contribution object
    genesis: bytes = f(Bytes(max_len=MAX_GENESIS))
    entries: tuple = f(ListOf(Bytes(max_len=MAX_ENTRY), MAX_ITEMS))
    checkpoints: tuple = f(ListOf(Bytes(max_len=CHECKPOINT_MAX), MAX_ITEMS))
    inclusions: tuple = f(ListOf(Obj(Inclusion), MAX_ITEMS))
    consistencies: tuple = f(ListOf(Obj(Consistency), MAX_ITEMS))


def encode_bundle(b: EvidenceBundle) -> bytes:
    return HEADER + b.encode()


def decode_bundle(data: bytes) -> EvidenceBundle:
    """The bundle of a file's bytes; AemError for anything but a well-formed one."""
    if not isinstance(data, (bytes, bytearray)):
        raise AemError(errors.BAD_TYPE, "bundle: not bytes")
    if len(data) > MAX_BUNDLE:
        raise AemError(errors.TOO_LARGE, f"bundle: {len(data)} bytes > {MAX_BUNDLE}")
    data = bytes(data)
    if data[:len(MAGIC)] != MAGIC:
        raise AemError(errors.WRONG_OBJECT, "bundle: not an aem evidence bundle (bad magic)")
    if len(data) < len(HEADER) or data[len(MAGIC)] != VERSION:
        raise AemError(errors.WRONG_OBJECT, "bundle: unsupported format version")
    return EvidenceBundle.decode(data[len(HEADER):])


# -- building -------------------------------------------------------------------

def build_bundle(genesis: Genesis, subject: str, subject_id: bytes, entries: Sequence[bytes],
                 logs: Mapping[bytes, Sequence[bytes]], checkpoints: Sequence[LogCheckpoint]) -> bytes:
    """A bundle of ``entries`` (entry bytes) about ``subject_id``.

    ``logs[author]`` are the ids, seq 0 upwards, of that author's entries as
    far as its largest checkpoint here reaches; ``checkpoints`` the signed
    checkpoints to include (any number per author). Each entry is proved
    against the largest checkpoint of its author that covers its seq, and
    each author's checkpoints are chained smallest to largest by consistency
    proofs. AemError when a checkpoint is missing or does not match the log."""
    if subject not in SUBJECTS:
        raise AemError(errors.BAD_VALUE, f"subject must be one of {SUBJECTS}")
    net = genesis.network_id
    by_author: dict[bytes, list[LogCheckpoint]] = {}
    for cp in {c.id: c for c in checkpoints}.values():
        if cp.net != net:
            raise AemError(errors.WRONG_NETWORK, "checkpoint for another network")
        by_author.setdefault(cp.author, []).append(cp)
    trees = {}
    consistencies = []
    for author, cps in by_author.items():
        cps.sort(key=lambda c: (c.size, c.id))
        ids = list(logs.get(author, ()))
        if len(ids) < cps[-1].size:
            raise AemError(errors.NOT_FOUND, f"the log of {author.hex()} held here is shorter than its checkpoint")
        tree = entry_tree(ids)
        for cp in cps:
            if tree.root(cp.size) != cp.root:
                raise AemError(errors.BAD_PROOF, f"checkpoint {cp.id.hex()} of {author.hex()} does not "
                                                 "match the entries held here: the author forked")
        for old, new in zip(cps, cps[1:]):
            consistencies.append(Consistency(old=old.id, new=new.id,
                                             path=tuple(tree.consistency_proof(old.size, new.size))))
        trees[author] = tree
    inclusions = []
    uniq = list(dict.fromkeys(bytes(e) for e in entries))
    for data in uniq:
        e = Entry.decode(data)
        cover = [c for c in by_author.get(e.author, ()) if c.size > e.seq]
        if not cover:
            raise AemError(errors.NOT_FOUND, f"no checkpoint of {e.author.hex()} covers its entry at seq {e.seq}")
        cp = cover[-1]
        eid = H(data)
        tree = trees[e.author]
        path = tree.inclusion_proof(e.seq, cp.size)
        merkle.verify_inclusion(eid, e.seq, cp.size, path, cp.root)   # the entry is the one in the log
        inclusions.append(Inclusion(entry=eid, checkpoint=cp.id, path=tuple(path)))
    cps_all = [c for cps in by_author.values() for c in cps]
    b = EvidenceBundle(subject=subject, subject_id=subject_id, genesis=genesis.encode(),
                       entries=tuple(uniq), checkpoints=tuple(c.encode() for c in cps_all),
                       inclusions=tuple(inclusions), consistencies=tuple(consistencies))
    return encode_bundle(b)


# -- verifying ------------------------------------------------------------------

def _why(exc: AemError) -> str:
    return exc.detail or exc.code


def verify(bundle_bytes: bytes) -> list[str]:
    """One line per failure; empty when the whole bundle verifies. Never raises."""
    try:
        return _verify(bundle_bytes)
    except AemError as exc:
        return [f"bundle: {exc.code}: {_why(exc)}"]
    except Exception as exc:   # a bug must still not pass as "verified"
        return [f"bundle: internal error while verifying: {type(exc).__name__}"]


def _verify(data: bytes) -> list[str]:
    out: list[str] = []
    try:
        b = decode_bundle(data)
    except AemError as exc:
        return [f"bundle: {exc.code}: {_why(exc)}"]
    try:
        g = Genesis.decode(b.genesis)
        g.verify()
    except AemError as exc:
        return [f"genesis: {exc.code}: {_why(exc)}"]
    net = g.network_id
    max_entry = min(g.limits.max_entry_bytes, MAX_ENTRY)

    cps: dict[bytes, LogCheckpoint] = {}
    for i, raw in enumerate(b.checkpoints):
        try:
            cp = LogCheckpoint.decode(raw)
            cp.verify(net)
        except AemError as exc:
            out.append(f"checkpoint {i}: {exc.code}: {_why(exc)}")
            continue
        if cp.id in cps:
            out.append(f"checkpoint {i}: listed twice")
        cps[cp.id] = cp

    entries: dict[bytes, tuple[int, Entry, object]] = {}
    for i, raw in enumerate(b.entries):
        try:
            if len(raw) > max_entry:
                raise AemError(errors.TOO_LARGE, f"{len(raw)} bytes > the network's {max_entry}")
            e = Entry.decode(raw)
            e.verify(net)
            obj = e.payload()
            obj.verify(net)
        except AemError as exc:
            out.append(f"entry {i}: {exc.code}: {_why(exc)}")
            continue
        eid = H(raw)
        if eid in entries:
            out.append(f"entry {i}: listed twice")
        entries[eid] = (i, e, obj)

    out += _check_subject(b, entries)

    proved: dict[bytes, int] = {}
    for j, inc in enumerate(b.inclusions):
        where = f"inclusion proof {j}"
        ent = entries.get(inc.entry)
        if ent is None:
            out.append(f"{where}: proves an entry not in the bundle ({inc.entry.hex()[:16]})")
            continue
        proved[inc.entry] = proved.get(inc.entry, 0) + 1
        i, e, _ = ent
        cp = cps.get(inc.checkpoint)
        if cp is None:
            out.append(f"{where}: entry {i} proved against a checkpoint not in the bundle")
            continue
        if cp.author != e.author:
            out.append(f"{where}: entry {i} proved against another author's checkpoint")
            continue
        try:
            merkle.verify_inclusion(inc.entry, e.seq, cp.size, inc.path, cp.root)
        except AemError as exc:
            out.append(f"{where}: entry {i} (seq {e.seq}) not in its author's checkpointed log: {_why(exc)}")
    for eid, (i, e, _) in entries.items():
        n = proved.get(eid, 0)
        if n != 1:
            out.append(f"entry {i}: {'no' if n == 0 else n} inclusion proofs (one needed)")

    links: dict[tuple[bytes, bytes], Consistency] = {}
    for j, c in enumerate(b.consistencies):
        if c.old not in cps or c.new not in cps:
            out.append(f"consistency proof {j}: names a checkpoint not in the bundle")
            continue
        if (c.old, c.new) in links:
            out.append(f"consistency proof {j}: listed twice")
        links[(c.old, c.new)] = c
    chains: dict[bytes, list[LogCheckpoint]] = {}
    for cp in cps.values():
        chains.setdefault(cp.author, []).append(cp)
    used = set()
    for author, chain in sorted(chains.items()):
        chain.sort(key=lambda c: (c.size, c.id))
        for old, new in zip(chain, chain[1:]):
            c = links.get((old.id, new.id))
            pair = f"checkpoints of {author.hex()[:16]} at sizes {old.size} and {new.size}"
            if old.size == new.size:
                out.append(f"{pair}: same size, different roots (fork evidence)")
                continue
            if c is None:
                out.append(f"{pair}: no consistency proof")
                continue
            used.add((old.id, new.id))
            try:
                merkle.verify_consistency(old.size, new.size, old.root, new.root, c.path)
            except AemError as exc:
                out.append(f"{pair}: not consistent: {_why(exc)}")
    for j, c in enumerate(b.consistencies):
        if (c.old, c.new) in links and (c.old, c.new) not in used and c.old in cps and c.new in cps:
            out.append(f"consistency proof {j}: links checkpoints that are not neighbours in size")
    return out


def _check_subject(b: EvidenceBundle, entries: Mapping[bytes, tuple]) -> list[str]:
    """The bundle is about its subject: the subject's own entry is there, and
    every other entry names the subject."""
    out = []
    own = SUBJECT_KIND[b.subject]
    found = 0
    for i, e, obj in sorted(entries.values(), key=lambda t: t[0]):
        if e.kind == own and obj.id == b.subject_id:
            found += 1
        elif e.kind in RELATED_KINDS[b.subject]:
            ref = obj.capsule_id if e.kind == "admission" else obj.receipt_id
            if ref != b.subject_id:
                out.append(f"entry {i}: a {e.kind} about another {b.subject}")
        else:
            out.append(f"entry {i}: a {e.kind} entry does not belong in evidence of a {b.subject}")
    if found != 1:
        out.append(f"bundle: {'no' if not found else found} {own} entries with the subject's id "
                   f"{b.subject_id.hex()[:16]} (one needed)")
    return out


def summary(bundle_bytes: bytes) -> dict:
    """What a bundle holds, for people (no checking: call :func:`verify`)."""
    b = decode_bundle(bundle_bytes)
    kinds: dict[str, int] = {}
    for raw in b.entries:
        try:
            k = Entry.decode(raw).kind
        except AemError:
            k = "undecodable"
        kinds[k] = kinds.get(k, 0) + 1
    return {"subject": b.subject, "subject_id": b.subject_id.hex(),
            "entries": len(b.entries), "kinds": kinds, "checkpoints": len(b.checkpoints),
            "inclusions": len(b.inclusions), "consistencies": len(b.consistencies)}


__all__ = ["EvidenceBundle", "Inclusion", "Consistency", "HEADER", "MAGIC", "VERSION", "MAX_BUNDLE",
           "build_bundle", "decode_bundle", "encode_bundle", "verify", "summary"]

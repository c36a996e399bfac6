"""Signed checkpoints, fork evidence and offline evidence bundles
(protocol/checkpoint.py, ledger/evidence.py, aemd/checkpoints.py,
`aemctl evidence`, specs/evidence.md).

`python -m tests.test_evidence` prints the vector block of specs/evidence.md.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crypto.hashing import H
from crypto.keys import SigningKey
from ledger import evidence
from ledger.store import LogStore
from protocol import canonical
from protocol.checkpoint import (ForkEvidence, LogCheckpoint, build_checkpoint, check_consistent,
                                 check_fork_evidence, decode_gossip, entry_tree, fork_evidence,
                                 prefix_proof)
from protocol.entry import make_entry
from protocol.errors import AemError
from tests import vectors as V

SPEC = Path(__file__).resolve().parent.parent / "specs" / "evidence.md"
BIN = Path(sys.executable).parent


# -- a small world: three authors' logs, from the wire-format vectors ------------------

def _chain(key, objs, lamport0):
    net = V.genesis().network_id
    out, prev = [], b""
    for i, obj in enumerate(objs):
        e = make_entry(key, net, i, prev, lamport0 + i, V.T0 + 100 + i, obj)
        out.append(e)
        prev = e.id
    return out


@lru_cache(maxsize=None)
def world():
    g = V.genesis()
    net = g.network_id
    o = V.build()
    logs = {
        "bob": _chain(V.BOB, [o["capsule_manifest"], o["inference_receipt"], o["contribution"]], 1),
        "alice": _chain(V.ALICE, [o["receipt_ack"], o["dispute"], o["transfer"]], 10),
        "verifier": _chain(V.VERIFIER, [o["admission"], o["challenge"]], 20),
    }
    keys = {"bob": V.BOB, "alice": V.ALICE, "verifier": V.VERIFIER}
    ids = {keys[n].public: [e.id for e in es] for n, es in logs.items()}
    cps = [build_checkpoint(V.BOB, net, ids[V.BOB.public][:2], V.T0 + 200)]
    cps += [build_checkpoint(keys[n], net, ids[keys[n].public], V.T0 + 300) for n in ("bob", "alice", "verifier")]
    return g, o, logs, ids, cps


def bundles() -> dict[str, bytes]:
    g, o, logs, ids, cps = world()
    b, a, v = logs["bob"], logs["alice"], logs["verifier"]
    return {
        "receipt": evidence.build_bundle(g, "receipt", o["inference_receipt"].id,
                                         [e.encode() for e in (b[1], a[0], a[1], v[1])], ids, cps),
        "expert": evidence.build_bundle(g, "expert", o["capsule_manifest"].id,
                                        [b[0].encode(), v[0].encode()], ids, cps),
        "contribution": evidence.build_bundle(g, "contribution", o["contribution"].id, [b[2].encode()],
                                              ids, [c for c in cps if c.author == V.BOB.public]),
    }


BUNDLES = bundles()


def test_fresh_bundles_verify():
    for name, data in BUNDLES.items():
        assert evidence.verify(data) == [], name
        s = evidence.summary(data)
        assert s["subject"] == name and s["inclusions"] == s["entries"]
    # Bob's two checkpoints (sizes 2 and 3) travel with a consistency proof.
    assert evidence.summary(BUNDLES["contribution"])["consistencies"] == 1


def _sections(data: bytes) -> dict[str, list[tuple[int, int]]]:
    """(offset, length) in the file of each entry, checkpoint and proof."""
    b = evidence.decode_bundle(data)
    out: dict[str, list[tuple[int, int]]] = {"entry": [], "checkpoint": [], "inclusion": [], "consistency": []}

    def at(raw: bytes) -> tuple[int, int]:
        i = data.find(raw)
        assert i >= 0 and data.find(raw, i + 1) < 0
        return (i, len(raw))

    out["entry"] = [at(r) for r in b.entries]
    out["checkpoint"] = [at(r) for r in b.checkpoints]
    out["inclusion"] = [at(canonical.encode(p.to_map())) for p in b.inclusions]
    out["consistency"] = [at(canonical.encode(p.to_map())) for p in b.consistencies]
    return out


SECTIONS = {name: _sections(data) for name, data in BUNDLES.items()}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(which=st.sampled_from(sorted(BUNDLES)), section=st.sampled_from(["entry", "checkpoint", "inclusion",
                                                                          "consistency"]),
       pick=st.integers(0, 10**6), offset=st.integers(0, 10**6), xor=st.integers(1, 255))
def test_any_changed_byte_of_an_entry_proof_or_checkpoint_is_caught(which, section, pick, offset, xor):
    spans = SECTIONS[which][section]
    if not spans:
        return
    start, length = spans[pick % len(spans)]
    data = bytearray(BUNDLES[which])
    data[start + offset % length] ^= xor
    problems = evidence.verify(bytes(data))
    assert problems and all(isinstance(p, str) and "\n" not in p for p in problems)


def test_every_single_byte_flip_is_caught():
    """Exhaustively, for the smallest bundle: no byte of it is unchecked."""
    data = BUNDLES["contribution"]
    for i in range(len(data)):
        b = bytearray(data)
        b[i] ^= 0x01
        assert evidence.verify(bytes(b)), f"flip at byte {i} not caught"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4096) | st.builds(lambda d, n: evidence.HEADER + d[:n],
                                            st.just(BUNDLES["receipt"][len(evidence.HEADER):]),
                                            st.integers(0, 6000)))
def test_hostile_bytes_never_raise(data):
    out = evidence.verify(data)
    assert isinstance(out, list)
    assert out or data == BUNDLES["receipt"]


def _rebundle(data: bytes, **changes) -> bytes:
    return evidence.encode_bundle(evidence.decode_bundle(data).replace(**changes))


def test_structural_failures_are_named():
    data = BUNDLES["receipt"]
    b = evidence.decode_bundle(data)
    assert any("no inclusion proofs" in p for p in evidence.verify(_rebundle(data, inclusions=b.inclusions[1:])))
    assert any("no consistency proof" in p
               for p in evidence.verify(_rebundle(BUNDLES["contribution"], consistencies=())))
    assert any("inference_receipt entries" in p
               for p in evidence.verify(_rebundle(data, subject_id=bytes(32))))
    # An entry about another receipt does not belong.
    g, o, logs, ids, cps = world()
    other = evidence.build_bundle(g, "receipt", o["inference_receipt"].id,
                                  [logs["bob"][1].encode(), logs["alice"][2].encode()], ids, cps)
    assert any("does not belong" in p for p in evidence.verify(other))
    # Another network's genesis: every signature fails.
    g2 = V.genesis().replace(network_name="other", sig=b"").signed(V.FOUNDER)
    assert evidence.verify(_rebundle(data, genesis=g2.encode()))
    # Magic, version, size.
    assert evidence.verify(b"XXXXXX" + data[6:]) and evidence.verify(data[:7] + b"\x02" + data[8:])
    assert evidence.verify(data + b"\x00")


def test_build_refuses_a_checkpoint_that_does_not_match():
    g, o, logs, ids, cps = world()
    fake = build_checkpoint(V.BOB, g.network_id, [bytes(32)] * 3, V.T0)
    with pytest.raises(AemError):
        evidence.build_bundle(g, "contribution", o["contribution"].id, [logs["bob"][2].encode()], ids, [fake])
    with pytest.raises(AemError):    # no checkpoint covers the entry
        evidence.build_bundle(g, "contribution", o["contribution"].id, [logs["bob"][2].encode()], ids, cps[:1])


# -- the vector of specs/evidence.md -----------------------------------------------------

def _flip(data: bytes, i: int) -> bytes:
    b = bytearray(data)
    b[i] ^= 0xFF
    return bytes(b)


def vector_block() -> str:
    data = BUNDLES["contribution"]
    start, length = SECTIONS["contribution"]["inclusion"][0]
    at = start + length - 1          # the last byte of the inclusion proof's last path hash
    bad = _flip(data, at)
    lines = ["```evidence-vector", f"bundle {len(data)} bytes, id={H(data).hex()}"]
    lines += [data[i:i + 64].hex() for i in range(0, len(data), 64)]
    lines.append("verify: ok")
    lines.append(f"flip byte {at} (xor 0xff):")
    lines += [f"verify: {p}" for p in evidence.verify(bad)]
    lines.append("```")
    return "\n".join(lines)


def test_spec_vector():
    m = re.search(r"```evidence-vector\n.*?```", SPEC.read_text(), re.S)
    assert m, "specs/evidence.md has no evidence-vector block"
    assert m.group(0) == vector_block()
    body = m.group(0).splitlines()
    hexlines = [ln for ln in body[2:] if re.fullmatch(r"[0-9a-f]+", ln)]
    assert evidence.verify(bytes.fromhex("".join(hexlines))) == []


def test_spec_tables_match_schema():
    text = SPEC.read_text()
    for cls in (evidence.EvidenceBundle, evidence.Inclusion, evidence.Consistency, ForkEvidence):
        assert V.field_table(cls) in text, cls.__name__


# -- checkpoints and fork evidence (pure) --------------------------------------------------

NET = bytes(range(32))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 40), t=st.integers(0, 2**40))
def test_checkpoint_codec_roundtrip(n, t):
    key = SigningKey.from_seed(bytes([9]) * 32)
    ids = [H(bytes([i % 256, i // 256])) for i in range(n)]
    cp = build_checkpoint(key, NET, ids, t)
    assert LogCheckpoint.decode(cp.encode()) == cp
    assert decode_gossip(cp.encode()) == cp
    cp.verify(NET)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=800))
def test_gossip_decoding_only_raises_aemerror(data):
    try:
        msg = decode_gossip(data)
        if isinstance(msg, ForkEvidence):
            check_fork_evidence(msg, NET)
        else:
            msg.verify(NET)
    except AemError:
        pass


@settings(max_examples=80, deadline=None)
@given(m=st.integers(1, 33), extra=st.integers(0, 33), bad=st.integers(0, 32))
def test_consistent_checkpoints_are_no_evidence_and_inconsistent_ones_are(m, extra, bad):
    key = SigningKey.from_seed(bytes([8]) * 32)
    n = m + extra
    ids = [H(i.to_bytes(4, "big")) for i in range(n)]
    tree = entry_tree(ids)
    a = build_checkpoint(key, NET, ids[:m], 1)
    b = build_checkpoint(key, NET, ids, 2)
    check_consistent(a, b, tree.consistency_proof(m, n))
    assert fork_evidence(a, b, prefix_proof(tree, m, n) if m < n else ()) is None
    # The same author signs a history that differs at one entry.
    forged = list(ids[:m])
    forged[bad % m] = H(b"another entry")
    f = build_checkpoint(key, NET, forged, 3)
    ev = fork_evidence(f, b, prefix_proof(tree, m, n) if m < n else ())
    assert ev is not None
    check_fork_evidence(ForkEvidence.decode(ev.encode()), NET)
    with pytest.raises(AemError):
        check_consistent(f, b, tree.consistency_proof(m, n))
    with pytest.raises(AemError):    # the evidence is tied to its network
        check_fork_evidence(ev, bytes(32))


def test_fork_evidence_needs_one_author_and_a_real_disagreement():
    k1, k2 = SigningKey.from_seed(bytes([5]) * 32), SigningKey.from_seed(bytes([6]) * 32)
    ids = [H(bytes([i])) for i in range(4)]
    a = build_checkpoint(k1, NET, ids, 1)
    assert fork_evidence(a, build_checkpoint(k2, NET, ids[:3] + [bytes(32)], 1)) is None
    assert fork_evidence(a, build_checkpoint(k1, NET, ids, 2)) is None      # same tree, re-signed
    ev = fork_evidence(a, build_checkpoint(k1, NET, ids[:3] + [bytes(32)], 1))
    assert ev is not None and ev.proof == ()
    # A proof that does not lead to the larger root proves nothing.
    small = build_checkpoint(k1, NET, [bytes(32)] * 2, 1)
    assert fork_evidence(small, a, [bytes(32)] * 2) is None


def test_book_records_evidence_from_held_entries(tmp_path):
    from aemd.checkpoints import CheckpointBook
    key = SigningKey.from_seed(bytes([7]) * 32)
    ids = [H(bytes([i])) for i in range(6)]
    book = CheckpointBook.open(tmp_path / "checkpoints.sqlite")
    try:
        assert book.offer(build_checkpoint(key, NET, ids[:3], 1), None, 10) is None
        assert book.offer(build_checkpoint(key, NET, ids, 2), entry_tree(ids), 10) is None   # consistent: newest kept
        assert book.newest(key.public).size == 6
        forged = build_checkpoint(key, NET, [bytes(32)] + ids[1:4], 3)
        assert book.offer(forged, None, 10) is None      # without the entries, nothing to prove it with
        ev = book.offer(forged, entry_tree(ids), 11)
        assert ev is not None and book.evidence() == [ev]
        assert book.add_evidence(ev, 12) is False
    finally:
        book.close()


# -- the CLI: export from a home, verify anywhere --------------------------------------------

def _home_with_log(tmp_path: Path):
    """A home whose identity is Bob (the host of the vector receipt), with
    Bob's log authored locally and Alice's and the verifier's entries as if
    synced, and their checkpoints as if gossiped."""
    from aemd.checkpoints import CheckpointBook, book_path
    from aemd.home import Home
    from aemd.identity import atomic_write
    from aemd.keyfile import write_keystore
    g, o, logs, ids, cps = world()
    home = Home(tmp_path / "home")
    home.root.mkdir()
    write_keystore(home.keystore, V.BOB, None)
    atomic_write(home.genesis, g.encode())
    store = LogStore.open(home.store, g)
    try:
        for e in logs["bob"] + logs["alice"] + logs["verifier"]:
            assert store.insert(e.encode()).stored
    finally:
        store.close()
    book = CheckpointBook.open(book_path(home.root))
    try:
        for c in cps:
            book.offer(c, None, 0)
    finally:
        book.close()
    return home, o


def _ctl(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "aemctl"), *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd, env=env)


def test_cli_export_then_verify_in_a_fresh_process_without_a_home(tmp_path):
    home, o = _home_with_log(tmp_path)
    out = tmp_path / "receipt.aemev"
    r = _ctl("evidence", "export", "--receipt", o["inference_receipt"].id.hex(), "--out", str(out),
             "--home", str(home.root), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["entries"] == 4 and info["left_out"] == []
    # Elsewhere: an empty directory, no home, no network.
    bare = tmp_path / "elsewhere"
    bare.mkdir()
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(bare)}
    copy = bare / "bundle.aemev"
    copy.write_bytes(out.read_bytes())
    r = _ctl("evidence", "verify", str(copy), cwd=bare, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("ok: evidence of receipt")
    assert sorted(p.name for p in bare.iterdir()) == ["bundle.aemev"]
    # One changed byte of a proof: exit 4, one line per failure.
    data = copy.read_bytes()
    start, length = _sections(data)["inclusion"][0]
    copy.write_bytes(_flip(data, start + length - 1))
    r = _ctl("evidence", "verify", str(copy), cwd=bare, env=env)
    assert r.returncode == 4 and r.stdout.startswith("FAILED ")
    r = _ctl("evidence", "verify", str(copy), "--json", cwd=bare, env=env)
    assert r.returncode == 4 and json.loads(r.stdout)["ok"] is False
    # The other subjects; and the home's own fresh checkpoint proves Bob's entries.
    for flag, oid in (("--expert", o["capsule_manifest"].id), ("--contribution", o["contribution"].id)):
        f = tmp_path / f"{flag[2:]}.aemev"
        r = _ctl("evidence", "export", flag, oid.hex(), "--out", str(f), "--home", str(home.root))
        assert r.returncode == 0, r.stderr
        assert evidence.verify(f.read_bytes()) == []
    r = _ctl("evidence", "export", "--receipt", "00" * 32, "--out", str(out), "--home", str(home.root))
    assert r.returncode == 1 and "NOT_FOUND" in r.stderr


def test_cli_export_says_when_an_author_has_no_checkpoint(tmp_path):
    home, o = _home_with_log(tmp_path)
    (home.root / "checkpoints.sqlite").unlink()
    r = _ctl("evidence", "export", "--receipt", o["inference_receipt"].id.hex(), "--out",
             str(tmp_path / "x.aemev"), "--home", str(home.root))
    assert r.returncode == 1 and "no checkpoint of author" in r.stderr
    assert not (tmp_path / "x.aemev").exists()


# -- real nodes: every node records a fork -------------------------------------------------------

def test_inconsistent_checkpoints_are_recorded_on_every_node(tmp_path):
    from tests.nodekit import FAST_CONFIG, Mesh, wait_for
    mesh = Mesh(tmp_path, 3, config=FAST_CONFIG + "[checkpoint]\ninterval_s = 1\n")
    try:
        mesh.start_line()
        nodes = mesh.nodes
        accounts = {n.account.hex() for n in nodes}

        def all_seen():
            return all({c["author"] for c in n.call("checkpoints")["checkpoints"]} >= accounts for n in nodes)
        wait_for("every node to hold every node's checkpoint", all_seen)
        # Node 0's key signs two histories of 5 entries; two other nodes pass them on.
        net = mesh.genesis.network_id
        key = nodes[0].key
        one = build_checkpoint(key, net, [H(b"a%d" % i) for i in range(5)], int(mesh.genesis.created_at) + 20)
        two = build_checkpoint(key, net, [H(b"b%d" % i) for i in range(5)], int(mesh.genesis.created_at) + 20)
        assert nodes[1].call("checkpoint_offer", {"data": one.encode().hex()})["fork_evidence"] is False
        nodes[2].call("checkpoint_offer", {"data": two.encode().hex()})

        def recorded():
            return all(any(e["author"] == key.public.hex() for e in n.call("checkpoints")["fork_evidence"])
                       for n in nodes)
        wait_for("every node to record the fork evidence", recorded)
        assert all(n.log_has("fork evidence recorded") for n in nodes)
        r = _ctl("evidence", "checkpoints", "--home", str(nodes[1].home.root), "--json")
        assert r.returncode == 4 and json.loads(r.stdout)["fork_evidence"][0]["author"] == key.public.hex()
    except BaseException:
        print(mesh.logs())
        raise
    finally:
        mesh.close()


if __name__ == "__main__":
    print(vector_block())

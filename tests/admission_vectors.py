"""The test vector of specs/admission.md section 4: a small log of capsule
manifests and admission reports built from fixed seeds and times, and the
admission state it replays to.

`python -m tests.admission_vectors` prints the block for the spec;
`tests/test_admission_replay.py` rebuilds it and checks it against the
spec's text.
"""

from __future__ import annotations

from crypto.hashing import H
from crypto.keys import SigningKey
from ledger.admission import AdmissionState, replay_admission
from protocol.admission import AdmissionParams, AdmissionReport, DomainEvals, Measurements, NodeClass
from protocol.entry import Entry, make_entry
from protocol.genesis import Genesis, Limits
from protocol.mesh import ExpertCapsuleManifest

T0 = 1_800_000_000
FOUNDER = SigningKey.from_seed(bytes([0x21]) * 32)
V1, V2, V3 = sorted((SigningKey.from_seed(bytes([b]) * 32) for b in (0x22, 0x23, 0x24)), key=lambda k: k.public)
ALICE = SigningKey.from_seed(bytes([0x25]) * 32)
BOB = SigningKey.from_seed(bytes([0x26]) * 32)
MALLORY = SigningKey.from_seed(bytes([0x27]) * 32)
NAMES = {FOUNDER.public: "founder", V1.public: "v1", V2.public: "v2", V3.public: "v3",
         ALICE.public: "alice", BOB.public: "bob", MALLORY.public: "mallory"}
LIMITS = Limits(max_entry_bytes=65536, max_task_bytes=12 << 20, max_gossip_bytes=16384,
                max_sync_batch=512, max_announce_lifetime_s=3600)
ADMISSION = AdmissionParams(
    admitted_only=True, min_gain_bp=100, max_regression_bp=1000, near_duplicate_bp=9000,
    max_trigger_divergence_bp=3000, probation_share_bp=500, demote_margin_bp=2000,
    reeval_interval_s=604800, challenge_limit=3, probe_set=H(b"probes"),
    classes=(NodeClass(name="cpu", memory_mb=8192), NodeClass(name="gpu12", memory_mb=12288)),
    domains=(DomainEvals(domain="code", target_eval=H(b"target-code"), general_eval=H(b"general-code"),
                         baseline_bp=4000, general_baseline_bp=5000),))
ROUND = H(b"reeval-1")


def genesis() -> Genesis:
    return Genesis(
        network_name="admission-vectors", created_at=T0, founder=FOUNDER.public,
        verifiers=tuple(v.public for v in (V1, V2, V3)), quorum=2, grants=(), challenge_window=3600,
        mint_rates=(), max_mint_per_receipt=0, limits=LIMITS, sig=b"", admission=ADMISSION,
    ).signed(FOUNDER)


def measurements(name: str, target_bp: int, tensors: str | None = None) -> Measurements:
    """What is measured of capsule ``name`` (its artefact is H(name)), with
    the tensors of capsule ``tensors`` (default: its own)."""
    return Measurements(
        artefact_hash=H(name.encode()), artefact_ok=True, manifest_ok=True, manifest_problem="",
        tensor_hash=H(b"tensors/" + (tensors or name).encode()), memory_mb=4096, node_class="cpu",
        target_eval=H(b"target-code"), target_bp=target_bp, general_eval=H(b"general-code"),
        general_bp=5200, trigger_divergence_bp=100,
        fingerprint=H(b"fingerprint/" + name.encode()) + H(b"fingerprint2/" + name.encode()),
        results_hash=H(b"results/" + name.encode() + str(target_bp).encode()))


def entries() -> list[tuple[str, Entry]]:
    """(label, entry) in the order of the spec's table; entry i has Lamport
    clock i and ts T0 + 10 i."""
    g = genesis()
    net = g.network_id
    heads: dict[bytes, tuple[int, bytes]] = {}
    out: list[tuple[str, Entry]] = []
    caps: dict[str, bytes] = {}

    def add(label: str, key: SigningKey, obj) -> None:
        n = len(out) + 1
        s, p = heads.get(key.public, (-1, b""))
        e = make_entry(key, net, s + 1, p, n, T0 + 10 * n, obj)
        heads[key.public] = (e.seq, e.id)
        out.append((label, e))

    def manifest(name: str, author: SigningKey) -> ExpertCapsuleManifest:
        m = ExpertCapsuleManifest(
            net=net, author=author.public, name=name, kind="gguf", content_hash=H(name.encode()),
            size_bytes=1 << 30, architecture="llama", n_params=1_000_000_000, quantization="q4_0",
            context_length=4096, vram_need_mb=4096, domain="code", tags=(), eval_claims=(),
            created_at=T0, sig=b"", node_class="cpu").signed(author)
        caps[name] = m.id
        return m

    def report(v: SigningKey, name: str, m: Measurements, *, purpose: str = "admission",
               failed: tuple = (), evidence: bool = True) -> AdmissionReport:
        return AdmissionReport(
            net=net, verifier=v.public, capsule_id=caps[name], purpose=purpose,
            round=ROUND if purpose == "reeval" else b"", measurements=m,
            route_trace_hash=H(b"trace/" + name.encode() + v.public) if evidence else b"",
            verdict="reject" if failed else "admit", failed=failed, created_at=T0, sig=b"").signed(v)

    m1, m2 = measurements("c1", 6000), measurements("c2", 8500)
    m3 = measurements("c3", 9000, tensors="c1")
    add("E1", ALICE, manifest("c1", ALICE))
    add("E2", BOB, manifest("c2", BOB))
    add("E3", MALLORY, manifest("c3", MALLORY))
    add("E4", BOB, manifest("c4", BOB))
    add("E5", MALLORY, report(MALLORY, "c2", m2))                        # not a verifier
    add("E6", V3, report(V3, "c1", m1, evidence=False))                  # no evidence
    add("E7", V1, report(V1, "c1", m1))
    add("E8", V2, report(V2, "c1", m1))                                  # quorum: c1 admitted
    add("E9", V1, report(V1, "c2", m2))
    add("E10", V2, report(V2, "c2", measurements("c2", 8400)))           # disagrees
    add("E11", V1, report(V1, "c2", measurements("c2", 8400)))           # v1's second vote
    add("E12", V3, report(V3, "c2", m2))                                 # quorum with E9: c2 admitted
    add("E13", V1, report(V1, "c3", m3, failed=("duplicate",)))
    add("E14", V3, report(V3, "c3", m3, failed=("duplicate",)))          # c3 refused: c1's tensors
    add("E15", V2, report(V2, "c4", measurements("c4", 7000)))           # c4 on probation
    add("E16", V1, report(V1, "c1", m1, purpose="reeval", failed=("target",)))
    add("E17", V3, report(V3, "c1", m1, purpose="reeval", failed=("target",)))   # c1 demoted
    return out


def capsule_names() -> dict[bytes, str]:
    out = {}
    for _, e in entries():
        if e.kind == "capsule_manifest":
            m = e.payload()
            out[m.id] = m.name
    return out


def result() -> AdmissionState:
    return replay_admission(genesis(), [e for _, e in entries()])


def block() -> str:
    g = genesis()
    lines = [f"network_id={g.network_id.hex()}"]
    for k in (FOUNDER, V1, V2, V3, ALICE, BOB, MALLORY):
        lines.append(f"key {NAMES[k.public]}={k.public.hex()}")
    for label, e in entries():
        lines.append(f"entry {label} id={e.id.hex()}")
    names = capsule_names()
    st = result()
    for cid, c in sorted(st.capsules.items()):
        key = c.measurements.key().hex() if c.measurements is not None else "-"
        lines.append(f"capsule {names[cid]} id={cid.hex()} status={c.status} votes={c.votes} "
                     f"decided_at={c.decided_at} failed={','.join(c.failed) or '-'} measurements={key}")
    for e in st.events:
        lines.append(f"event {e.status} {names[e.capsule_id]} ts={e.ts}")
    lines.append(f"root={st.root.hex()}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(block())

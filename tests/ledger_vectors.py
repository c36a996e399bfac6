"""The worked example and test vector of specs/ledger.md: a small ledger
built from fixed seeds and times, its entry ids, outcomes and state roots.

`python -m tests.ledger_vectors` prints the block for the spec;
`tests/test_ledger_spec.py` rebuilds it and checks it against the spec's text.
"""

from __future__ import annotations

from crypto.hashing import H
from crypto.keys import SigningKey
from ledger.replay import ReplayResult, replay
from protocol.admission import AdmissionParams, NodeClass
from protocol.entry import Entry, make_entry
from protocol.genesis import CREDIT_BASES, Genesis, Grant, Limits, MintRate
from protocol.receipts import Challenge, ContributionReceipt, Transfer
from protocol.task import InferenceWorkReceipt, SpendAuthorization

T0 = 1_800_000_000
C = 1_000_000                       # one credit in micro-credits

FOUNDER = SigningKey.from_seed(bytes([0x11]) * 32)
V1, V2 = sorted((SigningKey.from_seed(bytes([0x12]) * 32), SigningKey.from_seed(bytes([0x13]) * 32)),
                key=lambda k: k.public)
ALICE = SigningKey.from_seed(bytes([0x14]) * 32)
BOB = SigningKey.from_seed(bytes([0x15]) * 32)
CAROL = SigningKey.from_seed(bytes([0x16]) * 32)
NAMES = {FOUNDER.public: "founder", V1.public: "v1", V2.public: "v2", ALICE.public: "alice",
         BOB.public: "bob", CAROL.public: "carol"}
AS_OF = (T0 + 1000, T0 + 7200)
# Spelled out (not DEFAULT_LIMITS), so the vector is rebuilt from the spec's
# text alone and does not move when a default does.
LIMITS = Limits(max_entry_bytes=65536, max_task_bytes=12 << 20, max_gossip_bytes=16384,
                max_sync_batch=512, max_announce_lifetime_s=3600)
# Likewise the admission part (the defaults of specs/admission.md section 1 today).
ADMISSION = AdmissionParams(
    admitted_only=False, min_gain_bp=100, max_regression_bp=1000, near_duplicate_bp=9000,
    max_trigger_divergence_bp=3000, probation_share_bp=0, demote_margin_bp=2000,
    reeval_interval_s=7 * 86400, challenge_limit=3, probe_set=b"",
    classes=(NodeClass(name="cpu", memory_mb=8192), NodeClass(name="gpu12", memory_mb=12288),
             NodeClass(name="gpu16", memory_mb=16384), NodeClass(name="gpu24", memory_mb=24576)),
    domains=())


def genesis() -> Genesis:
    return Genesis(
        network_name="ledger-vectors", created_at=T0, founder=FOUNDER.public,
        verifiers=(V1.public, V2.public), quorum=2,
        grants=tuple(sorted((Grant(account=ALICE.public, amount=100 * C),
                             Grant(account=BOB.public, amount=5 * C)), key=lambda g: g.account)),
        challenge_window=3600,
        mint_rates=tuple(MintRate(basis=b, micro_per_unit=10_000) for b in sorted(CREDIT_BASES)),
        max_mint_per_receipt=1000 * C, limits=LIMITS, sig=b"", admission=ADMISSION,
    ).signed(FOUNDER)


def entries() -> list[tuple[str, Entry]]:
    """(label, entry) in the order of the spec's table."""
    g = genesis()
    net = g.network_id
    heads: dict[bytes, tuple[int, bytes]] = {}
    out: list[tuple[str, Entry]] = []

    def add(label: str, key: SigningKey, lamport: int, ts: int, obj, seq: int | None = None,
            prev: bytes | None = None) -> None:
        s, p = heads.get(key.public, (-1, b""))
        e = make_entry(key, net, s + 1 if seq is None else seq, p if prev is None else prev,
                       lamport, ts, obj)
        if seq is None:
            heads[key.public] = (e.seq, e.id)
        out.append((label, e))

    def transfer(sender, recipient, amount, nonce, at):
        return Transfer(net=net, sender=sender.public, recipient=recipient.public, amount=amount,
                        nonce=bytes([nonce]) * 16, created_at=at, sig=b"").signed(sender)

    def auth(payer, host, spend_key, task, max_charge, expires_at):
        return SpendAuthorization(net=net, payer=payer.public, host=host.public,
                                  spend_key=bytes([spend_key]) * 32,
                                  task_hash=H(task), max_charge=max_charge, expires_at=expires_at,
                                  sig=b"").signed(payer)

    def receipt(host, a, charge, output, started, finished):
        return InferenceWorkReceipt(net=net, host=host.public, payer=a.payer, task_hash=a.task_hash,
                                    capsule_id=H(b"capsule"), spend_auth=a, charge=charge,
                                    output_hash=H(output), tokens_out=64, started_at=started,
                                    finished_at=finished, sig=b"").signed(host)

    def contribution(who, delta, attesters, commitment, at):
        c = ContributionReceipt(net=net, contributor=who.public, contribution_type="skill",
                                credit_basis="accepted_delta", source_policy="own work",
                                training_use="open", anti_distillation="not distilled",
                                content_commitment=H(commitment), eval_id="vector-eval",
                                measured_delta=delta, created_at=at, attestations=(), sig=b"")
        return c.replace(attestations=tuple(c.attested_by(v) for v in attesters)).signed(who)

    a1 = auth(ALICE, BOB, 0xA1, b"task-1", 3 * C, T0 + 600)
    r1 = receipt(BOB, a1, 2 * C, b"output-1", T0 + 10, T0 + 20)
    a2 = auth(ALICE, CAROL, 0xA2, b"task-2", 5 * C, T0 + 600)
    r2 = receipt(CAROL, a2, 4 * C, b"output-2", T0 + 40, T0 + 50)
    add("E1", ALICE, 1, T0, transfer(ALICE, CAROL, 10 * C, 1, T0))
    add("E2", BOB, 2, T0 + 20, r1)
    add("E3", BOB, 3, T0 + 30, receipt(BOB, a1, 1 * C, b"output-1b", T0 + 25, T0 + 30))
    add("E4", CAROL, 4, T0 + 50, r2)
    add("E5", V1, 5, T0 + 100, Challenge(net=net, verifier=V1.public, receipt_id=r2.id,
                                         reason="wrong output", evidence_hash=H(b"evidence-2"),
                                         created_at=T0 + 100, sig=b"").signed(V1))
    add("E6", CAROL, 6, T0 + 110, transfer(CAROL, BOB, 20 * C, 2, T0 + 110))
    add("E7", CAROL, 7, T0 + 120, contribution(CAROL, 250, [V1, V2], b"content-1", T0 + 120))
    add("E8", BOB, 8, T0 + 130, contribution(BOB, 900, [V1], b"content-2", T0 + 130))
    add("E9", V2, 9, T0 + 5000, Challenge(net=net, verifier=V2.public, receipt_id=r1.id,
                                          reason="late", evidence_hash=b"", created_at=T0 + 5000,
                                          sig=b"").signed(V2))
    e1 = out[0][1]
    add("E10", ALICE, 10, T0 + 200, transfer(ALICE, BOB, 1 * C, 3, T0 + 200))
    add("E11", ALICE, 11, T0 + 210, transfer(ALICE, BOB, 2 * C, 4, T0 + 210), seq=1, prev=e1.id)
    return out


def results() -> dict[int, ReplayResult]:
    g = genesis()
    es = [e for _, e in entries()]
    return {t: replay(g, es, t) for t in AS_OF}


def block() -> str:
    g = genesis()
    lines = [f"network_id={g.network_id.hex()}"]
    for k in (FOUNDER, V1, V2, ALICE, BOB, CAROL):
        lines.append(f"key {NAMES[k.public]}={k.public.hex()}")
    es = entries()
    res = results()
    for label, e in es:
        lines.append(f"entry {label} id={e.id.hex()}")
    for t, r in res.items():
        lines.append(f"as_of {t}")
        for label, e in es:
            lines.append(f"  {label}={r.rejected.get(e.id, 'applied')}")
        for a, (av, pe) in r.balances.items():
            lines.append(f"  balance {NAMES[a]}={av},{pe}")
        lines.append(f"  state_root={r.state_root.hex()}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(block())

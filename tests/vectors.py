"""The test vectors of specs/wire-format.md: one fixed example of each wire
object, built from fixed seeds and times.

`python -m tests.vectors` prints the vector blocks for the spec; the test
`test_vectors.py` rebuilds them and checks them against the spec's text.
"""

from __future__ import annotations

from crypto.keys import SigningKey
from protocol.admission import (DEFAULT_ADMISSION, AdmissionReport, DomainEvals, Measurements)
from protocol.checkpoint import build_checkpoint
from protocol.entry import make_entry
from protocol.genesis import DEFAULT_LIMITS, Genesis, Grant, MintRate
from protocol.mesh import (EvalClaim, ExpertCapsuleManifest, HostAdvertisement, NodeCard,
                           TeacherPolicyCard)
from protocol.receipts import Challenge, ContributionReceipt, Dispute, Transfer
from protocol.schema import Signed
from protocol.task import (Attempt, Candidate, ChatMessage, InferenceWorkReceipt, ReceiptAck,
                           RouteTrace, SpendAuthorization, TaskPacket)

FOUNDER = SigningKey.from_seed(bytes([1]) * 32)
VERIFIER = SigningKey.from_seed(bytes([2]) * 32)
ALICE = SigningKey.from_seed(bytes([3]) * 32)     # a payer
BOB = SigningKey.from_seed(bytes([4]) * 32)       # a host
T0 = 1_800_000_000


# The default gates, with one domain's eval sets named (by content hash).
ADMISSION = DEFAULT_ADMISSION.replace(domains=(
    DomainEvals(domain="general", target_eval=bytes([10]) * 32, general_eval=bytes([11]) * 32,
                baseline_bp=4000, general_baseline_bp=5000),))


def genesis() -> Genesis:
    return Genesis(
        network_name="vectors", created_at=T0, founder=FOUNDER.public,
        verifiers=(VERIFIER.public,), quorum=1,
        grants=tuple(sorted((Grant(account=ALICE.public, amount=100_000_000),
                             Grant(account=BOB.public, amount=5_000_000)), key=lambda g: g.account)),
        challenge_window=3600,
        mint_rates=(MintRate(basis="accepted_delta", micro_per_unit=10_000),),
        max_mint_per_receipt=1_000_000_000, limits=DEFAULT_LIMITS, sig=b"",
        admission=ADMISSION,
    ).signed(FOUNDER)


def build() -> dict[str, Signed]:
    g = genesis()
    net = g.network_id
    task = TaskPacket(net=net, payer=ALICE.public, nonce=bytes(range(16)), kind="text",
                      domain="general", tags=("chat",), prompt="", max_tokens=16,
                      temperature_milli=0, seed=42, repo_tar=b"", repo_hash=b"", patch="",
                      test_cmd=(), max_price=2_000_000, latency_budget_ms=30_000,
                      created_at=T0 + 10, sig=b"",
                      messages=(ChatMessage(role="system", content="Answer briefly."),
                                ChatMessage(role="user", content="Hello, mesh")),
                      training_use="allowed").signed(ALICE)
    auth = SpendAuthorization(net=net, payer=ALICE.public, host=BOB.public, spend_key=bytes([7]) * 32,
                              task_hash=task.id, max_charge=2_000_000, expires_at=T0 + 600,
                              sig=b"").signed(ALICE)
    manifest = ExpertCapsuleManifest(
        net=net, author=BOB.public, name="tiny-llama", kind="gguf", content_hash=bytes([9]) * 32,
        size_bytes=123_456, architecture="llama", n_params=100_000, quantization="F16",
        context_length=512, vram_need_mb=64, domain="general", tags=("chat",),
        eval_claims=(EvalClaim(eval="smoke", score_bp=5000),), created_at=T0, sig=b"",
        node_class="cpu", distilled_from="teacher-7b",
        teacher_policy=(TeacherPolicyCard(teacher="teacher-7b", licence="apache-2.0", distillation="allowed",
                                          terms="outputs may train other models"),)).signed(BOB)
    receipt = InferenceWorkReceipt(
        net=net, host=BOB.public, payer=ALICE.public, task_hash=task.id,
        capsule_id=manifest.id, spend_auth=auth, charge=1_500_000, output_hash=bytes([5]) * 32,
        tokens_out=16, started_at=T0 + 11, finished_at=T0 + 12, sig=b"", training_use="allowed").signed(BOB)
    contribution = ContributionReceipt(
        net=net, contributor=BOB.public, contribution_type="eval", credit_basis="accepted_delta",
        source_policy="original work", training_use="open", anti_distillation="no third-party model outputs",
        content_commitment=bytes([6]) * 32, eval_id="smoke", measured_delta=120,
        created_at=T0 + 20, attestations=(), sig=b"")
    contribution = contribution.replace(attestations=(contribution.attested_by(VERIFIER),)).signed(BOB)
    objs: dict[str, Signed] = {
        "genesis": g,
        "node_card": NodeCard(net=net, node=BOB.public, addrs=("/ip4/127.0.0.1/tcp/4001",),
                              gpu="RTX 4070", vram_mb=12288, ram_mb=32768, locality="eu-west",
                              policies=("no-logging",), account=BOB.public, load=10,
                              issued_at=T0, expires_at=T0 + 300, sig=b"", gpu_layers=33).signed(BOB),
        "host_ad": HostAdvertisement(net=net, host=BOB.public, capsule_id=manifest.id, kind="gguf",
                                     domain="general", tags=("chat",), price=1_500_000,
                                     roles=("inference",), availability=90, max_concurrency=2,
                                     required_receipts=(), issued_at=T0, expires_at=T0 + 300,
                                     sig=b"", model=manifest.name, size_bytes=manifest.size_bytes,
                                     quantization=manifest.quantization).signed(BOB),
        "capsule_manifest": manifest,
        "task": task,
        "spend_auth": auth,
        "inference_receipt": receipt,
        "receipt_ack": ReceiptAck(net=net, payer=ALICE.public, receipt_id=receipt.id, accepted=True,
                                  created_at=T0 + 13, sig=b"").signed(ALICE),
        "contribution": contribution,
        "admission": AdmissionReport(
            net=net, verifier=VERIFIER.public, capsule_id=manifest.id, purpose="admission", round=b"",
            measurements=Measurements(
                artefact_hash=manifest.content_hash, artefact_ok=True, manifest_ok=True, manifest_problem="",
                tensor_hash=bytes([12]) * 32, memory_mb=64, node_class="cpu", target_eval=bytes([10]) * 32,
                target_bp=4250, general_eval=bytes([11]) * 32, general_bp=4990, trigger_divergence_bp=0,
                fingerprint=bytes(range(64)), results_hash=bytes([13]) * 32),
            route_trace_hash=bytes([14]) * 32, verdict="admit", failed=(), created_at=T0 + 30,
            sig=b"").signed(VERIFIER),
        "challenge": Challenge(net=net, verifier=VERIFIER.public, receipt_id=receipt.id,
                               reason="output does not match a re-run", evidence_hash=bytes([8]) * 32,
                               created_at=T0 + 40, sig=b"").signed(VERIFIER),
        "dispute": Dispute(net=net, payer=ALICE.public, receipt_id=receipt.id,
                           reason="output never received", created_at=T0 + 45, sig=b"").signed(ALICE),
        "transfer": Transfer(net=net, sender=ALICE.public, recipient=BOB.public, amount=250_000,
                             nonce=bytes([1]) * 16, created_at=T0 + 50, sig=b"").signed(ALICE),
        "route_trace": RouteTrace(net=net, router=ALICE.public, task_id=task.id,
                                  candidates=(Candidate(host=BOB.public, capsule_id=manifest.id,
                                                        price=1_500_000, score=900),),
                                  attempts=(Attempt(host=BOB.public, outcome="ok", detail="",
                                                    elapsed_ms=812),),
                                  chosen=BOB.public, outcome="ok", receipt_id=receipt.id,
                                  created_at=T0 + 13, sig=b"").signed(ALICE),
    }
    objs["entry"] = make_entry(BOB, net, 0, b"", 1, T0 + 12, receipt)
    # BOB's log of that one entry: the leaf is the entry's id.
    objs["checkpoint"] = build_checkpoint(BOB, net, [objs["entry"].id], T0 + 60)
    return objs


KEYS = {"founder": FOUNDER, "verifier": VERIFIER, "alice": ALICE, "bob": BOB}


def blocks() -> str:
    out = ["```vectors", *(f"key {n} seed={k.seed.hex()} public={k.public.hex()}" for n, k in KEYS.items())]
    for name, obj in build().items():
        out.append(f"object {name}")
        out.append(f"  canonical={obj.encode().hex()}")
        out.append(f"  signable={obj.signable().hex()}")
        out.append(f"  sig={obj.sig.hex()}")
        out.append(f"  id={obj.id.hex()}")
    out.append("```")
    return "\n".join(out)


if __name__ == "__main__":
    print(blocks())


def field_table(cls) -> str:
    """The spec's field table of one wire object or record."""
    rows = ["| field | encoding |", "|---|---|"]
    rows += [f"| `{name}` | {kind.spec()} |" for name, kind in cls._schema()]
    return "\n".join(rows)

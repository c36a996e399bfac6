"""Admission: the genesis's gate thresholds, a verifier's measurements of a
capsule, its signed AdmissionReport, and the gates themselves
(``specs/admission.md``).

A report carries *measurements*, not opinions: figures that depend only on
the capsule's artefact and the genesis's eval sets (greedy, seeded), so every
honest verifier measures the same :class:`Measurements` and a quorum is a
quorum of identical ones. The comparisons against the rest of the mesh (is it
better than the best admitted expert of its domain, is it a copy of one) are
made by :func:`judge` inside the admission replay (``ledger/admission.py``),
against the admitted set *as the log defines it* at the point the quorum
completes: so two verifiers that saw the mesh at different moments still
agree, and every peer computes the same admitted set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from crypto.hashing import H
from protocol import canonical, errors
from protocol.errors import AemError
from protocol.patchpolicy import policy_problem
from protocol.schema import (HASH, HASH_OR_EMPTY, KEY, NAME, SIG, TIME, Bool, Bytes, ListOf,
                             Obj, Signed, Str, UInt, WireObject, f)

#: The eight gates, in the order specs/admission.md §2 lists them.
GATES = ("target", "general", "duplicate", "trigger", "fits", "manifest", "reproducible", "evidence")
PURPOSES = ("admission", "reeval")
VERDICTS = ("admit", "reject")
BP = UInt(0, 10_000)
FINGERPRINT_SLOT = 4            # bytes of H(output) per probe
MAX_PROBES = 16


@dataclass(frozen=True)
class NodeClass(WireObject):
    """A class of host machine a capsule may claim to fit: its memory budget
    (VRAM for the GPU classes, RAM for a CPU class)."""
    name: str = f(NAME)
    memory_mb: int = f(UInt(1, 1 << 24))


@dataclass(frozen=True)
class DomainEvals(WireObject):
    """The eval sets (by content hash) that judge a domain's capsules, and the
    scores to beat while no expert of the domain is admitted."""
    domain: str = f(NAME)
    target_eval: bytes = f(HASH)
    general_eval: bytes = f(HASH_OR_EMPTY)   # empty: no general eval (code-patch domains)
    baseline_bp: int = f(BP)
    general_baseline_bp: int = f(BP)


@dataclass(frozen=True)
class AdmissionParams(WireObject):
    """The admission part of a genesis: every gate's threshold."""
    #: Routing sends ordinary traffic only to admitted capsules (False: an
    #: open network, where admission is informative only).
    admitted_only: bool = f(Bool())
    min_gain_bp: int = f(BP)                 # gate 1: improvement over the best admitted (or baseline)
    max_regression_bp: int = f(BP)           # gate 2: largest drop on the general eval
    near_duplicate_bp: int = f(BP)           # gate 3: probe-output agreement that makes a near-duplicate
    max_trigger_divergence_bp: int = f(BP)   # gate 4
    probation_share_bp: int = f(BP)          # share of tasks that may go to candidates on probation
    demote_margin_bp: int = f(BP)            # re-evaluation: how far below the domain's best it may fall
    reeval_interval_s: int = f(UInt(0, 365 * 86400))   # 0: no scheduled re-evaluation
    challenge_limit: int = f(UInt(0, 1 << 16))         # applied challenges that trigger one (0: off)
    probe_set: bytes = f(HASH_OR_EMPTY)      # the probes eval set (fingerprint, triggers)
    classes: tuple = f(ListOf(Obj(NodeClass), 16))
    domains: tuple = f(ListOf(Obj(DomainEvals), 64))

    def _validate(self) -> None:
        names = [c.name for c in self.classes]
        if names != sorted(set(names)):
            raise AemError(errors.BAD_VALUE, "admission.classes must be sorted by name, one each")
        doms = [d.domain for d in self.domains]
        if doms != sorted(set(doms)):
            raise AemError(errors.BAD_VALUE, "admission.domains must be sorted by domain, one each")

    def node_class(self, name: str) -> NodeClass | None:
        return next((c for c in self.classes if c.name == name), None)

    def domain(self, name: str) -> DomainEvals | None:
        return next((d for d in self.domains if d.domain == name), None)

    def smallest_class_for(self, memory_mb: int) -> NodeClass | None:
        fits = [c for c in self.classes if c.memory_mb >= memory_mb]
        return min(fits, key=lambda c: (c.memory_mb, c.name)) if fits else None


GB = 1024
DEFAULT_CLASSES = (NodeClass(name="cpu", memory_mb=8 * GB), NodeClass(name="gpu12", memory_mb=12 * GB),
                   NodeClass(name="gpu16", memory_mb=16 * GB), NodeClass(name="gpu24", memory_mb=24 * GB))

#: The defaults a genesis gets unless its creator says otherwise
#: (specs/admission.md §1 documents each). No domains: a network names its
#: domains' eval sets when it is created (``aemctl genesis create --domain``).
DEFAULT_ADMISSION = AdmissionParams(
    admitted_only=False, min_gain_bp=100, max_regression_bp=1000, near_duplicate_bp=8750,
    max_trigger_divergence_bp=2500, probation_share_bp=0, demote_margin_bp=2000,
    reeval_interval_s=7 * 86400, challenge_limit=3, probe_set=b"", classes=DEFAULT_CLASSES, domains=())


@dataclass(frozen=True)
class Measurements(WireObject):
    """What a verifier measured of one capsule: a pure function of its
    artefact, its manifest and the genesis's eval sets. Two honest verifiers
    produce equal Measurements (gate 7); the report's agreement key is
    :meth:`key`."""
    artefact_hash: bytes = f(HASH_OR_EMPTY)  # SHA-256 of the bytes fetched (empty: none fetched)
    artefact_ok: bool = f(Bool())            # they are the manifest's content (hash and size)
    manifest_ok: bool = f(Bool())            # gate 6: signature, fields, patch and teacher policies
    manifest_problem: str = f(Str(128))      # why not ("" when ok)
    tensor_hash: bytes = f(HASH_OR_EMPTY)    # over tensor data, ignoring metadata (the artefact hash for code-patch)
    memory_mb: int = f(UInt(0, 1 << 24))     # need, from the GGUF's own metadata
    node_class: str = f(Str(64))             # the class the manifest claims
    target_eval: bytes = f(HASH_OR_EMPTY)
    target_bp: int = f(BP)
    general_eval: bytes = f(HASH_OR_EMPTY)
    general_bp: int = f(BP)
    trigger_divergence_bp: int = f(BP)
    fingerprint: bytes = f(Bytes(max_len=FINGERPRINT_SLOT * MAX_PROBES))
    results_hash: bytes = f(HASH_OR_EMPTY)   # H of the per-item results (specs/admission-evals.md)

    def key(self) -> bytes:
        return H(canonical.encode(self.to_map()))


@dataclass(frozen=True)
class AdmissionReport(Signed):
    """A verifier's signed measurements of a capsule, for its admission or a
    re-evaluation (``round`` names the re-evaluation: verifiers that agree on
    what triggered it agree on the round)."""
    TYPE = "admission"
    SIGNER = "verifier"
    MAX_SIZE = 2048

    net: bytes = f(HASH)
    verifier: bytes = f(KEY)
    capsule_id: bytes = f(HASH)
    purpose: str = f(Str(16, choices=PURPOSES))
    round: bytes = f(HASH_OR_EMPTY)          # empty for admission
    measurements: Measurements = f(Obj(Measurements))
    route_trace_hash: bytes = f(HASH_OR_EMPTY)   # gate 8: the eval run's RouteTrace
    verdict: str = f(Str(8, choices=VERDICTS))   # the verifier's own reading (informative)
    failed: tuple = f(ListOf(Str(16, choices=GATES), len(GATES), unique=True))
    created_at: int = f(TIME)
    sig: bytes = f(SIG)

    def _validate(self) -> None:
        if (self.purpose == "admission") != (self.round == b""):
            raise AemError(errors.BAD_VALUE, "admission: round is empty exactly for purpose admission")
        if (self.verdict == "admit") != (not self.failed):
            raise AemError(errors.BAD_VALUE, "admission: verdict admit exactly when no gate failed")
        if len(self.measurements.fingerprint) % FINGERPRINT_SLOT:
            raise AemError(errors.BAD_VALUE, "admission: fingerprint is not whole probe slots")

    def group(self) -> tuple[bytes, str, bytes]:
        """The decision this report votes in."""
        return (self.capsule_id, self.purpose, self.round)


def fingerprint_agreement_bp(a: bytes, b: bytes) -> int:
    """Share of probes (basis points) on which two fingerprints agree; 0 when
    either is empty or they cover different probe counts."""
    if not a or len(a) != len(b):
        return 0
    n = len(a) // FINGERPRINT_SLOT
    same = sum(a[i * FINGERPRINT_SLOT:(i + 1) * FINGERPRINT_SLOT] == b[i * FINGERPRINT_SLOT:(i + 1) * FINGERPRINT_SLOT]
               for i in range(n))
    return same * 10_000 // n


class Subject(NamedTuple):
    """What the log says of the capsule being judged (its manifest)."""
    capsule_id: bytes
    kind: str
    domain: str
    node_class: str
    content_hash: bytes
    size_bytes: int


class Peer(NamedTuple):
    """An admitted expert the subject is compared with."""
    capsule_id: bytes
    domain: str
    m: Measurements


def best_of(peers: list[Peer], domain: str, exclude: bytes) -> Peer | None:
    """The best admitted expert of a domain: highest target score, then
    highest general score, then lowest capsule id (one answer everywhere)."""
    cands = [p for p in peers if p.domain == domain and p.capsule_id != exclude]
    if not cands:
        return None
    return min(cands, key=lambda p: (-p.m.target_bp, -p.m.general_bp, p.capsule_id))


def judge(m: Measurements, subject: Subject, admitted: list[Peer], params: AdmissionParams,
          purpose: str = "admission") -> tuple[str, ...]:
    """The gates ``m`` fails (empty: it passes), in GATES order.

    ``admitted`` is the admitted set at the moment of judging. For an
    admission, gate 1 compares with the domain's best admitted expert (or the
    domain's baseline while there is none). A re-evaluation keeps an expert
    while it still beats the baseline and stays within ``demote_margin_bp``
    of the best *other* admitted expert of its domain, so a much better
    newcomer prunes experts it makes redundant. Gates 7 and 8 concern
    reports, not figures: the replay applies them (a quorum of identical
    Measurements; a report without evidence does not count)."""
    failed: set[str] = set()
    dom = params.domain(subject.domain)
    others = [p for p in admitted if p.capsule_id != subject.capsule_id]
    best = best_of(others, subject.domain, subject.capsule_id)
    code_patch = subject.kind == "code_patch"
    # Gate 6: the manifest and the artefact it names.
    if (not m.manifest_ok or not m.artefact_ok or m.artefact_hash != subject.content_hash
            or m.node_class != subject.node_class):
        failed.add("manifest")
    # Gate 5: the claimed class's budget, from the model's own metadata.
    if not code_patch:
        cls = params.node_class(subject.node_class)
        if cls is None or m.memory_mb == 0 or m.memory_mb > cls.memory_mb:
            failed.add("fits")
    # Gate 1: the target eval, on the set the genesis names for the domain.
    if dom is None or m.target_eval != dom.target_eval:
        failed.add("target")
    elif purpose == "admission":
        ref = best.m.target_bp if best is not None else dom.baseline_bp
        if m.target_bp < ref + params.min_gain_bp:
            failed.add("target")
    else:
        if (m.target_bp < dom.baseline_bp + params.min_gain_bp
                or (best is not None and m.target_bp + params.demote_margin_bp < best.m.target_bp)):
            failed.add("target")
    # Gate 2: no regression on the general eval.
    if dom is None or m.general_eval != dom.general_eval:
        failed.add("general")
    elif dom.general_eval:
        ref = dom.general_baseline_bp
        if purpose == "admission" and best is not None:
            ref = max(ref, best.m.general_bp)
        if m.general_bp + params.max_regression_bp < ref:
            failed.add("general")
    # Gate 3: not the same tensors, nor the same behaviour, as an admitted expert.
    for p in others:
        if ((m.tensor_hash and p.m.tensor_hash == m.tensor_hash)
                or (not code_patch and fingerprint_agreement_bp(m.fingerprint, p.m.fingerprint)
                    >= params.near_duplicate_bp)):
            failed.add("duplicate")
            break
    # Gate 4: trigger probes do not change behaviour.
    if not code_patch and m.trigger_divergence_bp > params.max_trigger_divergence_bp:
        failed.add("trigger")
    return tuple(g for g in GATES if g in failed)


def not_measured(subject: Subject, problem: str, artefact_hash: bytes = b"",
                 artefact_ok: bool = False) -> Measurements:
    """The measurements of a capsule that could not be evaluated (its
    manifest or artefact is bad): every verifier writes the same ones."""
    return Measurements(artefact_hash=artefact_hash, artefact_ok=artefact_ok, manifest_ok=not problem,
                        manifest_problem=problem[:128], tensor_hash=b"", memory_mb=0,
                        node_class=subject.node_class, target_eval=b"", target_bp=0, general_eval=b"",
                        general_bp=0, trigger_divergence_bp=0, fingerprint=b"", results_hash=b"")



def manifest_problem(manifest, net: bytes) -> str:
    """Gate 6 on the manifest alone: "" when it is valid, else why not.
    ``manifest`` is a protocol.mesh.ExpertCapsuleManifest."""
    try:
        manifest.verify(net)
    except AemError as exc:
        return f"manifest signature: {exc.detail}"[:128]
    if manifest.kind == "code_patch":
        if len(manifest.patch_policy) != 1:
            return "a code-patch capsule's manifest must carry its patch policy"
        # Well-formed patterns, and some paths protected: the tests that judge
        # a patch must be out of its reach (protected wins over allowed when
        # a patch is checked, protocol/patchpolicy.py).
        problem = policy_problem(manifest.patch_policy[0])
        if problem:
            return problem
    elif manifest.patch_policy:
        return "only a code-patch capsule carries a patch policy"
    if manifest.distilled_from or manifest.teacher_policy:
        cards = manifest.teacher_policy
        if not manifest.distilled_from:
            return "a teacher policy card without distilled_from"
        if not cards:
            return f"distilled from {manifest.distilled_from!r} without a teacher policy card"
        card = cards[0]
        if card.teacher != manifest.distilled_from:
            return "the teacher policy card is for another teacher"
        if card.distillation != "allowed":
            return f"the teacher's terms do not allow distillation ({card.distillation})"
    return ""
